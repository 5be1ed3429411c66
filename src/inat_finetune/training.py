"""Fine-tuning with PyTorch Lightning: the task module and ``train(config)``.

``train`` is the whole experiment for one configuration: scan and split the data, build the
backbone with a new head, freeze by strategy, fit with the best checkpoint kept by validation
accuracy, test that checkpoint, and write everything to a fresh run directory:

    runs/<timestamp>-<name>/
        config.yaml        the resolved configuration (pass it back with --config)
        split.json         which image is in train / val / test, and what was skipped
        dataset.json       images per class per split, skipped files and why
        metrics.csv        per-epoch train/val loss and accuracy (Lightning's CSVLogger)
        checkpoints/       best.ckpt (by val accuracy) and last.ckpt, self-describing
        results.json       test accuracy of best.ckpt, per-class accuracy, parameter counts, times
        test_predictions.csv  per test image: path, true and predicted class, probabilities
        run.lock           while the run trains: held by its process (runlock), then removed

results.json agrees with best.ckpt: ``best_epoch`` is the epoch best.ckpt holds, the first with
the highest val/acc in metrics.csv, ``best_val_acc`` that value, ``test_acc`` best.ckpt's on the
test split. A resumed run (``run_dir`` given) writes its files only once its model, data and
caches are ready, right before training restarts (see ``resume``).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torchmetrics
from lightning.pytorch.callbacks import Callback, EarlyStopping
from lightning.pytorch.loggers import Logger, WandbLogger
from torch import nn

from inat_finetune.allocator import freed_memory_kept
from inat_finetune.augment import batch_mixer, build_recipe_train_transform, dominant_labels
from inat_finetune.checkpointing import (
    AtomicCheckpointIO,
    BestAndLastCheckpoint,
    NonFiniteLossError,
    ResumeState,
    RunCSVLogger,
    StopOnNonFiniteLoss,
    periodic_last_checkpoint,
)
from inat_finetune.config import TrainConfig
from inat_finetune.data import DataSplit, FineTuneDataModule, default_num_workers, make_split
from inat_finetune.depthwise_grad import use_fast_depthwise_grad
from inat_finetune.distributed import (
    broadcast_from_zero,
    check_shardable,
    gather_shards,
    is_global_zero,
    join_launched_group,
    plan_world,
    rank_zero_first,
    scaled_lr,
    shared_directory,
)
from inat_finetune.features import cached_features, run_bypassing, run_tail
from inat_finetune.freezing import FreezeSummary, hold_frozen_batchnorm
from inat_finetune.models import get_model
from inat_finetune.optim import (
    TrainingPlan,
    build_optimizer,
    build_scheduler,
    make_ema,
    param_groups,
    plan_from_config,
    swap_ema_for_loading,
    swap_ema_for_saving,
)
from inat_finetune.prepared import prepared_images_for
from inat_finetune.recipes import recipe_card, recipe_results
from inat_finetune.runfiles import (
    new_run_dir,
    write_json_atomic,
    write_text_atomic,
    write_yaml_atomic,
)
from inat_finetune.runlock import run_lock
from inat_finetune.stages import apply_start
from inat_finetune.tta import tta_eval_transform, tta_logits

log = logging.getLogger(__name__)

CARD_KEY = "inat_finetune"  # where a checkpoint keeps what is needed to use it
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
        # (features.py): the dotted names of the modules that map features to logits.
        self.feature_tail: list[str] = []
        # ... or the stored outputs of the frozen prefix, these leading blocks (features.py).
        self.feature_prefix: list[str] = []
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        # Stages, schedules, EMA, mixing, smoothing, TTA (optim.py); the defaults are the seed's.
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

    def apply_stage(self, start: int) -> None:
        """Train from stage number ``start`` on (see stages.py)."""
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
        # Every parameter, frozen or not, in groups fixed by the architecture (optim.py): a
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


def cpu_supports_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_accelerator(accelerator: str) -> str:
    if accelerator != "auto":
        return accelerator
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_precision(precision: str, accelerator: str) -> str:
    """bf16 autocast where the hardware computes it natively, fp32 where it does not."""
    if precision != "auto":
        return precision
    if accelerator == "cuda":
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    if accelerator == "cpu" and cpu_supports_bf16():
        return "bf16-mixed"
    return "32-true"


def resolve_channels_last(channels_last: bool | None, accelerator: str) -> bool:
    return accelerator in ("cuda", "cpu") if channels_last is None else channels_last


@dataclass
class RunResult:
    run_dir: Path
    results: dict[str, Any]


def build_loggers(config: TrainConfig, run_dir: Path) -> list[Logger]:
    from inat_finetune.resume import resumed_wandb_run

    loggers: list[Logger] = [RunCSVLogger(save_dir=run_dir, name="", version="")]
    if config.wandb:
        loggers.append(
            WandbLogger(
                **resumed_wandb_run(run_dir),
                project=config.wandb_project,
                name=run_dir.name,
                save_dir=str(run_dir),
                group=config.wandb_group,
                config=config.to_yaml_dict(),
            )
        )
    return loggers


def model_card(
    config: TrainConfig, split: DataSplit, built: Any, preprocessing: Any, summary: FreezeSummary
) -> dict[str, Any]:
    return {
        "backbone": config.backbone,
        "source_weights": built.weights,
        "class_names": split.classes,
        "head": built.head,
        "preprocessing": preprocessing.to_dict(),
        "strategy": config.strategy,
        "freeze_percent": config.freeze_percent,
        "frozen_bn": config.frozen_bn,
        "trainable_params": summary.trainable_params,
        "total_params": summary.total_params,
    }


def guard_test_set(split: DataSplit) -> DataSplit:
    """Keep copies of training images out of the test set before any training starts.

    A test set on disk (nature_12K's val/) with such copies is refused: the user must fix it.
    A test set carved out here is cleaned: its leaked copies are dropped and counted; if none
    is left, the data is refused too.
    """
    from inat_finetune.datacheck import assert_no_leakage, drop_leaked_test_images
    from inat_finetune.errors import UserError

    if split.test_fraction is not None:
        cleaned = drop_leaked_test_images(split)
        if not any(cleaned.test.values()):  # nothing left to test on: the run would crash
            raise UserError(
                f"{split.root}: every image of the carved test set is a copy of a training or "
                f"validation image; delete the copies (`inat-finetune check-data {split.root}` "
                "lists them)"
            )
        return cleaned
    assert_no_leakage(split)
    return split


def train(
    config: TrainConfig,
    split: DataSplit | None = None,
    progress: bool = True,
    report: bool = True,
    run_dir: Path | None = None,
    ckpt_path: Path | None = None,
    callbacks: list[Callback] | None = None,
    share_features_with: Sequence[str] = (),
) -> RunResult:
    """Run one fine-tuning experiment end to end; see the module docstring for its outputs.

    ``run_dir`` and ``ckpt_path`` continue a stopped run in place (``resume.resume_run``).
    With several processes (``--devices``/``--num-nodes``, torchrun, srun) every process calls
    this; rank 0 alone scans the data, creates the run directory and writes files (see
    ``distributed``). ``callbacks`` are extra Lightning callbacks (the sweep's pruning).
    ``share_features_with`` names the strategies that later runs with this config will train
    (``compare``): a feature pass over the whole backbone stores their frozen prefixes too.
    """
    # On the CPU, freed memory is kept for reuse while the run lasts (allocator.py).
    keep = config.reuse_freed_memory and resolve_accelerator(config.accelerator) == "cpu"
    with freed_memory_kept(keep) as allocator, contextlib.ExitStack() as held:
        return _train(
            config,
            split,
            progress,
            report,
            run_dir,
            ckpt_path,
            callbacks,
            share_features_with,
            allocator,
            held,
        )


def _train(
    config: TrainConfig,
    split: DataSplit | None,
    progress: bool,
    report: bool,
    run_dir: Path | None,
    ckpt_path: Path | None,
    callbacks: list[Callback] | None,
    share_features_with: Sequence[str],
    allocator: str,
    held: contextlib.ExitStack,
) -> RunResult:
    from inat_finetune.errors import UserError
    from inat_finetune.preflight import check_machine, preflight

    if config.data is None and split is None:
        raise UserError("--data is required: the folder that holds the images")
    check_machine(config)  # before planning processes: their errors would hide this one
    accelerator = resolve_accelerator(config.accelerator)
    world = plan_world(config.devices, config.num_nodes, accelerator)
    join_launched_group(accelerator)
    zero = is_global_zero()
    L.seed_everything(config.seed, workers=True, verbose=False)
    given_split = split

    def scan() -> DataSplit:
        found = given_split or make_split(
            config.data,
            config.seed,
            config.val_fraction,
            config.test_fraction,
            progress=progress and zero,
        )
        return guard_test_set(found)

    split = broadcast_from_zero(scan)
    preflight(config, split)
    counts = {k: sum(v.values()) for k, v in split.counts().items()}
    check_shardable({"val": counts["val"], "test": counts["test"]}, world.processes)
    built = get_model(config.backbone, num_classes=len(split.classes), weights=config.weights)
    preprocessing = built.preprocessing.at_size(config.img_size)
    # Freezing by strategy or by stage schedule, and the rest of the recipe (optim.py).
    plan, summary = plan_from_config(config, built.model, built.head, split)
    test_preprocessing = preprocessing.at_size(config.test_img_size)

    resuming = run_dir is not None
    if run_dir is None:
        run_dir = shared_directory(
            lambda: new_run_dir(
                config.output, config.run_name or f"{config.backbone}-{config.strategy}"
            ),
            world.processes,
        )
    if zero:
        held.enter_context(run_lock(run_dir))  # resume_run holds it already: re-entrant
        if not resuming:
            write_run_files(run_dir, config, split)

    precision = resolve_precision(config.precision, accelerator)
    channels_last = resolve_channels_last(config.channels_last, accelerator)

    def image_datamodule(image_store: Any = None) -> FineTuneDataModule:
        workers = config.num_workers
        if workers is None:
            workers = default_num_workers(accelerator, prepared=image_store is not None)
        return FineTuneDataModule(
            split,
            preprocessing,
            config.batch_size,
            workers,
            config.augment,
            config.seed,
            image_store=image_store,
            train_transform=build_recipe_train_transform(
                preprocessing, config.augmentation, config.random_erasing, normalise=False
            )
            if config.augment
            else None,
            eval_preprocessing=test_preprocessing,
            test_transform=tta_eval_transform(test_preprocessing, config.tta, normalise=False),
        )

    # The card's preprocessing is what evaluate/predict/export apply: the test-time one.
    card = model_card(config, split, built, test_preprocessing, summary)
    card.update(recipe_card(config, plan, preprocessing))
    # --batch-size is per process: each of the world.processes processes takes that many images
    # per step, and DDP averages their gradients, so a step sees the global batch.
    global_batch = config.batch_size * world.processes
    lr = scaled_lr(config.lr, global_batch, config.scale_lr)
    module = FineTuneModule(
        built.model,
        card,
        lr=lr,
        optimizer=config.optimizer,
        weight_decay=config.weight_decay,
        frozen_bn=config.frozen_bn,
        channels_last=channels_last,
        plan=plan,
    )
    # Caches: rank 0 builds, the other ranks then read what it wrote. The feature cache comes
    # first, on images decoded from the files: when it is used, the images are needed for that
    # one pass only, and preparing them first would decode them once more (the cached images
    # are bit for bit the decoded ones, so the features are the same either way). In a
    # comparison the runs after this one may train on images: then they are prepared first and
    # the feature pass reads them, so that no photo is decoded twice (as fast for this run).
    image_store, image_cache = None, "off"
    if share_features_with:
        with rank_zero_first():
            image_store, image_cache = prepared_images_for(
                split, preprocessing, config.image_cache, config.cache_dir, progress and zero
            )
    with rank_zero_first():
        cached = cached_features(
            config,
            module,
            built.head,
            image_datamodule(image_store),
            accelerator,
            precision,
            progress and zero,
            also_for=share_features_with,
        )
    if cached.datamodule is not None:
        datamodule, module.feature_tail = cached.datamodule, cached.tail
        module.feature_prefix = cached.prefix
        # Unless this run's feature pass read the images it prepared for the runs after it.
        if config.image_cache and (image_store is None or not cached.computed):
            image_cache = "not needed (features cached)"
    else:
        if image_store is None:
            with rank_zero_first():
                image_store, image_cache = prepared_images_for(
                    split, preprocessing, config.image_cache, config.cache_dir, progress and zero
                )
        datamodule = image_datamodule(image_store)
    compiled = config.compile and cached.datamodule is None
    if compiled:
        module.model.compile()  # in place: the state dict keeps its names, checkpoints stay usable
    depthwise_grad = "native"
    # Not under torch.compile, which traces the plain convolution and makes its own backward.
    if accelerator == "cpu" and config.fast_depthwise_grad and not cached.tail and not compiled:
        switched = use_fast_depthwise_grad(module.model)
        depthwise_grad = f"fast ({switched} layers)" if switched else "native (no depthwise layers)"
    speed_paths = {
        "image_cache": image_cache,
        "feature_cache": cached.summary,
        "compile": compiled,
        "workers": datamodule.num_workers,
        "depthwise_grad": depthwise_grad,
        "allocator": allocator,
    }
    if zero and (world.processes > 1 or config.scale_lr != "none"):
        log.info(
            "%d process(es) (%d device(s) x %d node(s)) | global batch %d = batch size %d x %d"
            " | lr %.3g (%s scaling from %.3g)",
            world.processes,
            world.per_node,
            world.num_nodes,
            global_batch,
            config.batch_size,
            world.processes,
            lr,
            config.scale_lr,
            config.lr,
        )
    log.info(
        "%s | %s | accelerator=%s precision=%s channels_last=%s workers=%d "
        "image_cache=%s feature_cache=%s compile=%s depthwise_grad=%s allocator=%s | run: %s",
        summary.describe(),
        f"{sum(map(len, split.train.values()))}/{sum(map(len, split.val.values()))}/"
        f"{sum(map(len, split.test.values()))} train/val/test images",
        accelerator,
        precision,
        channels_last,
        datamodule.num_workers,
        image_cache,
        cached.summary,
        speed_paths["compile"],
        depthwise_grad,
        allocator,
        run_dir,
    )
    checkpoint = BestAndLastCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="best",
        monitor="val/acc",
        mode="max",
        save_last=True,
        auto_insert_metric_name=False,
        enable_version_counter=False,  # last.ckpt is shared with the periodic checkpoint
        save_on_train_epoch_end=False,
    )
    periodic = periodic_last_checkpoint(
        run_dir / "checkpoints", config.checkpoint_steps, config.checkpoint_minutes
    )
    run_callbacks: list[Any] = [
        checkpoint,
        *([periodic] if periodic else []),
        ResumeState(run_dir / "checkpoints"),
        StopOnNonFiniteLoss(run_dir / "checkpoints"),
    ]
    if config.early_stopping_patience:
        run_callbacks.append(
            EarlyStopping(monitor="val/acc", mode="max", patience=config.early_stopping_patience)
        )
    trainer = L.Trainer(
        max_epochs=config.epochs,
        # Early stopping never ends a run before its last stage has started training.
        min_epochs=min(plan.unfreeze.last_change + 1, config.epochs)
        if plan.unfreeze and config.early_stopping_patience
        else None,
        gradient_clip_val=config.grad_clip_norm,
        accelerator=accelerator,
        devices=world.devices,
        num_nodes=world.num_nodes,
        strategy=world.strategy,
        precision=precision,
        logger=build_loggers(config, run_dir),
        callbacks=[*run_callbacks, *(callbacks or [])],
        plugins=[AtomicCheckpointIO()],
        deterministic=False,
        enable_progress_bar=progress,
        enable_model_summary=False,
        log_every_n_steps=1,
        num_sanity_val_steps=0,
        default_root_dir=run_dir,
    )
    started = time.perf_counter()
    with warnings.catch_warnings():
        # Known-harmless noise: our run directory already holds config/split files when the
        # CSV logger starts, and 2-core machines are told to use more workers than they have.
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*exists and is not empty.*")
        warnings.filterwarnings("ignore", ".*LeafSpec.*")
        if config.lr_find:
            found = lr_find_before_training(config, trainer, module, datamodule, run_dir)
            if not found["applied"]:
                return RunResult(run_dir=run_dir, results={"lr_find": found})
        if zero and resuming:
            # Only now, with the model, data and caches ready, does a resumed run change.
            write_run_files(run_dir, config, split)
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        except BaseException as exc:
            if not isinstance(exc, NonFiniteLossError):  # resuming would diverge again
                log.error(
                    "The run stopped; continue it with: inat-finetune train --resume %s", run_dir
                )
            if isinstance(exc, SystemExit) and not exc.code:
                # Lightning stops on SIGTERM with exit status 0; a stopped run must not look done.
                raise SystemExit(128 + signal.SIGTERM) from exc
            raise
        train_time = time.perf_counter() - started
        final_train_acc = float(trainer.callback_metrics.get("train/acc", float("nan")))
        started = time.perf_counter()
        tested = trainer.test(
            module,
            datamodule=datamodule,
            ckpt_path=checkpoint.best_model_path,
            verbose=False,
            weights_only=True,
        )
    test_time = time.perf_counter() - started
    test_report = module.test_report
    results = {
        "backbone": config.backbone,
        "weights": built.weights,
        "strategy": config.strategy,
        "freeze_percent": config.freeze_percent if config.strategy == "freeze_k_percent" else None,
        "frozen_bn": config.frozen_bn,
        "trainable_params": summary.trainable_params,
        "total_params": summary.total_params,
        "epochs": trainer.current_epoch,
        "best_epoch": _best_epoch(run_dir / "metrics.csv") if zero else None,
        "final_train_acc": final_train_acc,
        "best_val_acc": float(checkpoint.best_model_score),
        "test_acc": float(tested[0]["test/acc"]),
        "test_loss": float(tested[0]["test/loss"]),
        "per_class_test_acc": dict(zip(split.classes, test_report["per_class_acc"], strict=True)),
        "confusion_matrix": test_report["confusion_matrix"],
        "class_names": split.classes,
        "num_images": {k: sum(v.values()) for k, v in split.counts().items()},
        "skipped_files": len(split.skipped),
        "train_time_s": round(train_time, 2),
        "test_time_s": round(test_time, 2),
        "accelerator": accelerator,
        "precision": precision,
        "channels_last": channels_last,
        "speed_paths": speed_paths,
        # Resolved: under DDP Lightning hands back an absolute path for a relative --output.
        "checkpoint": str(
            Path(checkpoint.best_model_path).resolve().relative_to(run_dir.resolve())
        ),
        "processes": world.processes,
        "global_batch_size": global_batch,
        "lr": lr,
        **recipe_results(config, module, trainer.current_epoch),
    }
    if not zero:
        return RunResult(run_dir=run_dir, results=results)
    write_predictions(run_dir / "test_predictions.csv", split, test_report["probabilities"])
    write_json_atomic(run_dir / "results.json", results)
    figures: dict[str, Path] = {}
    if report:
        from inat_finetune.plots import make_run_figures
        from inat_finetune.report import write_report

        figures = make_run_figures(run_dir)
        write_report(run_dir)
    for lg in trainer.loggers:
        if isinstance(lg, WandbLogger):
            log_final_to_wandb(lg, results, figures, run_dir / "test_predictions.csv")
    return RunResult(run_dir=run_dir, results=results)


def write_run_files(run_dir: Path, config: TrainConfig, split: DataSplit) -> None:
    """config.yaml, split.json and dataset.json (results.json: see BestAndLastCheckpoint)."""
    write_yaml_atomic(run_dir / "config.yaml", config.to_yaml_dict())
    split.save(run_dir / "split.json")
    write_json_atomic(run_dir / "dataset.json", split.summary())


def lr_find_before_training(
    config: TrainConfig, trainer: L.Trainer, module: FineTuneModule, datamodule: Any, run_dir: Path
) -> dict[str, Any]:
    """``--lr-find``: the range test; with ``--lr-find-apply`` its suggestion becomes ``lr``."""
    from dataclasses import replace

    from inat_finetune.optim import run_lr_find

    plan = module.plan
    # Hold the first epoch's stage for the whole test: the range test spans several short
    # epochs on small data, and an unfreeze in the middle would mix two experiments.
    module.plan = replace(plan, unfreeze=None)
    # Lightning stops the test at max_epochs; on small data that comes before its last step.
    max_epochs = trainer.fit_loop.max_epochs
    trainer.fit_loop.max_epochs = max(max_epochs, config.lr_find_steps)
    try:
        found = run_lr_find(
            trainer, module, datamodule, run_dir, config.lr_find_steps, config.lr_find_apply
        )
    finally:
        module.plan = plan
        trainer.fit_loop.max_epochs = max_epochs
    log.info(
        "Learning-rate range test: suggested lr %s (%s); plot: %s",
        "none" if found["suggestion"] is None else f"{found['suggestion']:.3g}",
        "applied" if found["applied"] else "not applied; pass --lr-find-apply to use it",
        run_dir / "figures" / "lr_find.png",
    )
    if found["applied"]:
        # config.yaml repeats the run as trained: with this lr and no range test.
        applied = config.model_copy(update={"lr": module.lr, "lr_find": False})
        write_yaml_atomic(run_dir / "config.yaml", applied.to_yaml_dict())
    return found


def log_final_to_wandb(
    logger: WandbLogger, results: dict[str, Any], figures: dict[str, Path], predictions: Path
) -> None:
    """Final test metrics in the run summary; figures as images; predictions as a table."""
    import csv

    import wandb

    run = logger.experiment
    run.summary.update(
        {
            f"final/{k}": v
            for k, v in results.items()
            if isinstance(v, (int, float)) and v is not None
        }
    )
    run.summary.update(
        {f"test_acc/{k}": v for k, v in results["per_class_test_acc"].items() if v is not None}
    )
    images = {f"figures/{name}": wandb.Image(str(path)) for name, path in figures.items()}
    if images:
        run.log(images)
    with predictions.open(newline="") as handle:
        rows = list(csv.reader(handle))
    if rows:
        run.log({"test_predictions": wandb.Table(columns=rows[0], data=rows[1:])})
    run.log(
        {
            "confusion_matrix": wandb.Table(
                columns=["true", *results["class_names"]],
                data=[
                    [name, *counts]
                    for name, counts in zip(
                        results["class_names"], results["confusion_matrix"], strict=True
                    )
                ],
            )
        }
    )
    run.finish()


def write_predictions(path: Path, split: DataSplit, probabilities: torch.Tensor) -> Path:
    """One row per test image: path (relative to the data root), truth, prediction, probabilities."""
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["path", "true", "predicted", "confidence", *(f"p_{c}" for c in split.classes)])
    root = Path(split.root)
    for (image, label), probs in zip(split.samples("test"), probabilities.tolist(), strict=True):
        best = max(range(len(probs)), key=probs.__getitem__)
        writer.writerow(
            [
                image.relative_to(root).as_posix(),
                split.classes[label],
                split.classes[best],
                f"{probs[best]:.6f}",
                *(f"{p:.6f}" for p in probs),
            ]
        )
    return write_text_atomic(path, buffer.getvalue())


def _best_epoch(metrics_csv: Path) -> int | None:
    import csv

    if not metrics_csv.exists():
        return None
    best, best_epoch = -1.0, None
    with metrics_csv.open(newline="") as handle:
        for row in csv.DictReader(handle):
            value = row.get("val/acc")
            if value and float(value) > best:
                best, best_epoch = float(value), int(row["epoch"])
    return best_epoch
