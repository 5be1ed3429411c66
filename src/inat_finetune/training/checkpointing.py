"""Checkpoints that survive crashes: atomic writes, safe reads, and everything a resume needs.

Lightning's checkpoint already holds the model, optimizer, LR schedulers, callback states
(best score so far, and any callback that keeps a stage, such as gradual unfreezing), the epoch
and step counters, and the position of a resumable train loader (see ``sampling``). What it
leaves out is added here:

* ``ResumeState`` stores the random number generators (dropout draws from them) and how many
  rows of ``metrics.csv`` belong to the checkpoint, and flushes the loggers first, so the
  metrics file never lags behind the checkpoint.
* ``periodic_last_checkpoint`` writes ``last.ckpt`` during the epoch too (every N steps or
  minutes), so a pre-empted run loses minutes, not an epoch.
  When training ends it does not write again the step the end-of-epoch callback has just
  written (``PeriodicLastCheckpoint``): one write per strategy less in a comparison.
* ``StopOnNonFiniteLoss`` stops the run before a NaN/inf step reaches the weights, so the last
  checkpoint on disk is always a good one.
* ``AtomicCheckpointIO`` writes every checkpoint to a temporary file and renames it into place:
  a crash, a full disk or a kill mid-write leaves the previous checkpoint whole.
* ``RunCSVLogger`` appends to ``metrics.csv`` on resume (Lightning's deletes it) and rewrites it
  atomically; ``ResumeState`` cuts it back to the checkpoint's rows when training restores the
  checkpoint, not before, so a resume that stops earlier leaves it whole.
* ``RelocatableCheckpoint`` (and ``BestAndLastCheckpoint``, built on it) reloads the best score
  and best checkpoint from a run directory that was copied or moved since it was saved, where
  Lightning would drop them and let a worse epoch overwrite ``best.ckpt``. It also removes
  ``results.json`` just before a new best replaces ``best.ckpt`` in an extended run, so the
  results never describe a checkpoint that is gone.
"""

from __future__ import annotations

import csv
import io
import random
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.trainer.states import TrainerFn

from inat_finetune.errors import (
    UserError,
    WriteFailedError,
    describe_write_failure,
    write_failure,
)
from inat_finetune.models.checkpoints import read_checkpoint
from inat_finetune.runfiles import atomic_write, write_text_atomic

RESUME_KEY = "inat_finetune_resume"  # where a checkpoint keeps RNG states and the metrics row count


def epochs_started(checkpoint: dict[str, Any]) -> int:
    """How many epochs a checkpoint's run had begun: for a finished run, the epochs it trained.

    Not the checkpoint's ``epoch``: Lightning stores the epoch counter, which a checkpoint
    written after the last validation holds at N - 1 and one written when training ends at N.
    """
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {})
    started = progress.get("current", {}).get("started")
    if isinstance(started, int):
        return started
    return int(checkpoint.get("epoch", 0)) + 1


class AtomicCheckpointIO(TorchCheckpointIO):
    """Temporary file + fsync + rename for saving; ``read_checkpoint`` for loading."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            super().save_checkpoint(checkpoint, path, storage_options)  # raises: unsupported
        try:
            atomic_write(path, lambda handle: torch.save(checkpoint, handle))
        except WriteFailedError as exc:
            # atomic_write raises it from the OSError of the failed write: write_failure finds it.
            kept = "the previous one is intact" if Path(path).exists() else "none was written yet"
            line = describe_write_failure(path, write_failure(exc), kept, what="the checkpoint")
            raise WriteFailedError(
                f"{line}, then continue with `inat-finetune train --resume <run directory>`"
            ) from exc

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        # Run directories hold only what inat-finetune wrote: always load them weights-only.
        return read_checkpoint(path, map_location=map_location)


def capture_rng() -> dict[str, Any]:
    """Every global random state, as tensors and plain values (loadable weights-only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    numpy = state["numpy"]
    np.random.set_state(
        (
            numpy["kind"],
            numpy["keys"].numpy().astype(np.uint32),
            numpy["pos"],
            numpy["has_gauss"],
            numpy["gauss"],
        )
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class ResumeState(Callback):
    """Adds RNG states and the metrics row count to each checkpoint; restores the RNGs.

    The RNGs are put back just before the first resumed training step rather than at load
    time, so nothing Lightning does while it restarts can draw from them in between.

    On SIGTERM (what a pre-empted machine gets before it is killed) Lightning stops after the
    current batch; ``last.ckpt`` is written first, at the same point in the step as every
    periodic save, so not even the steps since the last periodic checkpoint are lost.
    """

    def __init__(self, checkpoint_dir: Path) -> None:
        self.last = Path(checkpoint_dir) / "last.ckpt"
        self._pending_rng: dict[str, Any] | None = None
        self._pending_loader: list[dict[str, Any]] = []

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        rows = None
        for logger in trainer.loggers:
            logger.save()  # metrics.csv holds every row logged up to this checkpoint
            if isinstance(logger, RunCSVLogger):
                rows = logger.experiment.row_count
        checkpoint[RESUME_KEY] = {"rng": capture_rng(), "metrics_rows": rows}

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        saved = checkpoint.get(RESUME_KEY, {})
        self._pending_rng = saved.get("rng")
        # metrics.csv is cut back to the checkpoint's rows only now, when the run is restored
        # and training follows: a resume refused or failing before this leaves the file whole.
        # (Lightning calls this hook when testing from a checkpoint too: nothing is cut then.)
        rows = saved.get("metrics_rows")
        if trainer.state.fn == TrainerFn.FITTING and rows is not None:
            for logger in trainer.loggers:
                if isinstance(logger, RunCSVLogger):
                    logger.experiment.keep_rows(int(rows))
        fit_loop = checkpoint.get("loops", {}).get("fit_loop", {})
        self._pending_loader = fit_loop.get("state_dict", {}).get("combined_loader", [])

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning gives the train loader its saved position only if the loader is first set
        # up after the checkpoint is restored. A learning-rate schedule that asks for
        # trainer.estimated_stepping_batches sets it up earlier, and the position is dropped.
        # So it is handed over here, before the first batch is drawn. (The sampler applies it
        # only to the epoch it was saved in, so handing it over twice does no harm.)
        from inat_finetune.data.sampling import ResumableLoader

        loader = trainer.train_dataloader
        if self._pending_loader and isinstance(loader, ResumableLoader):
            loader.load_state_dict(self._pending_loader[0])
        self._pending_loader = []

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._pending_rng is not None:
            restore_rng(self._pending_rng)
            self._pending_rng = None

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if trainer.received_sigterm:
            trainer.save_checkpoint(self.last)


class NonFiniteLossError(UserError):
    """The training loss became NaN or infinite; the run stopped before the weights did."""


class StopOnNonFiniteLoss(Callback):
    """Stop before backward on a NaN/inf loss: no bad gradient reaches the weights or a checkpoint."""

    def __init__(self, checkpoint_dir: Path) -> None:
        self.checkpoint_dir = Path(checkpoint_dir)

    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor
    ) -> None:
        if bool(torch.isfinite(loss.detach()).all()):
            return
        last = self.checkpoint_dir / "last.ckpt"
        kept = (
            f"{last} (the last good state) is kept"
            if last.is_file()
            else "no checkpoint had been written yet"
        )
        lr = getattr(pl_module, "lr", None)
        raise NonFiniteLossError(
            f"training loss became {loss.item()} at epoch {trainer.current_epoch}, step "
            f"{trainer.global_step}; the run stopped and {kept}. Lower --lr"
            f"{f' (now {lr:g})' if lr is not None else ''} or check the data, then start a new run"
        )


class RelocatableCheckpoint(ModelCheckpoint):
    """A ModelCheckpoint whose saved state follows its run directory when that is moved.

    Lightning (2.6) records the checkpoint folder's absolute path in the callback's state and,
    when a run is resumed from another path (the run directory was copied, moved or renamed),
    drops the best score and keeps the best checkpoint's *old* path: the first resumed epoch
    then counts as a new best however bad it is and overwrites ``best.ckpt``. Here the paths
    the state names are taken relative to the folder it was saved in and put under this
    callback's folder, and the best score, the best models and the last path are kept.
    """

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("dirpath")
        if saved and self.dirpath and saved != self.dirpath:
            state_dict = relocated_state(state_dict, Path(saved), Path(self.dirpath))
        super().load_state_dict(state_dict)


def relocated_state(state: dict[str, Any], saved: Path, current: Path) -> dict[str, Any]:
    """``state`` with every path under the folder ``saved`` moved to the same place in ``current``."""

    def move(path: Any) -> Any:
        if not path or not Path(path).is_relative_to(saved):
            return path
        return str(current / Path(path).relative_to(saved))

    moved = {**state, "dirpath": str(current)}
    for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
        if key in moved:
            moved[key] = move(moved[key])
    if isinstance(moved.get("best_k_models"), dict):
        moved["best_k_models"] = {move(k): v for k, v in moved["best_k_models"].items()}
    return moved


class BestAndLastCheckpoint(RelocatableCheckpoint):
    """``best.ckpt`` by the monitored metric, and ``last.ckpt`` at the end of *every* epoch.

    Lightning (2.6) writes ``last.ckpt`` at an epoch's end only when that epoch was a new best,
    and once more when training ends; a run killed after an epoch that was not a new best would
    redo it. Here ``last.ckpt`` follows every validation, after the best score is updated, so the
    checkpoint's record of the best is never older than ``best.ckpt`` itself.
    """

    last_written_at_step: int | None = None  # the global step of the last last.ckpt written

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._retire_results_before_a_new_best(trainer)
        super().on_validation_end(trainer, pl_module)
        # Skipped when the parent just wrote last.ckpt (a new best) at this step.
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        self.last_written_at_step = trainer.global_step

    def _retire_results_before_a_new_best(self, trainer: L.Trainer) -> None:
        """A finished run being extended: its ``results.json`` describes ``best.ckpt``, so it
        goes just before a new best replaces that file (and is written anew when the run ends).
        While no epoch beats the old best, or when the new best cannot be written (a full
        disk), it stays: it still describes the ``best.ckpt`` on disk."""
        if self.dirpath is None or self._should_skip_saving_checkpoint(trainer):
            return
        current = self._monitor_candidates(trainer).get(self.monitor)
        if current is not None and self.check_monitor_top_k(trainer, current):
            (Path(self.dirpath).parent / "results.json").unlink(missing_ok=True)


class PeriodicLastCheckpoint(RelocatableCheckpoint):
    """``last.ckpt`` during the epoch (``periodic_last_checkpoint``), and not once more when
    training ends if the end-of-epoch callback ``epoch_end`` wrote it at that very step.

    Lightning's ``on_train_end`` writes ``last.ckpt`` from every callback with ``save_last``
    that has saved nothing itself: with the default every 10 minutes, every run shorter than
    that wrote the same step's ``last.ckpt`` twice (the second with Lightning's epoch counter at
    N instead of N - 1, which resuming and extending treat alike: ``epochs_started``,
    tests/test_resume.py). A run that ends elsewhere (early stopping, a stop mid-epoch) still
    gets its final ``last.ckpt``."""

    def __init__(self, epoch_end: BestAndLastCheckpoint | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.epoch_end = epoch_end

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (
            self.epoch_end is not None
            and self.epoch_end.last_written_at_step == trainer.global_step
        ):
            return
        super().on_train_end(trainer, pl_module)


class ScoreOnlyCheckpoint(BestAndLastCheckpoint):
    """Keeps the best score, its path and the last path as ``BestAndLastCheckpoint`` does, and
    writes no file: an auto candidate's run reads its best validation score only."""

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath


def periodic_last_checkpoint(
    dirpath: Path,
    every_steps: int | None,
    every_minutes: float | None,
    epoch_end: BestAndLastCheckpoint | None = None,
) -> ModelCheckpoint | None:
    """``last.ckpt`` also during the epoch: every N steps if given, else every N minutes
    (``epoch_end``: the callback that writes it after every validation; see the class)."""
    if every_steps:
        trigger: dict[str, Any] = {"every_n_train_steps": every_steps}
    elif every_minutes:
        trigger = {"train_time_interval": timedelta(minutes=every_minutes)}
    else:
        return None
    # No version counter: the end-of-epoch checkpoint callback writes the same last.ckpt, and
    # each must replace it rather than start last-v1.ckpt.
    return PeriodicLastCheckpoint(
        epoch_end=epoch_end,
        dirpath=dirpath,
        save_top_k=0,
        save_last=True,
        enable_version_counter=False,
        **trigger,
    )


class _MetricsWriter(ExperimentWriter):
    """Keeps the rows already in metrics.csv and rewrites the whole file atomically on save."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        self.rows: list[dict[str, Any]] = []
        path = Path(self.metrics_file_path)
        if path.is_file():
            with path.open(newline="", encoding="utf-8") as handle:
                reader = csv.DictReader(handle)
                self.rows = list(reader)
                self.metrics_keys = list(reader.fieldnames or [])

    def _check_log_dir_exists(self) -> None:
        # Lightning deletes an existing metrics.csv here; a resumed run must append to it.
        pass

    @property
    def row_count(self) -> int:
        return len(self.rows)

    def keep_rows(self, rows: int) -> None:
        """Forget the rows after the first ``rows`` (logged after a checkpoint; logged again)."""
        if rows < len(self.rows):
            self.rows = self.rows[:rows]
            keep_metrics_rows(Path(self.metrics_file_path), rows)

    def save(self) -> None:
        if not self.metrics:
            return
        self._record_new_keys()
        self.rows.extend(self.metrics)
        self.metrics = []
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.metrics_keys)
        writer.writeheader()
        writer.writerows(self.rows)
        write_text_atomic(self.metrics_file_path, buffer.getvalue())


class RunCSVLogger(CSVLogger):
    """Lightning's CSVLogger, but appending on resume and writing metrics.csv atomically."""

    @property
    @rank_zero_experiment
    def experiment(self) -> _MetricsWriter:
        if self._experiment is None:
            self._experiment = _MetricsWriter(log_dir=self.log_dir)
        return self._experiment


def keep_metrics_rows(metrics_csv: Path, rows: int | None) -> None:
    """Cut metrics.csv back to the rows its checkpoint knew of; later ones are logged again."""
    if not metrics_csv.is_file() or rows is None:
        return
    if rows == 0:
        metrics_csv.unlink()
        return
    with metrics_csv.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        kept = list(reader)[:rows]
        fields = list(reader.fieldnames or [])
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows(kept)
    write_text_atomic(metrics_csv, buffer.getvalue())
