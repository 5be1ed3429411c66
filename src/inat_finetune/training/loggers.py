"""Where a run's metrics go: ``metrics.csv`` always, W&B when asked.

A resumed run continues its earlier W&B run under the same id (``resumed_wandb_run``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger, WandbLogger

from inat_finetune.training.checkpointing import (
    RunCSVLogger,
)
from inat_finetune.training.config import TrainConfig


def resumed_wandb_run(run_dir: Path) -> dict[str, Any]:
    """W&B arguments that continue the run's earlier W&B run, if it had one (else nothing)."""
    runs = sorted((run_dir / "wandb").glob("*run-*-*"), key=lambda p: p.stat().st_mtime)
    if not runs:
        return {}
    return {"id": runs[-1].name.rsplit("-", 1)[-1], "resume": "allow"}


def build_loggers(config: TrainConfig, run_dir: Path) -> list[Logger]:
    loggers: list[Logger] = [RunCSVLogger(save_dir=run_dir, name="", version="")]
    if config.wandb:
        loggers.append(
            WandbLogger(
                **resumed_wandb_run(run_dir),
                project=config.wandb_project,
                entity=config.wandb_entity,
                tags=config.wandb_tags,
                name=run_dir.name,
                save_dir=str(run_dir),
                group=config.wandb_group,
                config=config.to_yaml_dict(),
            )
        )
    return loggers
