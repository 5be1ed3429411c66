"""Re-score a saved model: load a self-describing checkpoint and test it on a dataset.

``find_checkpoint`` and ``load_checkpoint`` also take the folder ``export --format
safetensors`` writes (``model.safetensors`` and ``config.json``, models/safetensors_folder.py):
the network rebuilt from it computes what the checkpoint's does.

A class with no test image in the data gets accuracy None (null in JSON, n/a on screen) and
a warning, never 0%.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
from torch import nn

from inat_finetune.data.datamodule import FineTuneDataModule
from inat_finetune.data.folders import DataSplit, make_split
from inat_finetune.data.tta import tta_eval_transform, tta_mode
from inat_finetune.errors import UserError
from inat_finetune.models.backbones import Preprocessing, get_model
from inat_finetune.models.checkpoints import CARD_KEY, read_checkpoint
from inat_finetune.models.safetensors_folder import (
    WEIGHTS_FILE,
    is_safetensors_folder,
    read_safetensors_folder,
)
from inat_finetune.runfiles import write_json_atomic
from inat_finetune.runtime.devices import lightning_devices, resolve_device
from inat_finetune.runtime.hardware import resolve_channels_last, resolve_precision
from inat_finetune.tasks.classification import FineTuneModule
from inat_finetune.tasks.optim import TrainingPlan

log = logging.getLogger(__name__)


def find_checkpoint(run_or_ckpt: str | Path) -> Path:
    """A checkpoint file, a run directory's ``checkpoints/best.ckpt``, or an exported
    safetensors folder's ``model.safetensors``."""
    path = Path(run_or_ckpt)
    if path.is_dir() and is_safetensors_folder(path):
        return path / WEIGHTS_FILE
    if path.is_dir():
        best = path / "checkpoints" / "best.ckpt"
        if not best.is_file():
            raise UserError(
                f"{path}: no checkpoints/best.ckpt in this run directory; did it finish an epoch?"
            )
        return best
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint file or run directory")
    return path


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the fine-tuned network from a checkpoint alone (no ImageNet download needed),
    or from an exported folder's ``model.safetensors`` (and the ``config.json`` beside it)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        state, card = read_safetensors_folder(path.parent)
    else:
        state, card = read_lightning_checkpoint(path)
    built = get_model(card["backbone"], num_classes=len(card["class_names"]), weights=None)
    try:
        built.model.load_state_dict(state)
    except RuntimeError as exc:
        raise UserError(
            f"{path}: weights do not fit backbone {card['backbone']} with "
            f"{len(card['class_names'])} classes: {str(exc).splitlines()[0]}"
        ) from None
    return built.model.eval(), card


def read_lightning_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The network's weights (without Lightning's ``model.`` prefix) and the card."""
    checkpoint = read_checkpoint(path)  # weights_only=True; one-line errors for bad files
    card = checkpoint.get(CARD_KEY)
    if card is None:
        raise UserError(f"{path}: not an inat-finetune checkpoint (no '{CARD_KEY}' description)")
    prefix = "model."
    state = {
        k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)
    }
    return state, card


def _remap_to_checkpoint_classes(split: DataSplit, class_names: list[str]) -> DataSplit:
    unknown = sorted(set(split.classes) - set(class_names))
    if unknown:
        raise UserError(
            f"--data {split.root}: classes {unknown} are unknown to the checkpoint, which knows "
            f"{class_names}"
        )
    return replace(split, classes=list(class_names))


def evaluate(
    run_or_ckpt: str | Path,
    data: str | Path | None = None,
    batch_size: int = 32,
    num_workers: int | None = None,
    device: str = "auto",
    precision: str = "auto",
    progress: bool = True,
    tta: str = "none",
) -> dict[str, Any]:
    """Test accuracy and per-class accuracy of a checkpoint on a dataset's test split.

    Without ``data`` a run directory is re-scored on the test split saved in its ``split.json``.
    ``tta``: ``none``, ``flip`` (mean logits of the image and its mirror image) or
    ``multicrop`` (centre and four corner crops, each also mirrored); see ``data/tta.py``.
    ``device``: auto, cpu, cuda, cuda:N or mps (``runtime.devices``).
    """
    tta = tta_mode(tta)
    acc, devices = lightning_devices(resolve_device(device))  # a missing GPU: refused first
    ckpt = find_checkpoint(run_or_ckpt)
    model, card = load_checkpoint(ckpt)
    run_dir = ckpt.parent.parent
    if data is not None:
        split = make_split(data, progress=progress)
    elif (run_dir / "split.json").is_file():
        split = DataSplit.load(run_dir / "split.json")
    else:
        raise UserError(f"{ckpt}: pass --data; there is no split.json next to this checkpoint")
    split = _remap_to_checkpoint_classes(split, card["class_names"])
    preprocessing = Preprocessing.from_dict(card["preprocessing"])
    datamodule = FineTuneDataModule(
        split,
        preprocessing,
        batch_size,
        num_workers,
        augment=False,
        test_transform=tta_eval_transform(preprocessing, tta, normalise=False),
    )
    module = FineTuneModule(
        model, card, channels_last=resolve_channels_last(None, acc), plan=TrainingPlan(tta=tta)
    )
    trainer = L.Trainer(
        accelerator=acc,
        devices=devices,
        precision=resolve_precision(precision, acc),
        logger=False,
        enable_progress_bar=progress,
        enable_model_summary=False,
    )
    tested = trainer.test(module, datamodule=datamodule, verbose=False)
    classes = card["class_names"]
    warn_untested_classes(classes, module.test_report["per_class_acc"])
    return {
        "checkpoint": str(ckpt),
        "data": split.root,
        "num_test_images": sum(len(v) for v in split.test.values()),
        "tta": tta,
        "test_acc": float(tested[0]["test/acc"]),
        "test_loss": float(tested[0]["test/loss"]),
        "per_class_test_acc": dict(zip(classes, module.test_report["per_class_acc"], strict=True)),
        "confusion_matrix": module.test_report["confusion_matrix"],
        "class_names": classes,
    }


def warn_untested_classes(classes: list[str], per_class: list[float | None]) -> list[str]:
    """Warn about the classes with no test image (accuracy None: n/a, not 0%); their names."""
    untested = [c for c, acc in zip(classes, per_class, strict=True) if acc is None]
    if untested:
        log.warning(
            "%d class(es) have no test images here: %s; their accuracy is n/a (null)",
            len(untested),
            ", ".join(untested),
        )
    return untested


def save_evaluation(result: dict[str, Any], path: str | Path) -> Path:
    return write_json_atomic(path, result)
