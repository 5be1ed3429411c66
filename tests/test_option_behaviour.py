"""What --grad-clip-norm, --early-stopping-patience, --checkpoint-minutes and --scale-lr do.

Each test watches the behaviour itself (the gradients the optimizer steps with, the epochs run,
the checkpoints written, the learning rate in the optimizer), not only the option's value.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import TINY_TRAIN, make_class_folders

from inat_finetune.models.checkpoints import read_checkpoint
from inat_finetune.training.checkpointing import AtomicCheckpointIO
from inat_finetune.training.config import load_config
from inat_finetune.training.run import train

TINY = {**TINY_TRAIN, "checkpoint_minutes": 0, "seed": 3}


@pytest.fixture(scope="module")
def data(module_tmp_factory) -> Path:
    root = module_tmp_factory.mktemp("options") / "data"
    make_class_folders(root, {"a": 10, "b": 10})  # 12 train / 4 val / 4 test: 3 steps an epoch
    return root


def _trainable_grad_norm(module: L.LightningModule) -> float:
    grads = [p.grad for p in module.parameters() if p.requires_grad and p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))


class GradientWatch(L.Callback):
    """The gradient norm before clipping (Lightning's hook) and as the optimizer steps with it."""

    def __init__(self) -> None:
        self.before: list[float] = []
        self.stepped: list[float] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for optimizer in trainer.optimizers:
            # A step post-hook: the gradients are still there, after any clipping.
            optimizer.register_step_post_hook(
                lambda *_: self.stepped.append(_trainable_grad_norm(pl_module))
            )

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.before.append(_trainable_grad_norm(pl_module))  # Lightning clips after this hook


@pytest.mark.parametrize("clip", [None, 1e-3])
def test_grad_clip_norm_bounds_the_gradients_the_optimizer_steps_with(data, tmp_path, clip):
    watch = GradientWatch()
    cfg = load_config(None, data=str(data), output=str(tmp_path), grad_clip_norm=clip, **TINY)
    train(cfg, progress=False, report=False, callbacks=[watch])
    assert len(watch.stepped) == len(watch.before) == 3
    assert all(b > 1e-3 for b in watch.before)  # every step needed clipping at 1e-3
    if clip is None:
        assert watch.stepped == pytest.approx(watch.before)
    else:
        assert all(s == pytest.approx(clip, rel=1e-3) for s in watch.stepped)


def _val_epochs(run_dir: Path) -> list[int]:
    with (run_dir / "metrics.csv").open(newline="") as handle:
        return [int(row["epoch"]) for row in csv.DictReader(handle) if row.get("val/acc")]


def test_early_stopping_patience_stops_a_run_that_does_not_improve(data, tmp_path):
    """lr 1e-12: the weights, hence val accuracy, do not change. With patience 1 the run
    stops after epoch 1 (the first without a better val accuracy), not after 5."""
    options = {**TINY, "epochs": 5, "lr": 1e-12}
    stopped = train(
        load_config(None, data=str(data), output=str(tmp_path / "a"), **options,
                    early_stopping_patience=1),
        progress=False, report=False,
    )  # fmt: skip
    assert _val_epochs(stopped.run_dir) == [0, 1]
    assert stopped.results["epochs"] == 2 and stopped.results["best_epoch"] == 0
    full = train(
        load_config(None, data=str(data), output=str(tmp_path / "b"), **options),
        progress=False,
        report=False,
    )
    assert _val_epochs(full.run_dir) == [0, 1, 2, 3, 4]


@pytest.fixture
def saves(monkeypatch) -> list[tuple[str, int]]:
    """Every checkpoint written: (file name, global step in it)."""
    written: list[tuple[str, int]] = []
    real = AtomicCheckpointIO.save_checkpoint

    def spy(self, checkpoint, path, storage_options=None):
        written.append((Path(path).name, int(checkpoint["global_step"])))
        return real(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", spy)
    return written


@pytest.mark.parametrize(
    ("minutes", "mid_epoch_saves"),
    [(1e-6, [1, 2]), (1e4, []), (0, [])],  # 60 microseconds: after every step
)
def test_checkpoint_minutes_writes_last_ckpt_during_the_epoch(
    data, tmp_path, saves, minutes, mid_epoch_saves
):
    options = {**TINY, "checkpoint_minutes": minutes}
    train(load_config(None, data=str(data), output=str(tmp_path), **options), progress=False,
          report=False)  # fmt: skip
    last_steps = [step for name, step in saves if name == "last.ckpt"]
    # Mid-epoch saves after steps 1 and 2 of 3, then the end of the epoch (step 3).
    assert [s for s in last_steps if s < 3] == mid_epoch_saves
    assert last_steps[-1] == 3


def test_a_run_shorter_than_the_checkpoint_interval_writes_last_ckpt_once_per_epoch(
    data, tmp_path, saves
):
    """The periodic callback (every 10 minutes by default) never fired: training's end must not
    write the step that the end-of-epoch callback has just written again."""
    options = {**TINY, "checkpoint_minutes": 1e4, "epochs": 2}
    run = train(load_config(None, data=str(data), output=str(tmp_path), **options),
                progress=False, report=False)  # fmt: skip
    assert [step for name, step in saves if name == "last.ckpt"] == [3, 6]
    # The last.ckpt left is the one written after the last validation: it resumes as finished.
    assert read_checkpoint(run.run_dir / "checkpoints" / "last.ckpt")["global_step"] == 6


class LrWatch(L.Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.lrs = [group["lr"] for group in trainer.optimizers[0].param_groups]


@pytest.mark.parametrize(
    ("rule", "factor"),
    [("none", 1.0), ("linear", 8 / 32), ("sqrt", math.sqrt(8 / 32))],
)
def test_scale_lr_scales_the_optimizers_learning_rate_by_the_global_batch(
    data, tmp_path, rule, factor
):
    """--batch-size 8 on one process: linear gives lr x 8/32, sqrt lr x sqrt(8/32)."""
    watch = LrWatch()
    options = {**TINY, "batch_size": 8, "lr": 0.004, "scale_lr": rule}
    result = train(
        load_config(None, data=str(data), output=str(tmp_path), **options),
        progress=False,
        report=False,
        callbacks=[watch],
    )
    assert watch.lrs and all(lr == pytest.approx(0.004 * factor) for lr in watch.lrs)
    assert result.results["lr"] == pytest.approx(0.004 * factor)
