"""How ``--recipe auto`` keeps to a time budget (``--budget 10m``): what an image costs, how many
images the choice uses, and when a candidate's run stops.

Contract. A time budget is the choice's: measuring the costs and every candidate's runs, not
the scan of the data before it nor the final training of the winner (results.json's
``auto.budget_covers`` says so). Before the candidates, ``measure_costs`` times one batch of
decoding + forward without gradients and one of decoding + forward + backward with every layer
training (the dearest candidate's step), each after a warm-up batch, on a few labelled images
at the run's image size. ``auto_plan.plan_fraction`` turns those seconds per image into the
fraction of the labelled images that round 0 of every candidate can use in its part of the
budget; ``choice_split`` draws it per class (``auto_plan.sample_by_class``, seeded by ``--seed``)
from train and from validation. results.json's ``auto.sample`` records the fraction, the
images used and the measured costs. Every candidate run of the choice (an epoch budget's too)
gets a split without test images: the choice never reads a test label, and no candidate spends
time on a test pass.

While a candidate trains, ``ShareStop`` ends its run between two batches once its planned
seconds (``auto_plan.work_seconds``) times ``SLACK`` are spent, or at the budget's end;
Lightning then validates the epoch it stopped in, so the candidate keeps a score, and its round
records how far it got (``interrupted``: steps done of the steps planned). The probe's feature
passes and its fit cannot stop midway: the sample bounds the passes, and the fit is costed as a
fixed ``auto_plan.PROBE_FIT_S``. The sample never drops under ``auto_plan.MIN_TRAIN_BATCHES``
batches of training images: a budget too small for that ends at the deadline, overrun only by
the run under way then (its next batch and its validation; the probe's run whole), since no
candidate starts after it once one has a score.

Why measured, not looked up: the seconds per image depend on the backbone, the image size, the
machine and its load (two shared cores here), and one batch of each kind costs a few seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from itertools import zip_longest
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from torch.nn import functional as F

from inat_finetune.data.datamodule import ImageListDataset, build_eval_transform
from inat_finetune.data.folders import DataSplit
from inat_finetune.experiments.auto_plan import Costs, sample_by_class
from inat_finetune.models.backbones import get_model
from inat_finetune.training.config import TrainConfig

SLACK = 1.5  # a candidate's run stops at this times its planned seconds


RUN_SETUP_S = 2.0  # a candidate run's set-up besides building its model: trainer, files, loaders


MEASURE_BATCH = 8  # images per measured batch (one warm-up and one timed batch of each kind)


Clock = Callable[[], float]


def measure_costs(config: TrainConfig, split: DataSplit, clock: Clock = time.perf_counter) -> Costs:
    """Seconds per image of evaluation and of training, timed on the first labelled images."""
    started = clock()
    built = get_model(config.backbone, num_classes=len(split.classes), weights=config.weights)
    setup_s = clock() - started + RUN_SETUP_S
    preprocessing = built.preprocessing.at_size(config.img_size)
    samples = first_samples(split, 2 * min(MEASURE_BATCH, config.batch_size))
    images = ImageListDataset(
        samples, build_eval_transform(preprocessing, normalise=True), preprocessing.resize_size
    )
    half = len(images) // 2
    model = built.model
    timed = [range(0, half), range(half, len(images))]

    def evaluate(batch: torch.Tensor, labels: torch.Tensor) -> None:
        with torch.no_grad():
            model.eval()(batch)

    def train(batch: torch.Tensor, labels: torch.Tensor) -> None:
        model.train()
        F.cross_entropy(model(batch), labels).backward()
        model.zero_grad(set_to_none=True)

    eval_s = seconds_per_image(evaluate, images, timed, clock)
    train_s = seconds_per_image(train, images, timed, clock)
    return Costs(eval_s=eval_s, train_s=train_s, setup_s=setup_s, size=preprocessing.crop_size)


def first_samples(split: DataSplit, count: int) -> list[tuple[Any, int]]:
    """Up to ``count`` labelled images (at least two), one of each class in turn."""
    by_label: dict[int, list[tuple[Any, int]]] = {}
    for path, label in split.samples("train") + split.samples("val"):
        by_label.setdefault(label, []).append((path, label))
    chosen = [s for row in zip_longest(*by_label.values()) for s in row if s is not None]
    chosen = chosen[:count]
    return (chosen * 2)[: max(2, len(chosen))]


def seconds_per_image(
    step: Callable[[torch.Tensor, torch.Tensor], None],
    images: ImageListDataset,
    batches: list[range],
    clock: Clock,
) -> float:
    """``step`` on each batch of ``images`` (decoded inside the timing); the last batch's seconds
    per image (the first ones warm up: allocations, lazy initialisation)."""
    seconds, count = 0.0, 1
    for indices in batches:
        started = clock()
        pairs = [images[i] for i in indices]
        batch = torch.stack([image for image, _ in pairs])
        labels = torch.tensor([label for _, label in pairs])
        step(batch, labels)
        seconds, count = clock() - started, max(1, len(pairs))
    return seconds / count


def choice_split(split: DataSplit, fraction: float, seed: int) -> DataSplit:
    """What the candidates train and validate on: ``fraction`` of train and of validation, per
    class, and no test image (nor a carved test fraction for the leak guard to clean)."""
    if fraction >= 1.0:
        train, val = split.train, split.val
    else:
        train = sample_by_class(split.train, fraction, seed, "train")
        val = sample_by_class(split.val, fraction, seed, "val")
    empty: dict[str, list[str]] = {name: [] for name in split.classes}
    return replace(split, train=train, val=val, test=empty, test_fraction=None)


class ShareStop(Callback):
    """Ends a candidate's training between two batches at ``deadline`` (a ``clock`` value);
    ``stopped_at`` then says how far it got. Lightning still validates the epoch it stopped in,
    so the candidate has a score."""

    def __init__(self, deadline: float, clock: Clock = time.perf_counter) -> None:
        self.deadline, self.clock = deadline, clock
        self.stopped_at: dict[str, Any] | None = None

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        if self.stopped_at is None and self.clock() >= self.deadline:
            trainer.should_stop = True
            planned = trainer.estimated_stepping_batches
            self.stopped_at = {
                "steps": int(trainer.global_step),
                "of_steps": int(planned) if planned != float("inf") else None,
                "epoch": int(trainer.current_epoch),
            }
