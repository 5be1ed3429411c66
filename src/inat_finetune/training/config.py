"""One validated configuration per run, settable from YAML and from the command line.

Precedence: command-line option > YAML file (``--config``) > recipe (``--recipe seed|strong``,
see ``training/recipes.py``) > the defaults below, which are the original write-up's (Adam, lr 1e-3,
cross-entropy, batch 32, 224 px from the weights preset).
The resolved configuration is saved as ``config.yaml`` in the run directory; passing that file
back with ``--config`` repeats the run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from inat_finetune.errors import UserError
from inat_finetune.models.freezing import STRATEGIES

STAGED = "staged"  # the strategy of a run whose stage schedule decides what trains


# Upper bounds of the numeric options (see TrainConfig). Each is far above any sensible value
# and below where the value breaks something: numpy seeds are 32-bit, torch keeps lr and
# weight decay as float32 scalars (3.4e38), datetime.timedelta ends at 1e9 days, and an image
# side beyond a few thousand pixels does not fit a batch in memory.
MAX_SEED = 2**32 - 1


MAX_EPOCHS = 1_000_000


MAX_BATCH = 1_000_000


MAX_STEPS = 10**12


MAX_LR = 100.0


MAX_LR_SCALE = 1000.0


MAX_WEIGHT_DECAY = 100.0


MAX_MIX_ALPHA = 1000.0


MAX_IMG_SIZE = 4096


MAX_WORKERS = 1024


MAX_NODES = 100_000


MAX_MINUTES = 1e6  # about two years


MAX_FLOAT32 = 3.4e38


class TrainConfig(BaseModel):
    # allow_inf_nan=False: lr=.inf or checkpoint_minutes=.nan in a YAML file are typos, refused.
    # Every number has the bounds it can run with, declared here (the single place): a value
    # outside them (a negative seed, 1e300 minutes) is one line naming the option, not a crash
    # deep in numpy, torch or datetime. The upper bounds sit far above any sensible value.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

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

    epochs: int = Field(10, ge=1, le=MAX_EPOCHS)
    batch_size: int = Field(32, ge=1, le=MAX_BATCH)
    lr: float = Field(1e-3, gt=0, le=MAX_LR)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    weight_decay: float = Field(0.0, ge=0, le=MAX_WEIGHT_DECAY)
    img_size: int | None = Field(
        None, ge=16, le=MAX_IMG_SIZE, description="input size (default: the weights preset's, 224)"
    )
    augment: bool = Field(True, description="augment the training subset (never val/test)")
    val_fraction: float = Field(0.2, gt=0, lt=1)
    test_fraction: float = Field(0.2, gt=0, lt=1, description="only for a flat folder of classes")

    seed: int = Field(42, ge=0, le=MAX_SEED, description="0 to 2**32 - 1 (numpy's range)")
    num_workers: int | None = Field(
        None,
        ge=0,
        le=MAX_WORKERS,
        description="DataLoader workers (default: CPU count, max 8; none when a CPU of at most "
        "4 cores trains on prepared images)",
    )
    accelerator: str = Field("auto", description="auto, cpu, cuda, mps")
    devices: str = Field("auto", description="Lightning devices: auto, 1, 2, ...")
    num_nodes: int = Field(
        1,
        ge=1,
        le=MAX_NODES,
        description="machines, each running --devices processes (torchrun or srun)",
    )
    scale_lr: Literal["none", "linear", "sqrt"] = Field(
        "none",
        description="scale lr by the global batch (batch_size x devices x nodes) over 32",
    )
    precision: str = Field("auto", description="auto, 32-true, bf16-mixed, 16-mixed")
    channels_last: bool | None = Field(
        None, description="channels-last memory format (default: auto)"
    )
    image_cache: bool = Field(
        True, description="decode and resize each image once into a cache (speed/prepared.py)"
    )
    feature_cache: bool = Field(
        True,
        description="train the head on stored features when the backbone is frozen and "
        "deterministic (speed/features.py)",
    )
    cache_dir: str | None = Field(
        None, description="cache folder (default: $INAT_FINETUNE_CACHE or ~/.cache/inat-finetune)"
    )
    compile: bool = Field(
        False, description="torch.compile the network (slow start; long GPU runs)"
    )
    fast_depthwise_grad: bool = Field(
        True,
        description="on the CPU, take depthwise convolutions' input gradient by the faster "
        "route of speed/depthwise_grad.py (same values up to rounding)",
    )
    reuse_freed_memory: bool = Field(
        True,
        description="on the CPU, keep freed memory for reuse while a run lasts instead of "
        "returning it to the system after every step (glibc; runtime/allocator.py)",
    )
    wandb: bool = False
    wandb_project: str = "inat-finetune"
    wandb_group: str | None = Field(None, description="W&B group (compare sets one per comparison)")
    checkpoint_steps: int | None = Field(
        None,
        ge=1,
        le=MAX_STEPS,
        description="also write last.ckpt every N training steps (overrides minutes)",
    )
    checkpoint_minutes: float | None = Field(
        10.0,
        ge=0,
        le=MAX_MINUTES,
        description="also write last.ckpt every N minutes of training (0: epoch ends only)",
    )

    # Fine-tuning recipes (issue 6): see training/recipes.py, models/stages.py, tasks/optim.py, data/augment.py, data/tta.py.
    recipe: Literal["seed", "strong"] | None = Field(
        None, description="preset of the options below; explicit options override it"
    )
    train_from: str | None = Field(
        None, description="stage from which the network trains (layer3, features.14, all)"
    )
    lp_epochs: int = Field(
        0,
        ge=0,
        le=MAX_EPOCHS,
        description="LP-FT: epochs of the head alone before train_from (default all)",
    )
    unfreeze_schedule: str | None = Field(
        None, description="gradual unfreezing, EPOCH:STAGE,...: e.g. 0:head,2:layer4,4:layer3"
    )
    backbone_lr_scale: float = Field(
        1.0, gt=0, le=MAX_LR_SCALE, description="backbone lr = lr * this"
    )
    layer_decay: float = Field(
        1.0, gt=0, le=1, description="each stage further from the head: lr * this once more"
    )
    lr_schedule: Literal["constant", "cosine", "onecycle"] = "constant"
    warmup_epochs: float = Field(
        0.0, ge=0, le=MAX_EPOCHS, description="linear warmup (also after unfreezing)"
    )
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    grad_clip_norm: float | None = Field(
        None, gt=0, le=MAX_FLOAT32, description="clip the gradient norm"
    )
    early_stopping_patience: int | None = Field(
        None,
        ge=1,
        le=MAX_EPOCHS,
        description="stop after this many epochs without a better val accuracy",
    )
    ema_decay: float | None = Field(
        None, gt=0, lt=1, description="validate, test and save an EMA of the weights (0.999)"
    )
    class_weighted_loss: bool = Field(False, description="weight the loss by 1/class frequency")
    augmentation: Literal["seed", "trivialaugment", "randaugment"] = "seed"
    random_erasing: float = Field(0.0, ge=0, le=1, description="probability per image")
    mixup_alpha: float = Field(
        0.0, ge=0, le=MAX_MIX_ALPHA, description="MixUp on training batches (0 = off)"
    )
    cutmix_alpha: float = Field(
        0.0, ge=0, le=MAX_MIX_ALPHA, description="CutMix on training batches (0 = off)"
    )
    test_img_size: int | None = Field(
        None,
        ge=16,
        le=MAX_IMG_SIZE,
        description="validation/test/inference input size (default: img_size)",
    )
    tta: Literal["none", "flip", "multicrop"] = Field(
        "none", description="test-time augmentation of the final test"
    )
    lr_find: bool = Field(False, description="run a learning-rate range test first")
    lr_find_apply: bool = Field(False, description="train with the suggested learning rate")
    lr_find_steps: int = Field(100, ge=5, le=MAX_STEPS, description="batches in the range test")

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, value: str) -> str:
        if value not in STRATEGIES and value != STAGED:
            raise ValueError(f"unknown strategy '{value}'; use one of {', '.join(STRATEGIES)}")
        return value

    @field_validator("unfreeze_schedule")
    @classmethod
    def _schedule_syntax(cls, value: str | None) -> str | None:
        from inat_finetune.models.stages import format_schedule, parse_schedule

        return None if value is None else format_schedule(parse_schedule(value))

    @model_validator(mode="before")
    @classmethod
    def _stage_schedule_replaces_strategy(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        scheduled = [
            k for k in ("train_from", "lp_epochs", "unfreeze_schedule") if data.get(k) is not None
        ]
        scheduled = [k for k in scheduled if not (k == "lp_epochs" and data[k] == 0)]
        strategy = data.get("strategy")
        if scheduled:
            if strategy not in (None, STAGED):
                raise ValueError(
                    f"strategy {strategy} and {', '.join(scheduled)} both say what trains; "
                    "give one of them"
                )
            if data.get("unfreeze_schedule") and len(scheduled) > 1:
                raise ValueError(
                    "unfreeze_schedule is the whole schedule; drop train_from and lp_epochs"
                )
            data = {**data, "strategy": STAGED}
        elif strategy == STAGED:
            raise ValueError("strategy staged needs train_from, lp_epochs or unfreeze_schedule")
        return data

    @model_validator(mode="after")
    def _probe_leaves_time_to_tune(self) -> TrainConfig:
        if self.lp_epochs and self.lp_epochs >= self.epochs:
            raise ValueError(
                f"lp_epochs {self.lp_epochs} leaves no epoch of {self.epochs} to fine-tune; "
                "lower it (0 turns the linear probe off) or raise epochs"
            )
        return self

    def stage_schedule(self) -> list[tuple[int, str]] | None:
        """What trains from which epoch, when a stage schedule decides it; else None."""
        from inat_finetune.models.stages import ALL, HEAD, parse_schedule

        if self.strategy != STAGED:
            return None
        if self.unfreeze_schedule:
            return parse_schedule(self.unfreeze_schedule)
        if self.lp_epochs:
            return [(0, HEAD), (self.lp_epochs, self.train_from or ALL)]
        return [(0, self.train_from or ALL)]

    @field_validator("devices", mode="before")
    @classmethod
    def _devices_as_text(cls, value: Any) -> Any:
        # YAML reads `devices: 2` as a number; Lightning's spelling is text ("auto", "0,1").
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    def to_yaml_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def explain_validation_error(error: ValidationError, source: str) -> str:
    first = error.errors()[0]
    option = ".".join(str(p) for p in first["loc"]) or "config"
    value = first.get("input")
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown option {option!r}; see `inat-finetune train --help`"
    if not first["loc"]:  # a rule across options: the message names them
        return f"{source}: {first['msg'].removeprefix('Value error, ')}"
    return f"{source}: {option}={value!r}: {first['msg']}"


def load_config(path: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """Defaults, then the recipe, then the YAML file, then every override that is not None."""
    from inat_finetune.training.recipes import merge_layers, recipe_values

    values: dict[str, Any] = {}
    source = "options"
    if path is not None:
        path = Path(path)
        source = f"--config {path}"
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"--config {path}: no such file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"--config {path}: not a readable UTF-8 text file ({exc})") from None
        except yaml.YAMLError as exc:
            raise UserError(f"--config {path}: not valid YAML ({exc})".replace("\n", " ")) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise UserError(f"--config {path}: must be a mapping of option: value")
        # Accept the command line's spelling too: freeze-percent as well as freeze_percent.
        values.update({str(k).replace("-", "_"): v for k, v in (loaded or {}).items()})
    given = {k: v for k, v in overrides.items() if v is not None}
    recipe = given.get("recipe", values.get("recipe"))
    try:
        base = recipe_values(recipe)
    except UserError as exc:  # name the file when the recipe came from it
        raise UserError(str(exc) if "recipe" in given else f"{source}: {exc}") from None
    values = merge_layers([base, values, given])
    try:
        return TrainConfig(**values)
    except ValidationError as exc:
        raise UserError(explain_validation_error(exc, source)) from None
