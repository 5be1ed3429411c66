"""--recipe auto: successive halving, folds, the choice by validation only, the refit."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import TINY_TRAIN, make_class_folders
from lightning.pytorch.callbacks import Callback
from typer.testing import CliRunner

from inat_finetune.cli import app
from inat_finetune.errors import UserError
from inat_finetune.experiments import auto
from inat_finetune.experiments.auto_plan import (
    CANDIDATES,
    Budget,
    Scored,
    parse_budget,
    stratified_folds,
    successive_halving,
)
from inat_finetune.training import run as training_run
from inat_finetune.training.config import load_config
from inat_finetune.training.recipe_configs import with_recipe
from inat_finetune.training.setup import split_for_run

QUALITY = {"a": 0.9, "b": 0.5, "c": 0.7, "d": 0.6, "e": 0.4, "f": 0.8, "g": 0.3, "h": 0.2}


def fake_evaluate(steps: dict[str, int]):
    """A cheap candidate: its score is its quality, a little higher with more epochs; every
    epoch it trains is counted in ``steps``."""

    def evaluate(name: str, epochs: int) -> Scored:
        steps[name] = steps.get(name, 0) + epochs
        return Scored([QUALITY[name] + 0.001 * epochs], epochs, 0.0, [epochs])

    return evaluate


def test_successive_halving_stops_weak_candidates_early():
    steps: dict[str, int] = {}
    names = list(QUALITY)  # 8 candidates: 3 rounds of 8, 4, 2
    halving = successive_halving(names, fake_evaluate(steps), Budget(48, "e"))
    assert halving.winner == "a"
    assert [len(r) for r in halving.rounds] == [8, 4, 2]
    # 48 epochs over 8 candidates x 3 rounds: 2 epochs in round 0, then 4, then 8.
    assert steps == {"a": 14, "f": 14, "c": 6, "d": 6, "b": 2, "e": 2, "g": 2, "h": 2}
    assert halving.stopped_after == {
        **dict.fromkeys("begh", 0),
        **dict.fromkeys("cd", 1),
        **dict.fromkeys("af", 2),
    }
    assert halving.budget_epochs_used == sum(steps.values()) <= 48


def test_an_epoch_budget_too_small_for_a_round_stops_halving():
    steps: dict[str, int] = {}
    halving = successive_halving(list("abcd"), fake_evaluate(steps), Budget(5, "e"))
    assert len(halving.rounds) == 1 and halving.winner == "a"  # round 1 would need 4 more
    assert "does not fit another round" in halving.why_stopped
    assert steps == dict.fromkeys("abcd", 1)


def test_a_time_budget_stops_before_a_round_that_would_not_fit():
    now = [0.0]

    def slow(name: str, epochs: int) -> Scored:
        now[0] += 10.0 * epochs  # ten seconds per epoch
        return Scored([QUALITY[name]], epochs, 10.0 * epochs)

    # Round 0: 4 x 1 epoch = 40 s; round 1 would take 2 x 2 x 10 = 40 s more: over 1 minute.
    halving = successive_halving(list("abcd"), slow, Budget(1, "m"), clock=lambda: now[0])
    assert len(halving.rounds) == 1 and now[0] == 40.0
    halving = successive_halving(list("abcd"), slow, Budget(2, "m"), clock=lambda: now[0])
    assert [len(r) for r in halving.rounds] == [4, 2]


def test_budget_parsing_and_its_default_from_the_data_size():
    assert parse_budget("10m") == Budget(10.0, "m")
    assert parse_budget("20e") == Budget(20.0, "e")
    assert parse_budget(None) == Budget(4.0, "e")
    with pytest.raises(UserError, match="--budget 10h: give minutes like 10m"):
        parse_budget("10h")
    with pytest.raises(UserError, match="budget"):
        load_config(None, budget="ten minutes")


def test_the_probe_takes_its_features_larger_than_the_crop_unless_the_size_is_given():
    probe = next(c for c in CANDIDATES if c.name == "probe")
    assert auto.resolve_options(probe, "mobilenet_v2", 2)["img_size"] == 288  # 224 x 1.3
    runner_config = load_config(None, data="d", backbone="mobilenet_v2")
    chosen = with_recipe(runner_config, probe.recipe, {"img_size": 288})
    assert chosen.img_size == 288
    given = load_config(None, data="d", backbone="mobilenet_v2", img_size=160)
    assert with_recipe(given, probe.recipe, {"img_size": 288}).img_size == 160  # the user's


def test_stratified_folds_cover_every_image_once_and_spread_each_class():
    by_class = {"a": [f"a/{i}.jpg" for i in range(13)], "b": [f"b/{i}.jpg" for i in range(7)]}
    folds = stratified_folds(by_class, 5, seed=3)
    held = [f for fold in folds for files in fold.values() for f in files]
    assert sorted(held) == sorted(by_class["a"] + by_class["b"])  # each exactly once
    assert sorted(len(fold.get("a", [])) for fold in folds) == [2, 2, 3, 3, 3]
    assert sorted(len(fold.get("b", [])) for fold in folds) == [1, 1, 1, 2, 2]
    assert sorted(sum(map(len, f.values())) for f in folds) == [4, 4, 4, 4, 4]
    assert stratified_folds(by_class, 5, seed=3) == folds  # seed-fixed
    assert stratified_folds(by_class, 5, seed=4) != folds


def test_a_pinned_strategy_runs_one_ordinary_run(tmp_path, monkeypatch):
    seen = []

    def record(config, *args, **kwargs):
        seen.append(config)
        raise UserError("stopped before training")

    monkeypatch.setattr(training_run, "train", record)
    args = ["train", "--data", str(tmp_path), "--output", str(tmp_path / "runs")]
    result = CliRunner().invoke(app, [*args, "--strategy", "freeze_last", "--epochs", "3"])
    assert result.exit_code == 2, result.output
    (config,) = seen
    assert (config.recipe, config.strategy, config.epochs) == ("auto", "freeze_last", 3)


class SamplerRecord(Callback):
    """The indices the training sampler yields in each epoch, and the training set's size."""

    def __init__(self) -> None:
        self.epochs: list[list[int]] = []
        self.size = 0

    def on_train_epoch_start(self, trainer, module) -> None:
        loader = trainer.train_dataloader
        self.size = len(loader.dataset)
        # The seeded sampler yields (index, seed of its augmentation) pairs.
        self.epochs.append([i if isinstance(i, int) else i[0] for i in loader.sampler])


@pytest.fixture
def two_candidates(monkeypatch):
    """The probe and BatchNorm + head, scored on 2 folds: the real choice, at a tiny cost."""
    table = tuple(c for c in CANDIDATES if c.name in ("probe", "bn_head"))
    monkeypatch.setattr(auto, "CANDIDATES", table)
    monkeypatch.setattr(auto, "K_FOLDS", 2)


def tiny_split(tmp_path: Path, corrupt_test: bool = False):
    data = tmp_path / "data"
    if not data.exists():
        make_class_folders(data / "train", {"a": 8, "b": 8}, seed=1)
        make_class_folders(data / "val", {"a": 3, "b": 3}, seed=2)
    config = load_config(None, data=str(data), **{**TINY_TRAIN, "strategy": None})
    split = split_for_run(config)
    if corrupt_test:  # every test image under the other class's label
        split = replace(split, test={"a": split.test["b"], "b": split.test["a"]})
    return split


def auto_config(tmp_path: Path, out: str):
    options = {k: v for k, v in TINY_TRAIN.items() if k not in ("strategy", "epochs")}
    return load_config(
        None, data=str(tmp_path / "data"), output=str(tmp_path / out), budget="2e", **options
    )


def watch_the_refit(monkeypatch) -> tuple[SamplerRecord, list]:
    """Record every training call's split, and what the final run's (the refit's) sampler yields."""
    record, calls = SamplerRecord(), []
    real_train = training_run.train

    def watched(config, split=None, **kwargs):
        calls.append((config.run_name, split))
        if "round" not in config.run_name:  # the final run: the refit
            kwargs["callbacks"] = [record]
        return real_train(config, split=split, **kwargs)

    monkeypatch.setattr(training_run, "train", watched)
    return record, calls


def labelled_and_test(split) -> tuple[set, set]:
    labelled = {p for part in (split.train, split.val) for files in part.values() for p in files}
    return labelled, {p for files in split.test.values() for p in files}


def test_the_choice_never_reads_test_labels(tmp_path, monkeypatch, two_candidates):
    record, calls = watch_the_refit(monkeypatch)
    clean = auto.choose_and_train(
        auto_config(tmp_path, "clean"), split=tiny_split(tmp_path), progress=False, report=False
    )
    refit_split = calls[-1][1]
    corrupt = auto.choose_and_train(
        auto_config(tmp_path, "corrupt"),
        split=tiny_split(tmp_path, corrupt_test=True),
        progress=False,
        report=False,
    )
    chosen = [r.results["auto"] for r in (clean, corrupt)]
    assert chosen[0]["winner"] == chosen[1]["winner"]
    scores = [
        {c["name"]: [r["fold_val_acc"] for r in c["rounds"]] for c in a["candidates"]}
        for a in chosen
    ]
    assert scores[0] == scores[1]
    assert clean.results["test_acc"] + corrupt.results["test_acc"] == pytest.approx(1.0)

    # Whichever won (the probe, fitted, or bn_head, trained), the refit trained on every
    # labelled image (train + validation) and on no test image.
    labelled, test = labelled_and_test(tiny_split(tmp_path))
    refit_train = {p for files in refit_split.train.values() for p in files}
    assert refit_train == labelled and not refit_train & test
    assert clean.results["auto"]["refit"]["train_images"] == len(labelled)
    assert (clean.run_dir / "checkpoints" / "best.ckpt").is_file()


def test_the_refit_sees_every_labelled_image_once_per_epoch(tmp_path, monkeypatch):
    """A winner trained by epochs (bn_head alone here): the refit's sampler yields every
    labelled image once per epoch, and no test image."""
    table = tuple(c for c in CANDIDATES if c.name == "bn_head")
    monkeypatch.setattr(auto, "CANDIDATES", table)
    monkeypatch.setattr(auto, "K_FOLDS", 2)
    record, calls = watch_the_refit(monkeypatch)
    clean = auto.choose_and_train(
        auto_config(tmp_path, "clean"), split=tiny_split(tmp_path), progress=False, report=False
    )
    refit_split, refit_epochs = calls[-1][1], list(record.epochs)
    labelled, test = labelled_and_test(tiny_split(tmp_path))
    refit_train = {p for files in refit_split.train.values() for p in files}
    assert refit_train == labelled and not refit_train & test
    assert record.size == len(labelled) == clean.results["auto"]["refit"]["train_images"]
    assert refit_epochs and all(sorted(e) == list(range(record.size)) for e in refit_epochs)
    assert len(refit_epochs) == clean.results["auto"]["refit"]["epochs"]
    assert (clean.run_dir / "checkpoints" / "best.ckpt").is_file()
    assert (clean.run_dir / "candidates").is_dir()


def test_compare_recipes_writes_one_row_per_recipe_on_one_split(tmp_path, two_candidates):
    tiny_split(tmp_path)  # writes the data
    args = ["compare", "--data", str(tmp_path / "data"), "--output", str(tmp_path / "runs")]
    for name, value in TINY_TRAIN.items():
        if name != "strategy":
            args += ["--" + name.replace("_", "-"), str(value)]
    result = CliRunner().invoke(app, [*args, "--recipes", "bn_head,auto", "--budget", "2e"])
    assert result.exit_code == 0, result.output
    (comparison_dir,) = (tmp_path / "runs").iterdir()
    comparison = json.loads((comparison_dir / "comparison.json").read_text())
    assert comparison["compared"] == "recipe"
    assert [row["strategy"] for row in comparison["rows"]] == ["bn_head", "auto"]
    runs = [comparison_dir / row["run_dir"] for row in comparison["rows"]]
    results = [json.loads((run / "results.json").read_text()) for run in runs]
    assert results[0]["strategy"] == "freeze_except_bn_and_fc" and "auto" not in results[0]
    assert results[1]["auto"]["winner"] in ("probe", "bn_head")
    assert results[0]["num_images"]["test"] == results[1]["num_images"]["test"] == 6
    assert "| recipe | train acc" in (comparison_dir / "comparison.md").read_text()
    assert "Recipe chosen by validation" in (runs[1] / "report.html").read_text()


def test_auto_on_several_processes_is_refused_with_the_fix(tmp_path):
    config = load_config(None, data=str(tmp_path), devices="2", accelerator="cpu")
    with pytest.raises(UserError, match="--recipe auto runs in one process, not 2"):
        auto.train_or_choose(config, progress=False)
    assert not any(tmp_path.iterdir())  # refused before the data is read or a folder made


def test_an_ensemble_tries_only_the_head_only_candidates(tmp_path):
    """--backbone a,b trains only its head: the fine-tuning candidates are ruled out, saying why."""
    split = tiny_split(tmp_path)
    config = load_config(
        None,
        data=str(tmp_path / "data"),
        backbone="mobilenet_v2,tf_efficientnet_lite0",
        output=str(tmp_path / "runs"),
    )
    runner = auto.CandidateRunner(config, split, tmp_path, None)
    assert list(runner.table) == ["probe"]
    assert set(runner.ruled_out) == {"bn_head", "lp_ft", "last_stages"}
    assert all("--backbone" in why for why in runner.ruled_out.values())
