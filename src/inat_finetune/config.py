"""One validated configuration per run, settable from YAML and from the command line.

Precedence: command-line option > YAML file (``--config``) > the defaults below, which are the
original write-up's (Adam, lr 1e-3, cross-entropy, batch 32, 224 px from the weights preset).
The resolved configuration is saved as ``config.yaml`` in the run directory; passing that file
back with ``--config`` repeats the run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from inat_finetune.errors import UserError
from inat_finetune.freezing import STRATEGIES


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    data: str | None = Field(
        None, description="dataset root (nature_12K, train/val[/test], or class folders)"
    )
    output: str = Field("runs", description="directory that holds one directory per run")
    run_name: str | None = Field(
        None, description="name of the run directory (default: backbone-strategy)"
    )

    backbone: str = Field("resnet50", description="torchvision or timm model name")
    weights: str = Field(
        "DEFAULT", description="weights name (IMAGENET1K_V1...), a file path, or 'none'"
    )
    strategy: str = Field("freeze_except_bn_and_fc", description=f"one of {', '.join(STRATEGIES)}")
    freeze_percent: float = Field(
        0.25, ge=0.0, le=1.0, description="fraction frozen by freeze_k_percent"
    )
    frozen_bn: Literal["eval", "train"] = Field(
        "eval",
        description="frozen BatchNorm layers: 'eval' keeps ImageNet statistics, 'train' updates them",
    )

    epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    weight_decay: float = Field(0.0, ge=0)
    img_size: int | None = Field(
        None, ge=16, description="input size (default: the weights preset's, 224)"
    )
    augment: bool = Field(True, description="augment the training subset (never val/test)")
    val_fraction: float = Field(0.2, gt=0, lt=1)
    test_fraction: float = Field(0.2, gt=0, lt=1, description="only for a flat folder of classes")

    seed: int = 42
    num_workers: int | None = Field(
        None, ge=0, description="DataLoader workers (default: CPU count, max 8)"
    )
    accelerator: str = Field("auto", description="auto, cpu, cuda, mps")
    devices: str = Field("auto", description="Lightning devices: auto, 1, 2, ...")
    num_nodes: int = Field(
        1, ge=1, description="machines, each running --devices processes (torchrun or srun)"
    )
    scale_lr: Literal["none", "linear", "sqrt"] = Field(
        "none",
        description="scale lr by the global batch (batch_size x devices x nodes) over 32",
    )
    precision: str = Field("auto", description="auto, 32-true, bf16-mixed, 16-mixed")
    channels_last: bool | None = Field(
        None, description="channels-last memory format (default: auto)"
    )
    wandb: bool = False
    wandb_project: str = "inat-finetune"
    wandb_group: str | None = Field(None, description="W&B group (compare sets one per comparison)")

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, value: str) -> str:
        if value not in STRATEGIES:
            raise ValueError(f"unknown strategy '{value}'; use one of {', '.join(STRATEGIES)}")
        return value

    @field_validator("devices", mode="before")
    @classmethod
    def _devices_as_text(cls, value: Any) -> Any:
        # YAML reads `devices: 2` as a number; Lightning's spelling is text ("auto", "0,1").
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    def to_yaml_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _explain(error: ValidationError, source: str) -> str:
    first = error.errors()[0]
    option = ".".join(str(p) for p in first["loc"]) or "config"
    value = first.get("input")
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown option '{option}'; see `inat-finetune train --help`"
    return f"{source}: {option}={value!r}: {first['msg']}"


def load_config(path: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """Defaults, then the YAML file, then every override that is not None."""
    values: dict[str, Any] = {}
    source = "options"
    if path is not None:
        path = Path(path)
        source = f"--config {path}"
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"--config {path}: no such file") from None
        except yaml.YAMLError as exc:
            raise UserError(f"--config {path}: not valid YAML ({exc})".replace("\n", " ")) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise UserError(f"--config {path}: must be a mapping of option: value")
        # Accept the command line's spelling too: freeze-percent as well as freeze_percent.
        values.update({str(k).replace("-", "_"): v for k, v in (loaded or {}).items()})
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return TrainConfig(**values)
    except ValidationError as exc:
        raise UserError(_explain(exc, source)) from None
