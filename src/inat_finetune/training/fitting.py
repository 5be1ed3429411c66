"""Fitting a prepared run: the Trainer, the optional lr range test, fit, and the test.

``build_trainer`` wires the checkpoints that survive crashes (``checkpointing``), early stopping
and the loggers; ``fit_and_test`` runs the range test first when asked (without
``--lr-find-apply`` it ends the run there), rewrites a resumed run's files right before fit,
and turns a stop into an exit status that says so.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, EarlyStopping

from inat_finetune.tasks.classification import FineTuneModule
from inat_finetune.tasks.optim import run_lr_find
from inat_finetune.training.checkpointing import (
    AtomicCheckpointIO,
    BestAndLastCheckpoint,
    NonFiniteLossError,
    ResumeState,
    ScoreOnlyCheckpoint,
    StopOnNonFiniteLoss,
    periodic_last_checkpoint,
)
from inat_finetune.training.config import TrainConfig
from inat_finetune.training.loggers import build_loggers
from inat_finetune.training.outputs import (
    LR_FIND_FIGURE,
    best_epoch,
    write_applied_lr,
    write_lr_find,
    write_run_files,
)
from inat_finetune.training.recipes import recipe_results
from inat_finetune.training.state import Fitted, PreparedRun

log = logging.getLogger(__name__)


def build_trainer(
    prepared: PreparedRun,
    callbacks: list[Callback] | None,
    progress: bool,
    scores_only: bool = False,
) -> tuple[L.Trainer, BestAndLastCheckpoint]:
    """The Trainer with best/last checkpoints, resume state, the non-finite-loss stop, early
    stopping when asked, the loggers and ``callbacks``; and the best-checkpoint callback.
    ``scores_only`` (an auto candidate's run): the best score is kept, no checkpoint written."""
    config, run_dir, plan = prepared.config, prepared.run.path, prepared.model.plan
    processes = prepared.processes
    checkpoint = (ScoreOnlyCheckpoint if scores_only else BestAndLastCheckpoint)(
        dirpath=run_dir / "checkpoints",
        filename="best",
        monitor="val/acc",
        mode="max",
        save_last=True,
        auto_insert_metric_name=False,
        enable_version_counter=False,  # last.ckpt is shared with the periodic checkpoint
        save_on_train_epoch_end=False,
    )
    periodic = None
    if not scores_only:
        periodic = periodic_last_checkpoint(
            run_dir / "checkpoints", config.checkpoint_steps, config.checkpoint_minutes, checkpoint
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
        accelerator=processes.accelerator,
        devices=processes.world.devices,
        num_nodes=processes.world.num_nodes,
        strategy=processes.world.strategy,
        precision=processes.precision,
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
    return trainer, checkpoint


@contextlib.contextmanager
def known_warnings_hidden() -> Iterator[None]:
    """Known-harmless noise: our run directory already holds config/split files when the CSV
    logger starts, and 2-core machines are told to use more workers than they have."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*exists and is not empty.*")
        warnings.filterwarnings("ignore", ".*LeafSpec.*")
        yield


def fit_and_test(
    prepared: PreparedRun,
    trainer: L.Trainer,
    checkpoint: BestAndLastCheckpoint,
    ckpt_path: Path | None,
    test: bool = True,
) -> Fitted:
    """The range test first if asked (it may end the run), then fit, then test best.ckpt
    (unless not ``test``: an auto candidate's run, scored on validation only).

    A fit that stops (an error, Ctrl+C, SIGTERM) says how to resume; Lightning ends on SIGTERM
    with exit status 0, so that becomes 128 + SIGTERM: a stopped run must not look done.
    """
    config, module, run = prepared.config, prepared.module, prepared.run
    datamodule = prepared.speed.datamodule
    started = time.perf_counter()  # the training time includes a range test's
    with known_warnings_hidden():
        if config.lr_find:
            found = lr_find_before_training(config, trainer, module, datamodule, run.path)
            if not found["applied"]:
                return Fitted(lr_find_only=found)
        if prepared.processes.zero and run.resuming:
            # Only now, with the model, data and caches ready, does a resumed run change.
            write_run_files(run.path, config, prepared.split)
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        except BaseException as exc:
            if not isinstance(exc, NonFiniteLossError):  # resuming would diverge again
                log.error(
                    "The run stopped; continue it with: inat-finetune train --resume %s", run.path
                )
            if isinstance(exc, SystemExit) and not exc.code:
                raise SystemExit(128 + signal.SIGTERM) from exc
            raise
        train_time = time.perf_counter() - started
        final_train_acc = float(trainer.callback_metrics.get("train/acc", float("nan")))
        started = time.perf_counter()
        tested = (
            trainer.test(
                module,
                datamodule=datamodule,
                ckpt_path=checkpoint.best_model_path,
                verbose=False,
                weights_only=True,
            )
            if test
            else [{}]
        )
    return Fitted(
        train_time_s=train_time,
        test_time_s=time.perf_counter() - started,
        final_train_acc=final_train_acc,
        tested=tested[0],
    )


def lr_find_before_training(
    config: TrainConfig, trainer: L.Trainer, module: FineTuneModule, datamodule: Any, run_dir: Path
) -> dict[str, Any]:
    """``--lr-find``: the range test; with ``--lr-find-apply`` its suggestion becomes ``lr``."""
    plan = module.plan
    # Hold the first epoch's stage for the whole test: the range test spans several short
    # epochs on small data, and an unfreeze in the middle would mix two experiments.
    module.plan = replace(plan, unfreeze=None)
    # Lightning stops the test at max_epochs; on small data that comes before its last step.
    max_epochs = trainer.fit_loop.max_epochs
    trainer.fit_loop.max_epochs = max(max_epochs, config.lr_find_steps)
    try:
        found = run_lr_find(trainer, module, datamodule, config.lr_find_steps, config.lr_find_apply)
    finally:
        module.plan = plan
        trainer.fit_loop.max_epochs = max_epochs
    found = write_lr_find(run_dir, found)
    log.info(
        "Learning-rate range test: suggested lr %s (%s); plot: %s",
        "none" if found["suggestion"] is None else f"{found['suggestion']:.3g}",
        "applied" if found["applied"] else "not applied; pass --lr-find-apply to use it",
        run_dir / LR_FIND_FIGURE,
    )
    if found["applied"]:
        write_applied_lr(run_dir, config, module.lr)
    return found


def collect_results(
    prepared: PreparedRun,
    trainer: L.Trainer,
    checkpoint: BestAndLastCheckpoint,
    fitted: Fitted,
) -> dict[str, Any]:
    """results.json: what was trained, how well best.ckpt did, and how the run was run."""
    config, split, model = prepared.config, prepared.split, prepared.model
    processes, run_dir = prepared.processes, prepared.run.path
    test_report, tested = prepared.module.test_report, fitted.tested or {}
    return {
        "backbone": config.backbone,
        "weights": model.built.weights,
        "strategy": config.strategy,
        "freeze_percent": config.freeze_percent if config.strategy == "freeze_k_percent" else None,
        "frozen_bn": config.frozen_bn,
        "trainable_params": model.summary.trainable_params,
        "total_params": model.summary.total_params,
        "epochs": trainer.current_epoch,
        "best_epoch": best_epoch(run_dir / "metrics.csv") if processes.zero else None,
        "final_train_acc": fitted.final_train_acc,
        "best_val_acc": float(checkpoint.best_model_score),
        # None when nothing was tested (an auto candidate's run: no test images).
        "test_acc": float(tested["test/acc"]) if tested else None,
        "test_loss": float(tested["test/loss"]) if tested else None,
        "per_class_test_acc": dict(zip(split.classes, test_report["per_class_acc"], strict=True))
        if test_report
        else None,
        "confusion_matrix": test_report.get("confusion_matrix"),
        "class_names": split.classes,
        "num_images": {k: sum(v.values()) for k, v in split.counts().items()},
        "skipped_files": len(split.skipped),
        "train_time_s": round(fitted.train_time_s, 2),
        "test_time_s": round(fitted.test_time_s, 2),
        "accelerator": processes.accelerator,
        "precision": processes.precision,
        "channels_last": processes.channels_last,
        "speed_paths": prepared.speed.as_results(),
        # Resolved: under DDP Lightning hands back an absolute path for a relative --output.
        "checkpoint": str(
            Path(checkpoint.best_model_path).resolve().relative_to(run_dir.resolve())
        ),
        "processes": processes.world.processes,
        "global_batch_size": prepared.batch.global_batch,
        "lr": prepared.batch.lr,
        **recipe_results(config, prepared.module, trainer.current_epoch),
    }
