"""The fine-tuning task as a Lightning module: ``FineTuneModule``.

Cross-entropy (with the recipe's label smoothing and class weights on the training loss only),
accuracy per split, per-class test accuracy, the confusion matrix and the test probabilities in
loader order. The optimiser, schedule, EMA, batch mixing, staged unfreezing and TTA come from a
``TrainingPlan`` (``tasks.optim``). ``card`` describes the model and is stored in every
checkpoint (``models.checkpoints``), so a checkpoint alone rebuilds and uses the model: ``FineTuneModule.load_from_checkpoint(path)``
works as Lightning users expect, rebuilding the network from the card (no ImageNet download) and
reading the file with ``weights_only=True``. Training (``training``) and inference (``inference``) both build on this module.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torchmetrics
from torch import nn

from inat_finetune.data.augment import batch_mixer, dominant_labels
from inat_finetune.data.tta import tta_logits
from inat_finetune.errors import UserError
from inat_finetune.models.backbones import get_model
from inat_finetune.models.checkpoints import CARD_KEY, read_checkpoint
from inat_finetune.models.freezing import hold_frozen_batchnorm
from inat_finetune.models.stages import apply_start
from inat_finetune.runtime.distributed import (
    gather_shards,
)
from inat_finetune.speed.features import run_bypassing, run_tail
from inat_finetune.tasks.optim import (
    TrainingPlan,
    build_optimizer,
    build_scheduler,
    make_ema,
    param_groups,
    swap_ema_for_loading,
    swap_ema_for_saving,
)

log = logging.getLogger(__name__)

STAGE_KEY = "inat_finetune_stage"  # the first trainable stage when the checkpoint was saved


class FineTuneModule(L.LightningModule):
    """A classifier being fine-tuned: cross-entropy, accuracy per split, per-class test metrics.

    ``card`` describes the model (backbone, class names, head, preprocessing, strategy) and is
    stored in every checkpoint, so a checkpoint alone is enough to rebuild and use the model.
    """

    def __init__(
        self,
        model: nn.Module,
        card: dict[str, Any],
        lr: float = 1e-3,
        optimizer: str = "adam",
        weight_decay: float = 0.0,
        frozen_bn: str = "eval",
        channels_last: bool = False,
        plan: TrainingPlan | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.card = card
        self.lr = lr
        self.optimizer_name = optimizer
        self.weight_decay = weight_decay
        self.frozen_bn = frozen_bn
        self.channels_last = channels_last
        num_classes = len(card["class_names"])
        self.criterion = nn.CrossEntropyLoss()
        accuracy = torchmetrics.classification.MulticlassAccuracy
        self.train_acc = accuracy(num_classes, average="micro")
        # The training metrics' running sums are saved in checkpoints (persistent states) and
        # logged by on_train_epoch_end, so an epoch resumed from any checkpoint, even one taken
        # mid-epoch, reports what the uninterrupted epoch would have.
        self.train_loss = torchmetrics.MeanMetric()
        self.train_acc.persistent(True)
        self.train_loss.persistent(True)
        self.val_acc = accuracy(num_classes, average="micro")
        self.test_acc = accuracy(num_classes, average="micro")
        self.test_per_class = accuracy(num_classes, average="none")
        self.test_confusion = torchmetrics.classification.MulticlassConfusionMatrix(num_classes)
        # Losses as metric objects: under DDP they reduce exactly (sum and count across ranks)
        # also when ranks hold different numbers of images, which Lightning's sync_dist mean of
        # a plain tensor gets wrong (it averages the counts in integer arithmetic: Lightning
        # issue 21859). train_loss, above, is one too.
        self.val_loss = torchmetrics.MeanMetric()
        self.test_loss = torchmetrics.MeanMetric()
        self.test_report: dict[str, Any] = {}
        # Set by train() when batches hold stored backbone features instead of images
        # (speed/features.py): the dotted names of the modules that map features to logits.
        self.feature_tail: list[str] = []
        # ... or the stored outputs of the frozen prefix, these leading blocks (speed/features.py).
        self.feature_prefix: list[str] = []
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        # Stages, schedules, EMA, mixing, smoothing, TTA (tasks/optim.py); the defaults are the seed's.
        self.plan = plan or TrainingPlan()
        self.stage_start: int | None = None
        if self.plan.unfreeze is not None:
            self.apply_stage(self.plan.unfreeze.start_at(0))
        weights = self.plan.class_weights
        self.register_buffer(
            "class_weights", torch.tensor(weights) if weights else None, persistent=False
        )
        self.mixer = batch_mixer(num_classes, self.plan.mixup_alpha, self.plan.cutmix_alpha)
        self.ema = make_ema(self.model, self.plan.ema_decay) if self.plan.ema_decay else None

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls,
        checkpoint_path: str | Path,
        map_location: Any = None,
        **kwargs: Any,
    ) -> FineTuneModule:
        """The module of a saved checkpoint, in eval mode, holding the weights the run kept.

        Lightning's own version calls ``__init__`` with saved hyperparameters, which cannot hold
        the network; the card can: the backbone is rebuilt from it (``weights=None``, no download)
        and the ``model.*`` weights loaded (the EMA weights when the run averaged them). Keyword
        arguments go to ``__init__`` (``lr``, ``plan``, ...) for training on from here.
        """
        path = Path(checkpoint_path)
        checkpoint = read_checkpoint(path, map_location=map_location or "cpu")
        card = checkpoint.get(CARD_KEY)
        if card is None:
            raise UserError(
                f"{path}: not an inat-finetune checkpoint (no '{CARD_KEY}' description); "
                "pass a checkpoint written by `inat-finetune train`"
            )
        built = get_model(card["backbone"], num_classes=len(card["class_names"]), weights=None)
        prefix = "model."
        weights = {
            k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)
        }
        built.model.load_state_dict(weights)
        module = cls(built.model, card, **kwargs)
        if STAGE_KEY in checkpoint and module.plan.unfreeze is not None:
            module.apply_stage(int(checkpoint[STAGE_KEY]))
        return module.eval()

    def apply_stage(self, start: int) -> None:
        """Train from stage number ``start`` on (see models/stages.py)."""
        if start != self.stage_start and self.plan.unfreeze is not None:
            apply_start(self.model, self.plan.unfreeze.stages, start)
            self.stage_start = start

    def train(self, mode: bool = True) -> FineTuneModule:
        super().train(mode)
        if mode and self.frozen_bn == "eval":
            hold_frozen_batchnorm(self.model)
        return self

    def on_train_epoch_start(self) -> None:
        # Lightning (>= 2.2) never calls train() itself: it keeps whatever modes the modules
        # have and restores them after validation. Set them here, every epoch, after the
        # unfreezing schedule has said which layers train (frozen BatchNorm is held in eval).
        unfreeze = self.plan.unfreeze
        if unfreeze is not None:
            start = unfreeze.start_at(self.current_epoch)
            if start != self.stage_start:
                log.info("Epoch %d: %s", self.current_epoch, unfreeze.describe(start))
            self.apply_stage(start)
        self.train()

    def on_train_start(self) -> None:
        # A run resumed mid-epoch starts without on_train_epoch_start: set the modes here too.
        self.train()

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # Here, not in on_train_batch_end: checkpoints written at the end of a step (periodic,
        # SIGTERM) are saved by callbacks before the module's on_train_batch_end runs, and must
        # hold the average that includes this step. global_step counts this step only after
        # the hook returns, hence + 1.
        if self.ema is not None:
            self.ema.update(self.model, step=self.global_step + 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            raise TypeError(
                "uint8 images reached the model: FineTuneDataModule's loaders hand over uint8 "
                "and normalise in its on_after_batch_transfer; give the Trainer the datamodule "
                "(datamodule=...), or build it with normalise_on_device=False"
            )
        if self.feature_tail:
            return run_tail(self.model, self.feature_tail, images)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.feature_prefix:
            return run_bypassing(self.model, self.feature_prefix, images)
        if self.ema is not None and not self.training:
            return self.ema.module(images)  # EMA on: the averaged weights are the model
        return self.model(images)

    def _shared_step(
        self, batch: Any, stage: str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images, labels = batch
        if stage == "test" and self.plan.tta != "none":
            crop = int(self.card["preprocessing"]["crop_size"])
            logits = tta_logits(self, images, self.plan.tta, crop)
        else:
            logits = self(images)
        if stage == "train":
            # Label smoothing and class weights shape the training loss only; validation and
            # test report plain cross-entropy, comparable between recipes.
            loss = nn.functional.cross_entropy(
                logits,
                labels,
                weight=self.class_weights,
                label_smoothing=self.plan.label_smoothing,
            )
            # Logged by on_train_epoch_end from states that checkpoints carry (resume).
            self.train_loss.update(loss.detach(), weight=len(labels))
            return loss, logits, labels
        loss = self.criterion(logits, labels)
        mean_loss = getattr(self, f"{stage}_loss")
        mean_loss.update(loss.detach(), weight=len(labels))
        self.log(f"{stage}/loss", mean_loss, on_step=False, on_epoch=True)
        return loss, logits, labels

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.mixer is not None:
            batch = self.mixer(*batch)  # labels become soft targets of shape (B, C)
        loss, logits, labels = self._shared_step(batch, "train")
        if labels.ndim == 2:  # mixup/cutmix: accuracy against the dominant class
            labels = dominant_labels(labels)
        self.train_acc.update(logits, labels)
        return loss

    def on_train_epoch_end(self) -> None:
        self.log("train/loss", self.train_loss.compute())
        self.log("train/acc", self.train_acc.compute(), prog_bar=True)
        self.train_loss.reset()
        self.train_acc.reset()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        _, logits, labels = self._shared_step(batch, "val")
        self.val_acc(logits, labels)
        self.log("val/acc", self.val_acc, on_step=False, on_epoch=True, prog_bar=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        _, logits, labels = self._shared_step(batch, "test")
        self.test_acc(logits, labels)
        self.test_per_class.update(logits, labels)
        self.test_confusion.update(logits, labels)
        self.log("test/acc", self.test_acc, on_step=False, on_epoch=True)
        self._test_probabilities.append(logits.float().softmax(dim=1).cpu())

    def on_test_epoch_start(self) -> None:
        self._test_probabilities: list[torch.Tensor] = []

    def on_test_epoch_end(self) -> None:
        probabilities = torch.cat(self._test_probabilities) if self._test_probabilities else None
        if probabilities is not None and self.trainer.world_size > 1:
            # Each rank tested its ShardSampler shard; put the rows back in dataset order.
            probabilities = gather_shards(probabilities)
        confusion = self.test_confusion.compute().cpu()
        self.test_report = {
            # None (results.json: null, shown as n/a) for a class with no test image: its
            # accuracy is unknown, not 0.
            "per_class_acc": [
                acc if int(support) else None
                for acc, support in zip(
                    self.test_per_class.compute().float().cpu().tolist(),
                    confusion.sum(dim=1).tolist(),
                    strict=True,
                )
            ],
            "confusion_matrix": confusion.tolist(),
            # In test-loader order (no shuffling), i.e. the order of DataSplit.samples("test").
            "probabilities": probabilities,
        }
        self.test_per_class.reset()
        self.test_confusion.reset()

    def configure_optimizers(self) -> Any:
        # Every parameter, frozen or not, in groups fixed by the architecture (tasks/optim.py): a
        # resumed run rebuilds the same groups before Lightning loads the optimizer state.
        plan = self.plan
        groups = param_groups(
            self.model,
            plan.stages,
            self.lr,
            self.weight_decay,
            plan.backbone_lr_scale,
            plan.layer_decay,
        )
        optimizer = build_optimizer(self.optimizer_name, groups, self.lr)
        if plan.lr_schedule == "constant" and not plan.warmup_epochs:
            return optimizer  # the seed's: no schedule
        scheduler = build_scheduler(optimizer, plan, self._total_steps(), self.trainer.max_epochs)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def _total_steps(self) -> int:
        """Optimizer steps in the whole run, for the learning-rate schedule."""
        trainer = self.trainer
        if trainer.datamodule is None:
            return int(trainer.estimated_stepping_batches)
        # Not trainer.estimated_stepping_batches: it sets up Lightning's train loader before a
        # resumed run has restored the loader's position, and Lightning then never restores it
        # (the run would start its interrupted epoch over). Count a loader of our own instead.
        batches = len(trainer.datamodule.train_dataloader())
        return max(1, batches // trainer.accumulate_grad_batches) * trainer.max_epochs

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CARD_KEY] = self.card
        if self.stage_start is not None:
            checkpoint[STAGE_KEY] = self.stage_start
        if self.ema is not None:
            swap_ema_for_saving(checkpoint["state_dict"])

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lightning calls this before configure_optimizers when resuming: restore the stage so
        # the trainable set is the saved one from the first step.
        if self.ema is not None:
            swap_ema_for_loading(checkpoint["state_dict"])
        if STAGE_KEY in checkpoint and self.plan.unfreeze is not None:
            self.apply_stage(int(checkpoint[STAGE_KEY]))
