"""``--recipe probe``: the linear probe fitted in closed form on cached features, not by epochs.

Replaces ``fit_and_test`` for that recipe (``run.train`` picks it). The run's feature pass
(``speed/features.py``, ``choose_speed_paths``) has already stored the classifier's input of
every image; a second pass through the same cache stores the features of their mirror images.
``tasks/linear_probe.fit_probe`` then chooses the weight decay and the use of the mirrors by
5-fold CV on the training split (folds grouped by image, stratified, drawn from ``--seed``),
refits on every training row and hands back an ordinary ``nn.Linear`` head, which is written
into the model. Validation and test images are only scored, never chosen on: the choice reads
the training split alone, so the test labels cannot change it.

Outputs are a normal run's: one row of metrics.csv (epoch 0: the fitted head's training and
validation loss and accuracy), best.ckpt and last.ckpt (the same fitted model, with the card),
the test through Lightning's ``trainer.test`` on the stored features (with flip TTA chosen, on
the mean of an image's and its mirror's features: for a linear head that is the mean of the
logits, what ``--tta flip`` computes on images), and results.json's usual keys plus
``linear_probe`` (chosen weight decay, flip use, CV accuracy of every grid point).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from inat_finetune.errors import UserError
from inat_finetune.speed.features import cached_features
from inat_finetune.tasks.linear_probe import ProbeFit, fit_probe
from inat_finetune.training.checkpointing import BestAndLastCheckpoint
from inat_finetune.training.fitting import known_warnings_hidden
from inat_finetune.training.state import Fitted, PreparedRun

log = logging.getLogger(__name__)

PROBE_RECIPE = "probe"


class Mirrored:
    """A dataset transform followed by a left-right mirror of the image tensor it makes."""

    def __init__(self, transform: Any) -> None:
        self.transform = transform

    def __call__(self, image: Any) -> torch.Tensor:
        return self.transform(image).flip(-1)

    def __repr__(self) -> str:  # part of the feature cache's key: mirrored features apart
        return f"{self.transform!r}, then mirrored left-right"


class MirroredImages:
    """The run's image data module with every split's images mirrored (delegates the rest)."""

    def __init__(self, datamodule: Any) -> None:
        self.inner = datamodule

    def dataset(self, split: str) -> Any:
        dataset = self.inner.dataset(split)
        dataset.transform = Mirrored(dataset.transform)
        return dataset

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def check_probe_possible(prepared: PreparedRun) -> None:
    """The probe needs stored classifier inputs, a Linear classifier and one process."""
    speed, module = prepared.speed, prepared.module
    if not module.feature_tail:
        raise UserError(
            f"--recipe probe fits the head on cached features, but the feature cache is "
            f"{speed.feature_cache}; drop the option that turns it off (--augment, --tta, "
            "--no-feature-cache, or a --strategy that trains the backbone)"
        )
    head = prepared.model.built.head
    if not isinstance(module.model.get_submodule(head), nn.Linear):
        raise UserError(
            f"--recipe probe needs a backbone whose classifier is one Linear layer; "
            f"{prepared.config.backbone}'s is {type(module.model.get_submodule(head)).__name__}: "
            "use another --backbone or another --recipe"
        )
    if prepared.processes.world.processes > 1:
        raise UserError("--recipe probe runs in one process: drop --devices and --num-nodes")


def mirrored_features(
    prepared: PreparedRun, images: Any, progress: bool
) -> dict[str, torch.Tensor]:
    """The features of every split's mirror images (``images``: the run's image data module,
    before mirroring), through the run's feature cache."""
    config, processes, module = prepared.config, prepared.processes, prepared.module
    tail, module.feature_tail = module.feature_tail, []  # the pass runs images, not features
    try:
        cached = cached_features(
            config,
            module,
            prepared.model.built.head,
            MirroredImages(images),
            processes.accelerator,
            processes.precision,
            progress and processes.zero,
        )
    finally:
        module.feature_tail = tail
    if cached.datamodule is None:  # the plain pass was cached, so this one is too
        raise UserError(f"mirrored features could not be cached: {cached.summary}")
    return {name: ds.tensors[0] for name, ds in cached.datamodule.datasets.items()}


def set_head(module: nn.Module, head: str, fit: ProbeFit) -> None:
    """Write the fitted weight and bias into the model's classifier."""
    linear = module.model.get_submodule(head)
    with torch.no_grad():
        linear.weight.copy_(fit.weight.to(linear.weight))
        linear.bias.copy_(fit.bias.to(linear.bias))


def scores(fit: ProbeFit, plain: TensorDataset, mirrored: torch.Tensor) -> dict[str, float]:
    """Loss and accuracy of the fitted head on a split's stored features."""
    features, labels = plain.tensors
    if len(labels) == 0:
        return {"loss": float("nan"), "acc": float("nan")}
    logits = fit.logits(features, mirrored)
    return {
        "loss": float(F.cross_entropy(logits, labels)),
        "acc": float((logits.argmax(1) == labels).float().mean()),
    }


def log_epoch_row(trainer: L.Trainer, train: dict[str, float], val: dict[str, float]) -> None:
    """metrics.csv's one row: the fit as epoch 0."""
    row = {
        "epoch": 0,
        "train/loss": train["loss"],
        "train/acc": train["acc"],
        "val/loss": val["loss"],
        "val/acc": val["acc"],
    }
    for logger in trainer.loggers:
        logger.log_metrics(row, step=0)
        logger.save()


def probe_and_test(
    prepared: PreparedRun,
    trainer: L.Trainer,
    checkpoint: BestAndLastCheckpoint,
    images: Any,
    progress: bool,
) -> Fitted:
    """Fit the probe on the training split, save it as best and last, test it. ``images`` is
    the run's image data module (``run.build_datamodule``): its mirror images are cached too."""
    check_probe_possible(prepared)
    started = time.perf_counter()
    datasets = prepared.speed.datamodule.datasets
    mirrors = mirrored_features(prepared, images, progress)
    features, labels = datasets["train"].tensors
    fit = fit_probe(features, labels, prepared.config.seed, flipped=mirrors["train"])
    set_head(prepared.module, prepared.model.built.head, fit)
    log.info(
        "Linear probe: weight decay %.0e, flips %s, %d-fold CV accuracy %.4f",
        fit.weight_decay,
        fit.mode,
        fit.folds,
        fit.cv_acc,
    )
    train = scores(fit, datasets["train"], mirrors["train"])
    val = scores(fit, datasets["val"], mirrors["val"])
    if fit.tta:  # the mean features: for a linear head, the mean logits of the two views
        test_features, test_labels = datasets["test"].tensors
        datasets["test"] = TensorDataset((test_features + mirrors["test"]) / 2, test_labels)
        prepared.module.card["tta"] = "flip"
    train_time = time.perf_counter() - started
    with known_warnings_hidden():
        log_epoch_row(trainer, train, val)
        started = time.perf_counter()
        tested = trainer.test(prepared.module, datamodule=prepared.speed.datamodule, verbose=False)
    directory = checkpoint.dirpath
    for name in ("best", "last"):
        trainer.save_checkpoint(f"{directory}/{name}.ckpt", weights_only=False)
    checkpoint.best_model_path = f"{directory}/best.ckpt"
    checkpoint.best_model_score = torch.tensor(val["acc"])
    return Fitted(
        train_time_s=train_time,
        test_time_s=time.perf_counter() - started,
        final_train_acc=train["acc"],
        tested=tested[0] if tested else {},  # no test images: an auto candidate's run
        probe=fit.summary(),
    )
