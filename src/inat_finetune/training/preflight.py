"""Checks before a run starts, for settings Lightning would only reject deep inside ``fit``.

A typo in ``--precision`` or ``--accelerator cuda`` on a machine without a GPU should cost the
user one line and no run directory, not a traceback after the data scan. A class with no
validation or test image is warned about: its accuracy there cannot be measured, and results
show it as n/a (null in results.json), not 0%.
"""

from __future__ import annotations

import logging
import re

import torch

from inat_finetune.data.folders import DataSplit
from inat_finetune.errors import UserError
from inat_finetune.runtime.extras import require_extra
from inat_finetune.training.config import TrainConfig

log = logging.getLogger(__name__)


PRECISIONS = ("auto", "32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true")


ACCELERATORS = ("auto", "cpu", "cuda", "gpu", "mps")


def _accelerator_available(name: str) -> bool:
    if name in ("cuda", "gpu"):
        return torch.cuda.is_available()
    if name == "mps":
        return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    return True


def check_machine(config: TrainConfig) -> None:
    """The settings that must hold before processes are planned: precision, accelerator."""
    if config.precision not in PRECISIONS:
        raise UserError(
            f"--precision {config.precision}: unknown; use one of {', '.join(PRECISIONS)}"
        )
    if config.accelerator not in ACCELERATORS:
        raise UserError(
            f"--accelerator {config.accelerator}: unknown; use one of {', '.join(ACCELERATORS)}"
        )
    if not _accelerator_available(config.accelerator):
        raise UserError(
            f"--accelerator {config.accelerator}: not available on this machine; "
            "use --accelerator auto (or cpu)"
        )
    if config.wandb:
        require_extra("wandb", "--wandb")


def preflight(config: TrainConfig, split: DataSplit) -> None:
    """Raise a one-line UserError for settings that cannot run here; warn about odd ones."""
    check_machine(config)
    if not re.fullmatch(r"auto|-1|\d+|\d+(,\d+)*,?", config.devices):
        raise UserError(
            f"--devices {config.devices}: use auto, a count (1, 2, ...), a list (0,1) or -1 for all"
        )
    warn_classes_without_images(split)
    n_train = sum(map(len, split.train.values()))
    if config.batch_size > n_train:
        log.warning(
            "--batch-size %d is larger than the %d training images: each epoch is one batch of %d",
            config.batch_size,
            n_train,
            n_train,
        )
    elif n_train % config.batch_size == 1 and n_train > 1:
        log.warning(
            "%d training images in batches of %d leave a last batch of 1, which BatchNorm cannot "
            "train on; it is dropped (a different image each epoch)",
            n_train,
            config.batch_size,
        )


def warn_classes_without_images(split: DataSplit) -> list[str]:
    """Warn, once per split, about classes with no validation or test image; the warnings."""
    counts = split.counts()
    warnings = []
    for name, label in (("val", "validation"), ("test", "test")):
        empty = [c for c in split.classes if counts[name][c] == 0]
        if name == "test" and len(empty) == len(split.classes):
            continue  # no test split at all: an auto candidate's run, which tests nothing
        if empty:
            warnings.append(
                f"{len(empty)} class(es) have no {label} images: {', '.join(empty)}; their "
                f"{label} accuracy cannot be measured (shown as n/a); add images to them"
            )
            log.warning("%s", warnings[-1])
    return warnings
