"""``--recipe auto``, the default of ``train``: choose a recipe from the data, then train it.

The rule for what the user pins: ``auto`` chooses only what was left open. A ``--strategy``, a
stage schedule (``--train-from``, ``--lp-epochs``, ``--unfreeze-schedule``) or ``--lr-find``
says what trains, so the run is then one ordinary run of that (as ``--recipe bn_head`` with
those options: the built-in defaults); any other option given (``--lr``, ``--img-size``,
``--augment``...) holds for every candidate, over the candidate's own preset; ``--epochs``
given is the number of epochs of the final training (else the epochs validation chose).

Otherwise ``choose_and_train``:

1. splits the data as every run does (``split_for_run``); under ``auto_plan.SMALL_DATA``
   labelled images it pools train + validation into stratified folds (``auto_plan``);
2. runs the candidates of ``auto_plan.CANDIDATES`` by successive halving within ``--budget``,
   each candidate run an ordinary ``training.train`` on one fold (train = the other folds,
   validation = the fold), kept under ``<run>/candidates/`` without checkpoints
   (``choice_only``); their splits hold no test image (``auto_time.choice_split``), so the
   choice reads validation accuracy only and no candidate runs a test pass. A time budget
   (``10m``) covers the choice alone: the images it uses are a stratified sample sized from
   seconds per image measured on the first batches, and a candidate stops between batches when
   its share is spent (``auto_time``);
3. trains the winner once more (``--refit``, on by default on small data) on every labelled
   image, train + validation, for the epochs validation chose; that run is the run directory
   ``train`` returns, its ``best.ckpt`` the model predict loads, its test accuracy the one
   reported. The refit has no held-out images: its "validation" is the labelled images
   themselves, so ``best_val_acc`` there is an in-sample score, marked so in ``auto.refit``.
   Without refit the winner trains again on the given train/validation split.

``results.json`` of that run gains ``auto``: the candidates, their rounds, epochs, seconds and
validation scores per fold, the winner and why; the report shows it as a section. Its
``config.yaml`` is the winner's (recipe, options, epochs): passed back with ``--config`` it
trains the winner once on the original train/validation split, without choosing again.

``auto`` runs in one process (``--devices`` above 1 is refused with the fix). The probe
candidate is fitted, not trained by epochs: on small data it is scored by its own grouped k-fold
CV over train + validation in one run (one feature pass, ``training/probe_run.py``), else on
the validation split, and keeps that score in later rounds. A candidate that the run's options
rule out (an ensemble, ``--backbone a,b``, trains only its head; the probe needs cached
features, so ``--augment`` or ``--tta`` rule it out) is not tried, and ``results.json`` says why.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from inat_finetune.data.folders import DataSplit
from inat_finetune.errors import UserError
from inat_finetune.experiments.auto_plan import (
    CANDIDATES,
    FEATURE_SIZE,
    K_FOLDS,
    LAST_STAGES,
    MIN_TRAIN_BATCHES,
    PROBE_FIT_S,
    SMALL_DATA,
    Budget,
    Candidate,
    Costs,
    Halving,
    Scored,
    Work,
    feature_size,
    parse_budget,
    plan_fraction,
    stratified_folds,
    successive_halving,
    work_seconds,
)
from inat_finetune.experiments.auto_summary import CANDIDATES_DIR, auto_summary
from inat_finetune.experiments.auto_time import SLACK, ShareStop, choice_split, measure_costs
from inat_finetune.models.backbones import get_model
from inat_finetune.models.stages import backbone_stages
from inat_finetune.runfiles import new_run_dir, read_json, write_json_atomic
from inat_finetune.training import run as training_run
from inat_finetune.training.config import TrainConfig
from inat_finetune.training.outputs import write_figures_and_report
from inat_finetune.training.preflight import check_machine
from inat_finetune.training.probe_run import PROBE_RECIPE
from inat_finetune.training.recipe_configs import given_options, with_recipe
from inat_finetune.training.recipes import AUTO, recipe_values
from inat_finetune.training.setup import check_before_building, prepare_processes, split_for_run

log = logging.getLogger(__name__)


# Options that say what trains: given, auto runs that one configuration (module docstring).
PINS_WHAT_TRAINS = ("strategy", "train_from", "lp_epochs", "unfreeze_schedule")


def pins_what_trains(config: TrainConfig) -> bool:
    """Whether the user said what trains, so that ``auto`` has nothing to choose."""
    given = config.model_fields_set
    return any(name in given for name in PINS_WHAT_TRAINS) or config.lr_find


def train_or_choose(
    config: TrainConfig,
    split: DataSplit | None = None,
    progress: bool = True,
    report: bool = True,
) -> training_run.RunResult:
    """``train``'s entry point: ``choose_and_train`` for ``--recipe auto`` with nothing pinned,
    else one ordinary run (``auto`` with what trains pinned runs as the built-in defaults)."""
    if config.recipe != AUTO:
        return training_run.train(config, split=split, progress=progress, report=report)
    if pins_what_trains(config):  # config.yaml keeps recipe auto: passed back, it pins again
        return training_run.train(config, split=split, progress=progress, report=report)
    return choose_and_train(config, split=split, progress=progress, report=report)


def labelled(split: DataSplit) -> dict[str, list[str]]:
    """Train and validation images together, per class: what the folds and the refit use."""
    return {
        name: sorted(split.train.get(name, []) + split.val.get(name, [])) for name in split.classes
    }


def fold_splits(split: DataSplit, seed: int, small: bool | None = None) -> list[DataSplit]:
    """K stratified folds of train + validation on small data, else the given split alone.
    ``small``: whether the data is small, when ``split`` is a sample of it."""
    pooled = labelled(split)
    if small is None:
        small = sum(map(len, pooled.values())) < SMALL_DATA
    if not small:
        return [split]
    folds = stratified_folds(pooled, K_FOLDS, seed)
    made = []
    for fold in folds:
        held = {name: set(files) for name, files in fold.items()}
        train = {n: [f for f in files if f not in held.get(n, ())] for n, files in pooled.items()}
        made.append(replace(split, train=train, val={n: fold.get(n, []) for n in split.classes}))
    return made


def refit_split(split: DataSplit) -> DataSplit:
    """Every labelled image trains (and is the in-sample "validation"); the test set is kept."""
    pooled = labelled(split)
    return replace(split, train=pooled, val=pooled)


def resolve_options(candidate: Candidate, backbone: str, classes: int) -> dict[str, Any]:
    """The candidate's options with ``LAST_STAGES`` named for this backbone's stages and
    ``FEATURE_SIZE`` as pixels for its crop size."""
    options = dict(candidate.options)
    if LAST_STAGES in options.values() or FEATURE_SIZE in options.values():
        built = get_model(backbone, num_classes=classes, weights="none")
    if options.get("train_from") == LAST_STAGES:
        stages = backbone_stages(built.model, built.head)
        options["train_from"] = stages[max(0, len(stages) - 3)].name  # two before the head
    if options.get("img_size") == FEATURE_SIZE:
        options["img_size"] = feature_size(built.preprocessing.crop_size)
    return options


def min_epochs(candidate: Candidate) -> int:
    """A linear-probe-then-fine-tune preset needs an epoch after its probe epochs."""
    preset = {**recipe_values(candidate.recipe), **candidate.options}
    return int(preset.get("lp_epochs", 0) or 0) + 1


class CandidateRunner:
    """Trains one candidate for a round on its folds (``evaluate`` for successive halving).

    With a time budget, ``deadline`` (a ``clock`` value) ends the choice: a training under way
    stops at its next step, and no fold starts after it once any fold has a score, so a
    candidate never started has no folds (and ranks last). With ``costs`` measured, each
    candidate's run also stops at ``SLACK`` times its planned seconds (``auto_time``)."""

    def __init__(
        self,
        config: TrainConfig,
        split: DataSplit,
        where: Path,
        deadline: float | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.config, self.where, self.deadline, self.clock = config, where, deadline, clock
        self.scored_any = False
        self.small = sum(map(len, labelled(split).values())) < SMALL_DATA
        self.costs: Costs | None = None
        self.use(choice_split(split, 1.0, config.seed))
        self.options = {
            c.name: resolve_options(c, config.backbone, len(split.classes)) for c in CANDIDATES
        }
        self.ruled_out = {c.name: why for c in CANDIDATES if (why := self.refusal(c))}
        self.table = {c.name: c for c in CANDIDATES if c.name not in self.ruled_out}
        self.round_of: dict[str, int] = {}
        self.fitted: dict[str, Scored] = {}

    def use(self, split: DataSplit) -> None:
        """The images the candidates train and validate on (no test image): all, or a sample."""
        self.split = split
        self.folds = fold_splits(split, self.config.seed, self.small)

    def epochs_for(self, candidate: Candidate, budget_epochs: int) -> int:
        return max(budget_epochs * candidate.epoch_scale, min_epochs(candidate))

    def work(self, name: str, budget_epochs: int) -> Work:
        """What the candidate does in a round of ``budget_epochs`` (for planning a sample)."""
        candidate = self.table[name]
        if candidate.recipe == PROBE_RECIPE:  # two feature passes: plain and mirrored
            size = self.candidate_config(candidate, 1, "plan").img_size
            measured = self.costs.size if self.costs else None
            scale = (size / measured) ** 2 if size and measured else 1.0
            return Work(feature_passes=2, fixed_s=PROBE_FIT_S, pixel_scale=scale)
        epochs = self.epochs_for(candidate, budget_epochs)
        return Work(epochs=epochs * len(self.folds_for(candidate)))

    def stop_for(self, epochs: int, fold: DataSplit) -> ShareStop | None:
        """A stop at the run's share of the budget (planned seconds x SLACK), or the deadline."""
        if self.deadline is None:
            return None
        deadline = self.deadline
        if self.costs is not None:
            n_train, n_val = (sum(map(len, part.values())) for part in (fold.train, fold.val))
            planned = work_seconds(Work(epochs=epochs), self.costs, n_train, n_val)
            deadline = min(deadline, self.clock() + SLACK * planned)
        return ShareStop(deadline, self.clock)

    def refusal(self, candidate: Candidate) -> str | None:
        """Why this run's options rule the candidate out (an ensemble trains only its head,
        the probe needs cached features), or None."""
        try:
            self.candidate_config(candidate, min_epochs(candidate), "check")
        except UserError as exc:
            return str(exc)
        return None

    def folds_for(self, candidate: Candidate) -> list[DataSplit]:
        if candidate.image_folds is None or self.trains_on_features(candidate):
            return self.folds
        return self.folds[: candidate.image_folds]

    def trains_on_features(self, candidate: Candidate) -> bool:
        options = {**recipe_values(candidate.recipe), **self.options[candidate.name]}
        settings = {**options, **given_options(self.config)}
        return settings.get("strategy") == "freeze_last" and settings.get("augment") is False

    def candidate_config(self, candidate: Candidate, epochs: int, name: str) -> TrainConfig:
        return with_recipe(
            self.config,
            candidate.recipe,
            self.options[candidate.name],
            epochs=epochs,
            output=str(self.where),
            run_name=name,
            wandb=False,
        )

    def evaluate(self, name: str, budget_epochs: int) -> Scored:
        candidate = self.table[name]
        round_ = self.round_of.get(name, -1) + 1
        self.round_of[name] = round_
        if candidate.recipe == PROBE_RECIPE:
            return self.score_probe(candidate, round_)
        epochs = self.epochs_for(candidate, budget_epochs)
        started = self.clock()
        scores, best, runs, interrupted = [], [], [], []
        for index, fold in enumerate(self.folds_for(candidate)):
            if self.out_of_time():
                break
            config = self.candidate_config(candidate, epochs, f"{name}-round{round_}-fold{index}")
            stop = self.stop_for(epochs, fold)
            result = training_run.train(
                config,
                split=fold,
                progress=False,
                report=False,
                callbacks=[stop] if stop else [],
                choice_only=True,
            )
            self.scored_any = True
            scores.append(float(result.results["best_val_acc"]))
            best.append(int(result.results.get("best_epoch") or 0) + 1)
            runs.append(result.run_dir.name)
            if stop is not None and stop.stopped_at is not None:
                interrupted.append({"fold": index, **stop.stopped_at})
        seconds = self.clock() - started
        if not scores:
            log.info("auto: %s round %d not run: the time budget is spent", name, round_)
            return Scored([], 0, seconds, [], {"runs": [], "not_run": "the time budget is spent"})
        log.info(
            "auto: %s round %d, %d epochs x %d fold(s): val acc %.2f%% (%.1f s)",
            name,
            round_,
            epochs,
            len(scores),
            100 * sum(scores) / len(scores),
            seconds,
        )
        extra = {"runs": runs, **({"interrupted": interrupted} if interrupted else {})}
        return Scored(scores, epochs, seconds, best, extra)

    def score_probe(self, candidate: Candidate, round_: int) -> Scored:
        """The probe's score, fitted once: on small data its own grouped k-fold CV over train +
        validation (one run on every labelled image), else its validation accuracy; later
        rounds keep it, since more epochs change nothing in a fitted head."""
        if candidate.name in self.fitted:
            kept = self.fitted[candidate.name]
            return Scored(kept.fold_val_acc, 0, 0.0, kept.best_epochs, {"kept_from_round": 0})
        started = self.clock()
        pooled = len(self.folds) > 1
        split = refit_split(self.split) if pooled else self.folds[0]
        config = self.candidate_config(candidate, 1, f"{candidate.name}-round{round_}")
        result = training_run.train(
            config, split=split, progress=False, report=False, choice_only=True
        )
        self.scored_any = True
        shutil.rmtree(result.run_dir / "checkpoints", ignore_errors=True)  # the probe writes them
        probe = result.results.get("linear_probe", {})
        score = float(probe["cv_acc"]) if pooled else float(result.results["best_val_acc"])
        scored_on = (
            f"its own {probe.get('folds')}-fold grouped CV of train+val" if pooled else "val"
        )
        seconds = self.clock() - started
        log.info(
            "auto: %s fitted, %.2f%% on %s (%.1f s)",
            candidate.name,
            100 * score,
            scored_on,
            seconds,
        )
        scored = Scored(
            [score], 0, seconds, [1], {"runs": [result.run_dir.name], "scored_on": scored_on}
        )
        self.fitted[candidate.name] = scored
        return scored

    def out_of_time(self) -> bool:
        """Past the deadline, once something has a score (the first fold always runs)."""
        return self.deadline is not None and self.scored_any and self.clock() >= self.deadline


def choose_and_train(
    config: TrainConfig,
    split: DataSplit | None = None,
    progress: bool = True,
    report: bool = True,
) -> training_run.RunResult:
    """Choose a recipe by successive halving on validation folds, then train the winner on all
    labelled images (or the given split); see the module docstring."""
    split = check_and_split(config, split, progress)
    count = sum(map(len, labelled(split).values()))
    budget = parse_budget(config.budget)
    name = config.run_name or f"{config.backbone}-auto"
    choice_started = time.perf_counter()  # a time budget counts from here: the choice alone
    deadline = choice_started + 60 * budget.amount if budget.unit == "m" else None
    runner = CandidateRunner(config, split, Path(), deadline)  # a bad backbone fails here
    where = runner.where = new_run_dir(config.output, f"{name}-{CANDIDATES_DIR}")
    sample = plan_sample(runner, split, budget, choice_started)
    log.info(
        "auto: %d candidates, %s, scored on %s; budget %s",
        len(runner.table),
        ", ".join(runner.table),
        f"{len(runner.folds)} folds of train+val" if len(runner.folds) > 1 else "the val split",
        budget.describe(),
    )
    for ruled_out, why in runner.ruled_out.items():
        log.info("auto: %s not tried: %s", ruled_out, why)
    halving = successive_halving(
        list(runner.table), runner.evaluate, budget, started=choice_started
    )
    winner = runner.table[halving.winner]
    refit = config.refit if config.refit is not None else count < SMALL_DATA
    epochs = final_epochs(config, winner, halving)
    final_config = with_recipe(
        config,
        winner.recipe,
        runner.options[winner.name],
        epochs=epochs,
        run_name=name,
    )
    started = time.perf_counter()
    final_split = refit_split(split) if refit else split
    result = training_run.train(final_config, split=final_split, progress=progress, report=False)
    refit_seconds = time.perf_counter() - started
    moved = result.run_dir / CANDIDATES_DIR
    shutil.move(str(where), str(moved))
    summary = auto_summary(runner, halving, budget, refit, epochs, refit_seconds, final_split)
    summary["sample"] = sample  # choice_seconds: the halving's, measuring included
    results = {**read_json(result.run_dir / "results.json"), "auto": summary}
    write_json_atomic(result.run_dir / "results.json", results)
    if report:
        write_figures_and_report(result.run_dir)
    return training_run.RunResult(run_dir=result.run_dir, results=results)


def plan_sample(
    runner: CandidateRunner, split: DataSplit, budget: Budget, started: float
) -> dict[str, Any]:
    """Under a time budget, measure the seconds per image and give the runner the sample of
    labelled images that round 0 of every candidate fits in (``auto_time``); results.json's
    ``auto.sample``. An epoch budget uses every labelled image."""
    n_train, n_val = (sum(map(len, part.values())) for part in (split.train, split.val))
    if runner.small:  # the fine-tuning candidates train on 1 - 1/K of the pooled images
        n_train, n_val = (n_train + n_val) * (K_FOLDS - 1) // K_FOLDS, (n_train + n_val) // K_FOLDS
    summary: dict[str, Any] = {"fraction": 1.0}
    if budget.unit == "m":
        costs = runner.costs = measure_costs(runner.config, split)
        left = 60 * budget.amount - (time.perf_counter() - started)
        works = [runner.work(name, 1) for name in runner.table]
        least = MIN_TRAIN_BATCHES * runner.config.batch_size
        fraction = plan_fraction(works, costs, n_train, n_val, left, min_train=least)
        runner.use(choice_split(split, fraction, runner.config.seed))
        summary = {
            "fraction": round(fraction, 4),
            "costs": costs.as_results(),
            "min_train_images": least,
            "measured_s": round(time.perf_counter() - started, 2),
            "seed": runner.config.seed,
            "stratified": "per class, from train and from validation",
        }
        log.info(
            "auto: measured %.1f ms per image to evaluate, %.1f ms to train: the choice uses "
            "%.1f%% of the labelled images",
            1000 * costs.eval_s,
            1000 * costs.train_s,
            100 * fraction,
        )
    counted = (sum(map(len, part.values())) for part in (runner.split.train, runner.split.val))
    return {**summary, **dict(zip(("train_images", "val_images"), counted, strict=True))}


def check_and_split(config: TrainConfig, split: DataSplit | None, progress: bool) -> DataSplit:
    """What every run checks before it touches a file (the machine, the extras, the processes,
    the data), then the split; ``auto`` runs in one process."""
    if config.data is None and split is None:
        raise UserError("--data is required: the folder that holds the images")
    check_machine(config)
    processes = prepare_processes(config)
    if processes.world.processes > 1:
        raise UserError(
            f"--recipe auto runs in one process, not {processes.world.processes}: pass "
            "--devices 1, or a recipe (--recipe strong) or --strategy to train on several devices"
        )
    split = split_for_run(config, progress, given=split)
    check_before_building(config, split, processes.world)
    return split


def final_epochs(config: TrainConfig, winner: Candidate, halving: Halving) -> int:
    """``--epochs`` when given, else the mean best epoch of the winner's last round."""
    if "epochs" in config.model_fields_set:
        return max(config.epochs, min_epochs(winner))
    best = halving.rounds[-1][winner.name].best_epochs or [1]
    return max(round(sum(best) / len(best)), min_epochs(winner))
