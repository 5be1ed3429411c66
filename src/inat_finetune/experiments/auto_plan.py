"""What ``--recipe auto`` tries and how it spends its budget: the candidates, the folds, and
successive halving. No training here (``experiments/auto.py`` runs the candidates), so each
decision can be tested with cheap fake candidates.

* ``CANDIDATES`` is the one table of candidate recipes: a name, a recipe preset of
  ``training/recipes.py`` (or None) and options over it, and how many epochs the candidate trains
  per budget epoch (``epoch_scale``: a candidate on cached features costs a few milliseconds per
  epoch, so it gets more of them). ``LAST_STAGES`` in its options stands for the stage two
  before the head (``train_from`` the last two backbone stages), and ``FEATURE_SIZE`` for the
  probe's larger feature size (see there), both resolved per backbone.
* Folds: under ``SMALL_DATA`` labelled images (train + validation), candidates are scored by
  ``K_FOLDS``-fold stratified cross-validation on train + validation, seeded by ``--seed``; else
  on the given train/validation split (one fold). A candidate that trains on images (not on
  cached features) is scored on its first ``image_folds`` folds only: five passes of fine-tuning
  per round cost more than the whole target run on two cores, and one fold of an 80/20 split is
  the single split every other recipe is chosen on.
* Successive halving (Jamieson and Talwalkar 2016): round r trains every surviving candidate
  for ``first_epochs * 2**r`` budget epochs from scratch; the better half (by mean validation
  accuracy over its folds, ties to the earlier candidate in the table) goes on, until one is
  left or the next round does not fit the budget. An epoch budget (``20e``) counts budget epochs
  summed over candidates and rounds; a time budget (``10m``) stops before a round that the
  seconds per budget epoch measured so far say would not fit, and ``experiments/auto.py`` stops
  a training under way at the deadline (the first candidate's first fold always gets a score).
* A time budget's sample (``plan_fraction``, ``sample_by_class``): the seconds per image measured
  on the first batches (``Costs``, ``experiments/auto_time.py``) and what each candidate does per
  image in round 0 (``Work``) give the fraction of the labelled images, the same in every class,
  that lets round 0 of every candidate fit its part of the budget: ``PLAN_SHARE`` of what is
  left, divided by the rounds halving needs (later rounds cost about as much as round 0: half
  the candidates, twice the epochs). An epoch budget uses every image.
"""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from inat_finetune.errors import UserError

SMALL_DATA = 2000  # labelled images under which auto scores by k-fold and refits by default


K_FOLDS = 5


LAST_STAGES = "<last two stages>"  # resolved to the stage two before the head, per backbone


# The probe's features are taken at FEATURE_SCALE times the backbone's crop size, rounded to a
# multiple of 32 (224 -> 288), resized and centre-cropped at that size for training and test
# alike. Why (Touvron et al. 2019, "Fixing the train-test resolution discrepancy"): a network
# trained on random-resized crops sees objects larger than a centre crop of the same size shows
# them, so its features fit a test image best at about 1.15-1.3x its training size. Measured on
# frozen MobileNetV2 features in benchmarks/RESULTS.md ("The probe's feature size").
FEATURE_SIZE = "<the backbone's crop x FEATURE_SCALE>"
FEATURE_SCALE = 1.3


@dataclass(frozen=True)
class Candidate:
    name: str
    recipe: str | None
    options: dict[str, Any]
    epoch_scale: int = 1  # epochs trained per budget epoch
    image_folds: int | None = 1  # folds scored when it trains on images; None: all
    about: str = ""


# The one table of candidates (edit here). The probe is fitted, not trained by epochs: it is
# scored once (experiments/auto.py) and keeps that score in later rounds.
CANDIDATES: tuple[Candidate, ...] = (
    Candidate(
        "probe",
        "probe",
        {"img_size": FEATURE_SIZE},
        image_folds=None,
        about="linear probe fitted on cached features at 1.3x the crop size (weight decay "
        "and flips by CV)",
    ),
    Candidate("bn_head", "bn_head", {}, about="BatchNorm + head, augmented (the old default)"),
    Candidate("lp_ft", "strong", {}, about="LP-FT: the strong recipe"),
    Candidate(
        "last_stages",
        None,
        {
            "train_from": LAST_STAGES,
            "lr_schedule": "onecycle",
            "optimizer": "adamw",
            "weight_decay": 0.01,
            "backbone_lr_scale": 0.1,
        },
        about="the last two stages and the head, one-cycle schedule",
    ),
)


def feature_size(crop_size: int) -> int:
    """The probe's feature size for a backbone of ``crop_size``: ``FEATURE_SIZE``."""
    return max(32, round(crop_size * FEATURE_SCALE / 32) * 32)


@dataclass(frozen=True)
class Budget:
    amount: float
    unit: str  # "e": budget epochs; "m": minutes

    def describe(self) -> str:
        return f"{self.amount:g} {'epochs' if self.unit == 'e' else 'minutes'}"


def parse_budget(text: str | None) -> Budget:
    """``--budget``: ``10m`` or ``20e``; by default 4 budget epochs.

    The default keeps the whole default run within what fastai's five lines take on two CPU
    cores (``benchmarks/accuracy_vs_fastai.py``): one round, each fine-tuning candidate one
    epoch (LP-FT two) and the probe fitted once. A run with 8 epochs on hymenoptera (244 photos,
    224 px, mobilenet_v2) took 146 s, its second round (LP-FT again) a third of that, and chose
    the same winner.
    """
    if text is None:
        return Budget(4.0, "e")
    found = re.fullmatch(r"(\d+(?:\.\d+)?)([me])", text.strip())
    if found is None or float(found.group(1)) <= 0:
        raise UserError(f"--budget {text}: give minutes like 10m or candidate epochs like 20e")
    return Budget(float(found.group(1)), found.group(2))


def stratified_folds(
    by_class: dict[str, list[str]], k: int, seed: int
) -> list[dict[str, list[str]]]:
    """``k`` disjoint validation folds covering every image once, each class spread evenly.

    Each class is shuffled by its own generator seeded by (seed, class name), then dealt round
    the folds starting where the previous class stopped, so fold sizes differ by one at most.
    """
    folds: list[dict[str, list[str]]] = [{} for _ in range(k)]
    start = 0
    for name in sorted(by_class):
        files = sorted(by_class[name])
        random.Random(f"{seed}-{name}").shuffle(files)
        for i, path in enumerate(files):
            folds[(start + i) % k].setdefault(name, []).append(path)
        start = (start + len(files)) % k
    return [{name: sorted(files) for name, files in fold.items()} for fold in folds]


def first_epochs(budget: Budget, candidates: int) -> int:
    """Budget epochs of round 0: an epoch budget spread over the rounds halving needs."""
    if budget.unit != "e":
        return 1
    rounds = max(1, math.ceil(math.log2(candidates))) if candidates > 1 else 1
    return max(1, int(budget.amount // (candidates * rounds)))


@dataclass
class Scored:
    """One candidate's result in one round: validation accuracy per fold, and what it took."""

    fold_val_acc: list[float]
    epochs: int
    seconds: float
    best_epochs: list[int] = field(default_factory=list)  # per fold, counted from 1
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def val_acc(self) -> float:
        """Mean over the folds; 0 for a candidate the time budget left no time to run."""
        if not self.fold_val_acc:
            return 0.0
        return sum(self.fold_val_acc) / len(self.fold_val_acc)


@dataclass
class Halving:
    """What successive halving did: every round's scores, who stopped when, the winner."""

    rounds: list[dict[str, Scored]]
    stopped_after: dict[str, int]  # candidate -> last round it trained in
    winner: str
    budget_epochs_used: int
    seconds: float
    why_stopped: str


def successive_halving(
    names: Sequence[str],
    evaluate: Callable[[str, int], Scored],
    budget: Budget,
    clock: Callable[[], float] = time.perf_counter,
    started: float | None = None,
) -> Halving:
    """Run ``evaluate(name, budget_epochs)`` round by round, halving the field; see the module.
    ``started``: when the choice began on ``clock`` (a time budget counts what came before the
    first round, such as measuring the costs); by default now."""
    rounds_started = clock()
    started = rounds_started if started is None else started
    alive = list(names)
    epochs = first_epochs(budget, len(alive))
    rounds: list[dict[str, Scored]] = []
    stopped: dict[str, int] = {}
    used = 0
    why = "one candidate left"
    while True:
        scores = {name: evaluate(name, epochs) for name in alive}
        rounds.append(scores)
        used += epochs * len(alive)
        ranked = sorted(alive, key=lambda n: (-scores[n].val_acc, alive.index(n)))
        if len(ranked) == 1:
            break
        keep = ranked[: max(1, len(ranked) // 2)]
        for name in ranked[len(keep) :]:
            stopped[name] = len(rounds) - 1
        alive, epochs = keep, epochs * 2
        if len(alive) == 1:
            break
        next_cost = epochs * len(alive)
        if not fits(budget, used, next_cost, clock() - started, clock() - rounds_started):
            why = f"the budget ({budget.describe()}) does not fit another round"
            break
    winner = max(alive, key=lambda n: (rounds[-1][n].val_acc, -alive.index(n)))
    for name in alive:
        stopped[name] = len(rounds) - 1
    return Halving(rounds, stopped, winner, used, clock() - started, why)


def fits(
    budget: Budget, used: int, next_cost: int, elapsed_s: float, rounds_s: float | None = None
) -> bool:
    """Whether a round of ``next_cost`` budget epochs fits what is left of the budget:
    ``elapsed_s`` since the choice began, ``rounds_s`` of it in the rounds (by default all)."""
    if budget.unit == "e":
        return used + next_cost <= budget.amount
    per_epoch = (elapsed_s if rounds_s is None else rounds_s) / max(used, 1)
    return elapsed_s + per_epoch * next_cost <= budget.amount * 60


PLAN_SHARE = 0.8  # of a time budget's seconds planned; the rest absorbs what the costs miss


MIN_PER_CLASS = 2  # images kept per class and split in a sample (all of a class with fewer)


MIN_TRAIN_BATCHES = 8  # a sample trains on at least this many batches (or on every image)


# The probe's L-BFGS search over penalties, folds and flips, nearly fixed at these sizes: 24 s
# of 44 for hymenoptera's 244 images at 64 px on the loaded 2-core machine (cProfile: 31 fits,
# 668 closures). Not measured per run; it cannot stop midway.
PROBE_FIT_S = 25.0


@dataclass(frozen=True)
class Costs:
    """Seconds measured on the first batches, per image: ``eval_s`` decoding and a forward
    pass without gradients, ``train_s`` decoding, forward and backward with every layer
    training (the dearest candidate's step); ``setup_s`` per candidate run (its model);
    ``size`` the images' side in pixels when measured."""

    eval_s: float
    train_s: float
    setup_s: float
    size: int

    def as_results(self) -> dict[str, float]:
        return {
            "eval_s_per_image": round(self.eval_s, 5),
            "train_s_per_image": round(self.train_s, 5),
            "setup_s_per_run": round(self.setup_s, 3),
            "size_px": self.size,
        }


@dataclass(frozen=True)
class Work:
    """What one candidate's round does: ``epochs`` over the images (a training step per
    training image and an evaluation per validation image, per epoch), or ``feature_passes``
    over every image (the probe: plain and mirrored) and ``fixed_s`` to fit on them;
    ``pixel_scale``: its images' area over the measured ones' (the probe's are larger)."""

    epochs: int = 0
    feature_passes: int = 0
    fixed_s: float = 0.0
    pixel_scale: float = 1.0


def work_seconds(work: Work, costs: Costs, n_train: int, n_val: int) -> float:
    """The seconds ``work`` should take on ``n_train`` training and ``n_val`` validation images."""
    per_epoch = costs.train_s * n_train + costs.eval_s * n_val
    passes = work.feature_passes * work.pixel_scale * costs.eval_s * (n_train + n_val)
    return costs.setup_s + work.fixed_s + work.epochs * per_epoch + passes


def rounds_needed(candidates: int) -> int:
    """Rounds of successive halving from ``candidates`` to one (1 for a single candidate)."""
    return max(1, math.ceil(math.log2(candidates))) if candidates > 1 else 1


def plan_fraction(
    works: Sequence[Work],
    costs: Costs,
    n_train: int,
    n_val: int,
    seconds_left: float,
    min_train: int = 0,
) -> float:
    """The fraction of the labelled images (0 to 1] with which round 0 of every candidate in
    ``works`` fits its part of ``seconds_left``: ``PLAN_SHARE`` of it over the rounds needed.
    The fixed seconds (set-up, the probe's fit) come first; what is left pays per image. Never
    below ``min_train`` training images (a candidate of one step says nothing): a budget too
    small for that is then overrun, and the candidates' stops at their shares limit by how
    much."""
    share = PLAN_SHARE * max(seconds_left, 0.0) / rounds_needed(len(works))
    fixed = sum(work_seconds(w, costs, 0, 0) for w in works)
    per_all = sum(work_seconds(w, costs, n_train, n_val) for w in works) - fixed
    if per_all <= 0:
        return 1.0
    floor = min(1.0, min_train / n_train) if n_train else 1.0
    return min(1.0, max(max(share - fixed, 0.0) / per_all, floor))


def sample_by_class(
    by_class: dict[str, list[str]], fraction: float, seed: int, salt: str = ""
) -> dict[str, list[str]]:
    """``fraction`` of each class's images (rounded up, at least ``MIN_PER_CLASS`` or all of a
    smaller class), drawn by a generator seeded by (seed, salt, class name); sorted."""
    sampled = {}
    for name, files in by_class.items():
        keep = max(min(MIN_PER_CLASS, len(files)), math.ceil(fraction * len(files)))
        chosen = sorted(files)
        random.Random(f"{seed}-{salt}-{name}").shuffle(chosen)
        sampled[name] = sorted(chosen[:keep])
    return sampled
