"""The state that ``train``'s phases hand to each other (see ``run``), one dataclass per decision.

``Processes`` is decided first (``setup.prepare_processes``); ``ModelAndPlan``, ``RunDirectory``,
``BatchAndLr`` and ``SpeedPaths`` by the phases in ``run``; ``PreparedRun`` bundles them for the
phases after the Trainer is built (``fitting``, ``outputs``), and ``Fitted`` is what fitting and
testing measured. Plain data: no phase logic lives here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L

from inat_finetune.data.folders import DataSplit
from inat_finetune.models.backbones import BuiltModel, Preprocessing
from inat_finetune.models.freezing import FreezeSummary
from inat_finetune.runtime.distributed import World
from inat_finetune.tasks.classification import FineTuneModule
from inat_finetune.tasks.optim import TrainingPlan
from inat_finetune.training.config import TrainConfig


@dataclass(frozen=True)
class Processes:
    """Where this process trains and with whom: decided once, before the data is scanned."""

    accelerator: str
    precision: str
    channels_last: bool
    world: World
    zero: bool  # this is global rank 0: it scans the data and writes the files


@dataclass
class ModelAndPlan:
    """The backbone with its new head, frozen for the first epoch, and the recipe's plan."""

    built: BuiltModel
    preprocessing: Preprocessing  # training-time, at --img-size
    test_preprocessing: Preprocessing  # at --test-img-size: what evaluate/predict apply
    plan: TrainingPlan
    summary: FreezeSummary


@dataclass(frozen=True)
class RunDirectory:
    """Where the run writes: a new directory, or the stopped run's own when resuming."""

    path: Path
    resuming: bool  # continuing a stopped run in place: its files are rewritten before fit


@dataclass(frozen=True)
class BatchAndLr:
    """``--batch-size`` is per process; DDP averages the gradients, so a step sees the global
    batch, and ``--scale-lr`` scales ``--lr`` (tuned for a batch of 32) to it."""

    global_batch: int
    lr: float


@dataclass
class SpeedPaths:
    """The faster ways through this run that ``choose_speed_paths`` took, and why not others.

    Each field is what results.json's ``speed_paths`` records: a cache's summary says whether
    it was used, built or read, or why it was off ("not needed (features cached)").
    """

    datamodule: L.LightningDataModule  # images (prepared or decoded) or stored features
    image_cache: str
    feature_cache: str
    compile: bool
    depthwise_grad: str
    allocator: str

    def as_results(self) -> dict[str, Any]:
        """results.json's ``speed_paths``, its keys in their order."""
        return {
            "image_cache": self.image_cache,
            "feature_cache": self.feature_cache,
            "compile": self.compile,
            "workers": self.datamodule.num_workers,
            "depthwise_grad": self.depthwise_grad,
            "allocator": self.allocator,
            "augmentation": self.augmentation,
        }

    @property
    def augmentation(self) -> str:
        """Where the training images are augmented (``--augment-on``), or why they are not."""
        batch_augment = getattr(self.datamodule, "batch_augment", None)
        if batch_augment is not None:
            crops = "in the loader" if batch_augment.crops_in_loader else "on the device"
            return f"on the device, per batch (crops {crops})"
        if getattr(self.datamodule, "augment", False):
            return "per image, in the loader"
        return "off"


@dataclass
class PreparedRun:
    """Everything the phases before the Trainer decided, handed to the phases after it."""

    config: TrainConfig
    split: DataSplit
    processes: Processes
    model: ModelAndPlan
    run: RunDirectory
    module: FineTuneModule
    batch: BatchAndLr
    speed: SpeedPaths


@dataclass
class Fitted:
    """What fitting and testing measured; ``lr_find_only`` when a range test ended the run."""

    train_time_s: float = 0.0
    test_time_s: float = 0.0
    final_train_acc: float = float("nan")
    tested: dict[str, float] | None = None
    lr_find_only: dict[str, Any] | None = None
    probe: dict[str, Any] | None = None  # --recipe probe: results.json's linear_probe
