"""One validated configuration per run, settable from YAML and from the command line.

Precedence: command-line option > YAML file (``--config``) > recipe (``--recipe seed|strong|bn_head``,
see ``training/recipes.py``; ``auto`` is no preset but a choice among them, ``experiments/auto.py``) > the defaults below, which are the original write-up's (Adam, lr 1e-3,
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
from inat_finetune.models.ensembles import why_not_for_an_ensemble
from inat_finetune.models.freezing import STRATEGIES
from inat_finetune.training.bounds import (
    MAX_BATCH,
    MAX_EPOCHS,
    MAX_FLOAT32,
    MAX_IMG_SIZE,
    MAX_LR,
    MAX_LR_SCALE,
    MAX_MINUTES,
    MAX_MIX_ALPHA,
    MAX_NODES,
    MAX_SEED,
    MAX_STEPS,
    MAX_WEIGHT_DECAY,
    MAX_WORKERS,
)
from inat_finetune.training.recipes import (
    SCHEDULE_KEYS,
    merge_layers,
    recipe_values,
    why_not_for_the_probe,
)

STAGED = "staged"  # the strategy of a run whose stage schedule decides what trains


# How the command line offers a field (cli/options.py generates the `train` and `compare`
# options from these fields, so each option is declared once, here). Every field is a `train`
# option named --field-name, whose help is the description and whose shown default is the
# field's default; json_schema_extra adds, under these keys:
COMPARE_KEY = (
    "compare"  # True: also a `compare` option (compare keeps its one split and strategies)
)
FLAG = "flag"  # the option's spelling when it is not --field-name[/--no-field-name]
UNSET = "unset"  # what a default of None means, shown as the help's default
CLI_KEY = "cli"  # False: set only in a --config file (the reason stands beside the field)
COMPARE: dict[str, Any] = {"json_schema_extra": {COMPARE_KEY: True}}
CONFIG_FILE_ONLY: dict[str, Any] = {"json_schema_extra": {CLI_KEY: False}}


class TrainConfig(BaseModel):
    # allow_inf_nan=False: lr=.inf or checkpoint_minutes=.nan in a YAML file are typos, refused.
    # Every number has the bounds it can run with, declared here (the single place): a value
    # outside them (a negative seed, 1e300 minutes) is one line naming the option, not a crash
    # deep in numpy, torch or datetime. The upper bounds sit far above any sensible value.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    data: str | None = Field(
        None, description="dataset root: nature_12K, train/+val/ or class folders", **COMPARE
    )
    output: str = Field("runs", description="directory of run directories", **COMPARE)
    run_name: str | None = Field(
        None, description="run directory name", json_schema_extra={UNSET: "backbone-strategy"}
    )

    backbone: str = Field(
        "resnet50",
        description="torchvision or timm model name; a,b: a feature ensemble of frozen "
        "backbones (with --strategy freeze_last)",
        **COMPARE,
    )
    weights: str = Field(
        "DEFAULT", description="weights name (IMAGENET1K_V1), file path, or 'none'", **COMPARE
    )
    strategy: str = Field("freeze_except_bn_and_fc", description=", ".join(STRATEGIES))
    freeze_percent: float = Field(
        0.25,
        ge=0.0,
        le=1.0,
        description="fraction of backbone tensors frozen by freeze_k_percent",
        **COMPARE,
    )
    frozen_bn: Literal["eval", "train"] = Field(
        "eval",
        description="frozen BatchNorm layers: eval (keep ImageNet stats) or train (update, as "
        "the seed)",
        **COMPARE,
    )

    epochs: int = Field(10, ge=1, le=MAX_EPOCHS, description="training epochs", **COMPARE)
    batch_size: int = Field(
        32, ge=1, le=MAX_BATCH, description="images per step on each device", **COMPARE
    )
    lr: float = Field(1e-3, gt=0, le=MAX_LR, description="learning rate", **COMPARE)
    optimizer: Literal["adam", "adamw", "sgd"] = Field(
        "adam", description="adam, adamw or sgd", **COMPARE
    )
    weight_decay: float = Field(
        0.0, ge=0, le=MAX_WEIGHT_DECAY, description="weight decay", **COMPARE
    )
    img_size: int | None = Field(
        None,
        ge=16,
        le=MAX_IMG_SIZE,
        description="input size in pixels",
        json_schema_extra={UNSET: "weights preset, 224", **COMPARE["json_schema_extra"]},
    )
    augment: bool = Field(
        True, description="augment the training subset (never val/test)", **COMPARE
    )
    augment_on: Literal["device", "cpu"] = Field(
        "device",
        description="where training images are augmented: device (whole batches after the "
        "transfer, the GPU or the CPU batch) or cpu (each image in the loader workers)",
        **COMPARE,
    )
    val_fraction: float = Field(
        0.2, gt=0, lt=1, description="share of train/ held out for validation"
    )
    test_fraction: float = Field(
        0.2, gt=0, lt=1, description="share held out for test, flat folders only"
    )

    seed: int = Field(
        42,
        ge=0,
        le=MAX_SEED,
        description="seeds splits, weights init, augmentation, workers (0 to 2**32 - 1)",
        **COMPARE,
    )
    num_workers: int | None = Field(
        None,
        ge=0,
        le=MAX_WORKERS,
        description="DataLoader workers",
        json_schema_extra={
            UNSET: "CPU count, max 8; none when a CPU of at most 4 cores trains on prepared images",
            **COMPARE["json_schema_extra"],
        },
    )
    accelerator: str = Field("auto", description="auto, cpu, cuda, mps", **COMPARE)
    devices: str = Field(
        "auto",
        description="devices (processes) per machine: auto (all GPUs), 1, 2, ... or 0,1; DDP "
        "when more than one",
        **COMPARE,
    )
    num_nodes: int = Field(
        1,
        ge=1,
        le=MAX_NODES,
        description="machines, each running --devices processes (torchrun or srun)",
        **COMPARE,
    )
    scale_lr: Literal["none", "linear", "sqrt"] = Field(
        "none",
        description="none, linear or sqrt: scale --lr by global batch (batch size x devices x "
        "nodes) / 32",
        **COMPARE,
    )
    precision: str = Field("auto", description="auto, 32-true, bf16-mixed, 16-mixed", **COMPARE)
    channels_last: bool | None = Field(
        None, description="channels-last memory format", json_schema_extra={UNSET: "auto"}
    )
    image_cache: bool = Field(
        True,
        description="decode and resize each image once into the cache",
        **COMPARE,
    )
    feature_cache: bool = Field(
        True,
        description="train the head on stored features when the backbone is frozen and the "
        "training images are not augmented",
        **COMPARE,
    )
    cache_dir: str | None = Field(
        None,
        description="cache folder",
        json_schema_extra={
            UNSET: "$INAT_FINETUNE_CACHE or ~/.cache/inat-finetune",
            **COMPARE["json_schema_extra"],
        },
    )
    compile: bool = Field(
        False, description="torch.compile the network (slow start; long GPU runs)", **COMPARE
    )
    fast_depthwise_grad: bool = Field(
        True,
        description="on the CPU, take depthwise convolutions' input gradient by the faster "
        "route of speed/depthwise_grad.py (same values up to rounding)",
        **CONFIG_FILE_ONLY,  # a switch for measuring the speed path, not for everyday runs
    )
    reuse_freed_memory: bool = Field(
        True,
        description="on the CPU, keep freed memory for reuse while a run lasts instead of "
        "returning it to the system after every step (glibc; runtime/allocator.py)",
        **CONFIG_FILE_ONLY,  # a switch for measuring the allocator, not for everyday runs
    )
    wandb: bool = Field(
        False, description="log to Weights & Biases (WANDB_MODE=offline works)", **COMPARE
    )
    wandb_project: str = Field("inat-finetune", description="W&B project", **COMPARE)
    wandb_entity: str | None = Field(
        None,
        description="W&B entity: the team or user the run belongs to",
        json_schema_extra={COMPARE_KEY: True, UNSET: "your W&B default"},
    )
    wandb_tags: list[str] | None = Field(
        None,
        description="W&B run tags: repeat the option or separate with commas",
        json_schema_extra={COMPARE_KEY: True, UNSET: "none"},
    )
    wandb_log_model: bool = Field(
        False,
        description="log best.ckpt to W&B as a model artifact when the run ends",
        **COMPARE,
    )
    wandb_group: str | None = Field(
        None,
        description="W&B group (compare sets one per comparison)",
        **CONFIG_FILE_ONLY,  # compare and sweep set it; a YAML file may
    )
    checkpoint_steps: int | None = Field(
        None,
        ge=1,
        le=MAX_STEPS,
        description="also write last.ckpt every N training steps (overrides minutes)",
        json_schema_extra={UNSET: "off"},
    )
    checkpoint_minutes: float | None = Field(
        10.0,
        ge=0,
        le=MAX_MINUTES,
        description="also write last.ckpt every N minutes of training, 0 for epoch ends only",
    )

    # Fine-tuning recipes (issue 6): see training/recipes.py, models/stages.py, tasks/optim.py, data/augment.py, data/tta.py.
    recipe: Literal["auto", "seed", "strong", "bn_head", "probe"] | None = Field(
        "auto",
        description="auto (choose among candidates by validation), seed (the original "
        "write-up), strong, bn_head (BatchNorm + head), or probe (a linear probe fitted on "
        "cached features, weight decay by CV); options override it",
    )
    budget: str | None = Field(
        None,
        pattern=r"^\d+(\.\d+)?[me]$",
        description="--recipe auto: time for choosing, in minutes (10m: measuring and every "
        "candidate's run, on a sample of the images sized to fit; not the winner's final "
        "training) or candidate epochs (20e)",
        json_schema_extra={
            UNSET: "4e",
            **COMPARE["json_schema_extra"],  # for compare --recipes auto
        },
    )
    refit: bool | None = Field(
        None,
        description="--recipe auto: train the winner again on train + validation images",
        json_schema_extra={UNSET: "on under 2000 labelled images", **COMPARE["json_schema_extra"]},
    )
    train_from: str | None = Field(
        None, description="train from this stage on (layer3, features.14, all); see errors"
    )
    lp_epochs: int = Field(
        0,
        ge=0,
        le=MAX_EPOCHS,
        description="LP-FT: head-only epochs before --train-from",
    )
    unfreeze_schedule: str | None = Field(
        None, description="gradual unfreezing, EPOCH:STAGE,...: e.g. 0:head,2:layer4,4:layer3"
    )
    backbone_lr_scale: float = Field(
        1.0, gt=0, le=MAX_LR_SCALE, description="backbone lr = lr * this"
    )
    layer_decay: float = Field(
        1.0, gt=0, le=1, description="lr * this per stage further from the head"
    )
    lr_schedule: Literal["constant", "cosine", "onecycle"] = Field(
        "constant", description="constant, cosine or onecycle"
    )
    warmup_epochs: float = Field(
        0.0, ge=0, le=MAX_EPOCHS, description="linear lr warmup (also after unfreezing)"
    )
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="e.g. 0.1")
    grad_clip_norm: float | None = Field(
        None,
        gt=0,
        le=MAX_FLOAT32,
        description="clip the gradient norm",
        json_schema_extra={UNSET: "off"},
    )
    early_stopping_patience: int | None = Field(
        None,
        ge=1,
        le=MAX_EPOCHS,
        description="stop after this many epochs without a better val accuracy",
        json_schema_extra={UNSET: "off"},
    )
    ema_decay: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="EMA of the weights, validated/tested/saved (0.999)",
        json_schema_extra={UNSET: "off"},
    )
    class_weighted_loss: bool = Field(False, description="weight the loss by 1/class frequency")
    augmentation: Literal["seed", "trivialaugment", "randaugment"] = Field(
        "seed", description="seed, trivialaugment or randaugment"
    )
    random_erasing: float = Field(0.0, ge=0, le=1, description="probability per image")
    mixup_alpha: float = Field(
        0.0, ge=0, le=MAX_MIX_ALPHA, description="MixUp on training batches, e.g. 0.2 (0: off)"
    )
    cutmix_alpha: float = Field(
        0.0, ge=0, le=MAX_MIX_ALPHA, description="CutMix on training batches, e.g. 1.0 (0: off)"
    )
    test_img_size: int | None = Field(
        None,
        ge=16,
        le=MAX_IMG_SIZE,
        description="val/test/inference size",
        json_schema_extra={UNSET: "--img-size"},
    )
    tta: Literal["none", "flip", "multicrop"] = Field(
        "none",
        description="test-time augmentation (train: of the final test): none, flip (mean of the "
        "image and its mirror image, 2x the compute), multicrop (centre and 4 corner crops, "
        "each mirrored, 10x)",
    )
    lr_find: bool = Field(
        False,
        description="learning-rate range test: plot and suggestion, then stop",
        json_schema_extra={FLAG: "--lr-find"},
    )
    lr_find_apply: bool = Field(
        False,
        description="with --lr-find: train with the suggested lr",
        json_schema_extra={FLAG: "--lr-find-apply"},
    )
    lr_find_steps: int = Field(100, ge=5, le=MAX_STEPS, description="batches in the range test")

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, value: str) -> str:
        if value not in STRATEGIES and value != STAGED:
            raise ValueError(f"unknown strategy '{value}'; use one of {', '.join(STRATEGIES)}")
        return value

    @field_validator("wandb_tags", mode="before")
    @classmethod
    def _tags_split_at_commas(cls, value: Any) -> Any:
        """``--wandb-tags a,b --wandb-tags c`` and ``wandb_tags: a,b`` are ``[a, b, c]``."""
        if isinstance(value, str):
            value = [value]
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            tags = [t.strip() for v in value for t in v.split(",") if t.strip()]
            return tags or None
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

    @model_validator(mode="after")
    def _ensemble_trains_its_head_only(self) -> TrainConfig:
        if self.recipe == "auto" and not {"strategy", *SCHEDULE_KEYS} & self.model_fields_set:
            return self  # auto chooses what trains, and tries only what an ensemble can
        why = why_not_for_an_ensemble(
            self.backbone, self.strategy, self.strategy == STAGED, self.frozen_bn, self.weights
        )
        if why is not None:
            raise ValueError(why)
        return self

    @model_validator(mode="after")
    def _probe_needs_cached_features(self) -> TrainConfig:
        if self.recipe == "probe":
            why = why_not_for_the_probe(self.augment, self.tta, self.feature_cache, self.strategy)
            if why is not None:
                raise ValueError(why)
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
