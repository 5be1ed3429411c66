"""One fine-tuning run: ``train(config)``.

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
from lightning.pytorch.callbacks import Callback, EarlyStopping
from lightning.pytorch.loggers import WandbLogger

from inat_finetune.data.augment import build_recipe_train_transform
from inat_finetune.data.datamodule import FineTuneDataModule, default_num_workers
from inat_finetune.data.folders import DataSplit, make_split
from inat_finetune.data.tta import tta_eval_transform
from inat_finetune.models.backbones import get_model
from inat_finetune.models.freezing import FreezeSummary
from inat_finetune.runfiles import (
    new_run_dir,
    write_json_atomic,
    write_text_atomic,
    write_yaml_atomic,
)
from inat_finetune.runtime.allocator import freed_memory_kept
from inat_finetune.runtime.distributed import (
    broadcast_from_zero,
    check_shardable,
    is_global_zero,
    join_launched_group,
    plan_world,
    rank_zero_first,
    scaled_lr,
    shared_directory,
)
from inat_finetune.runtime.hardware import (
    resolve_accelerator,
    resolve_channels_last,
    resolve_precision,
)
from inat_finetune.speed.depthwise_grad import use_fast_depthwise_grad
from inat_finetune.speed.features import cached_features
from inat_finetune.speed.prepared import prepared_images_for
from inat_finetune.tasks.classification import FineTuneModule
from inat_finetune.tasks.optim import (
    plan_from_config,
)
from inat_finetune.training.checkpointing import (
    AtomicCheckpointIO,
    BestAndLastCheckpoint,
    NonFiniteLossError,
    ResumeState,
    StopOnNonFiniteLoss,
    periodic_last_checkpoint,
)
from inat_finetune.training.config import TrainConfig
from inat_finetune.training.loggers import build_loggers
from inat_finetune.training.recipes import recipe_card, recipe_results
from inat_finetune.training.runlock import run_lock

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_dir: Path
    results: dict[str, Any]


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
    from inat_finetune.data.datacheck import assert_no_leakage, drop_leaked_test_images
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
    # On the CPU, freed memory is kept for reuse while the run lasts (runtime/allocator.py).
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
    from inat_finetune.training.preflight import check_machine, preflight

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
    # Freezing by strategy or by stage schedule, and the rest of the recipe (tasks/optim.py).
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
        from inat_finetune.reporting.plots import make_run_figures
        from inat_finetune.reporting.report import write_report

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

    from inat_finetune.tasks.optim import run_lr_find

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
