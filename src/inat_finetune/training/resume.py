"""``inat-finetune train --resume RUN_DIR``: carry on a stopped run from its last checkpoint.

The run directory is the whole truth: ``config.yaml`` says what is trained, ``split.json`` on
which images, ``checkpoints/last.ckpt`` how far it got (see ``checkpointing`` for what a
checkpoint holds). A run resumed on the same kind of machine ends with the same metrics as one
that was never stopped, also when its directory was copied or moved since: the best score and
best checkpoint come back from its own files whatever its path.

Options that say where and how the run executes may change on resume (``CHANGEABLE``), and
``--epochs`` may grow, also to extend a finished run. ``--epochs N`` is the total: a finished
run of 1 epoch resumed with ``--epochs 2`` trains one more; one that already trained N epochs
is refused, as is N below the epoch a stopped run is in. Any other option given with a value
that differs from ``config.yaml`` is refused: the result would no longer be the run it claims
to be.

A resume changes nothing in the run directory until it has passed every check (the options,
the checkpoint, ``--epochs``) and found every image of the split still there and decodable;
then ``config.yaml`` is rewritten just before training restarts, ``results.json`` is removed
only when a new best replaces ``best.ckpt`` (``checkpointing.BestAndLastCheckpoint``), and ``metrics.csv`` is cut back to the checkpoint's rows when the checkpoint is restored. It
holds the run's ``run.lock`` throughout (``runlock``): a second resume of the same run, or one
of a run still training, is refused with a line naming the process that holds it.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

from inat_finetune.data.folders import DataSplit
from inat_finetune.data.images import unusable_images
from inat_finetune.errors import UserError
from inat_finetune.models.checkpoints import CARD_KEY, read_checkpoint
from inat_finetune.runtime.distributed import is_global_zero
from inat_finetune.training.checkpointing import epochs_started, keep_metrics_rows
from inat_finetune.training.config import TrainConfig, load_config
from inat_finetune.training.run import train
from inat_finetune.training.runlock import run_lock

log = logging.getLogger(__name__)


# Where and how fast, not what: changing these does not change what the run trains.
# (precision, compile and feature_cache change the arithmetic in the last bits; they are
# allowed so a run can move to other hardware or skip a slow path.)
CHANGEABLE = frozenset(
    {
        "epochs",
        "num_workers",
        "accelerator",
        "devices",
        "precision",
        "checkpoint_steps",
        "checkpoint_minutes",
        "image_cache",
        "feature_cache",
        "cache_dir",
        "compile",
    }
)


def resume_config(run_dir: Path, options: dict[str, Any]) -> TrainConfig:
    """The run's config.yaml with the allowed options applied; a conflicting option is refused."""
    if options.get("config") is not None:
        raise UserError(
            f"--resume {run_dir} --config {options['config']}: a resumed run uses its own "
            "config.yaml; drop --config"
        )
    saved = load_config(run_dir / "config.yaml")
    changes: dict[str, Any] = {}
    for name, value in options.items():
        if value is None or name == "config":
            continue
        if name not in TrainConfig.model_fields:
            raise UserError(f"--resume: unknown option '{name}'")
        if name in CHANGEABLE:
            changes[name] = value
        elif value != getattr(saved, name):
            flag = "--" + name.replace("_", "-")
            allowed = ", ".join("--" + n.replace("_", "-") for n in sorted(CHANGEABLE))
            raise UserError(
                f"--resume {run_dir}: {flag} {value} differs from the run's "
                f"{name}={getattr(saved, name)!r}; only {allowed} may change when resuming. "
                "Start a new run to train with other settings"
            )
    return load_config(run_dir / "config.yaml", **changes)


def check_checkpoint_fits(
    path: Path, checkpoint: dict[str, Any], config: TrainConfig, classes: list[str]
) -> None:
    """Refuse a checkpoint made for another backbone, class set or freezing strategy."""
    card = checkpoint.get(CARD_KEY)
    if not isinstance(card, dict):
        raise UserError(f"{path}: not an inat-finetune checkpoint (no '{CARD_KEY}' description)")
    found = {
        "backbone": card.get("backbone"),
        "strategy": card.get("strategy"),
        "freeze_percent": card.get("freeze_percent"),
    }
    for name, value in found.items():
        if value != getattr(config, name):
            raise UserError(
                f"{path}: this checkpoint was trained with {name}={value!r}, but config.yaml says "
                f"{name}={getattr(config, name)!r}; resume with the run directory it came from"
            )
    if list(card.get("class_names", [])) != list(classes):
        raise UserError(
            f"{path}: this checkpoint knows classes {card.get('class_names')}, but split.json has "
            f"{classes}; resume with the run directory it came from"
        )


def _listed_images(split: DataSplit) -> list[Path]:
    root = Path(split.root)
    return [
        root / rel
        for part in (split.train, split.val, split.test)
        for files in part.values()
        for rel in files
    ]


def check_images_present(split: DataSplit) -> None:
    """Every image of the split is still there (cheap: checked before the checkpoint is read)."""
    root = Path(split.root)
    missing = [path for path in _listed_images(split) if not path.is_file()]
    if missing:
        raise UserError(
            f"{root}: {len(missing)} image(s) listed in split.json are missing (first: "
            f"{missing[0].relative_to(root).as_posix()}); put the dataset back where it was to "
            "resume this run"
        )


def check_images_decode(split: DataSplit, progress: bool = False) -> None:
    """Every image of the split still decodes (the scan's check, last: it reads every file)."""
    unusable = unusable_images(_listed_images(split), progress=progress)
    if unusable:
        path, why = unusable[0]
        raise UserError(
            f"{path}: {why}, but the run trained on it ({len(unusable)} such image(s) in "
            "split.json); put the original file back to resume this run, or start a new run, "
            "whose scan skips it"
        )


def check_epochs(run_dir: Path, config: TrainConfig, started: int, extend: bool) -> None:
    """``--epochs`` is the total: refuse one the run has already reached (or passed)."""
    finished = (run_dir / "results.json").is_file()
    if finished and (not extend or config.epochs <= started):
        raise UserError(
            f"--resume {run_dir}: this run already finished after {started} epoch(s); --epochs "
            f"is the total, so pass --epochs N with N > {started} to train it further, or start "
            "a new run"
        )
    if config.epochs < started:
        raise UserError(
            f"--resume {run_dir} --epochs {config.epochs}: the run is already in epoch {started}; "
            f"pass --epochs {started} or more (the total)"
        )


def _remove_stale_temporaries(run_dir: Path) -> None:
    # A process killed mid-write leaves its temporary file (see runfiles.atomic_write).
    for tmp in run_dir.rglob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def resume_run(run_dir: str | Path, options: dict[str, Any], progress: bool = True) -> Any:
    """Continue ``run_dir`` from ``checkpoints/last.ckpt`` (or from the start if it has none).

    Holds the run's lock (``runlock``) throughout, and changes nothing in the run directory
    until every check has passed and every image of the split has been found and decoded.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "split.json").is_file():
        raise UserError(
            f"--resume {run_dir}: not a run directory (needs config.yaml and split.json); "
            "pass the directory a `train` command created"
        )
    # Only the process that writes the run's files holds the lock (rank 0 under DDP).
    with run_lock(run_dir) if is_global_zero() else contextlib.nullcontext():
        return _resume_locked(run_dir, options, progress)


def _resume_locked(run_dir: Path, options: dict[str, Any], progress: bool) -> Any:
    config = resume_config(run_dir, options)
    split = DataSplit.load(run_dir / "split.json")
    check_images_present(split)
    last = run_dir / "checkpoints" / "last.ckpt"
    checkpoint = read_checkpoint(last) if last.is_file() else None
    if checkpoint is not None:
        check_checkpoint_fits(last, checkpoint, config, split.classes)
        check_epochs(run_dir, config, epochs_started(checkpoint), options.get("epochs") is not None)
    check_images_decode(split, progress)
    # Every check has passed: from here on the run directory may change. (metrics.csv is cut
    # back to the checkpoint's rows when training restores it: checkpointing.ResumeState.)
    _remove_stale_temporaries(run_dir)
    if checkpoint is None:
        keep_metrics_rows(run_dir / "metrics.csv", 0)
        log.warning("%s has no checkpoint yet: training it again from the start", run_dir)
        return train(config, split=split, progress=progress, run_dir=run_dir)
    log.info(
        "Resuming %s from %s (epoch %d, step %d)",
        run_dir,
        last,
        int(checkpoint.get("epoch", 0)),
        checkpoint.get("global_step", 0),
    )
    return train(config, split=split, progress=progress, run_dir=run_dir, ckpt_path=last)
