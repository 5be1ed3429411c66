"""A sweep's specification: ``sweep.yaml`` read and checked, the search space, sampler and pruner.

A sweep is described by one YAML file::

    study_name: nature-resnet50     # optional; default: the file's name
    base:                           # any `train` option, the same for every trial
      data: data/nature_12K
      backbone: resnet50
      epochs: 5
    search:                         # any `train` option -> where to search it
      strategy: {choices: [freeze_last, freeze_k_percent, freeze_except_bn_and_fc]}
      freeze_percent: {low: 0.1, high: 0.9, when: {strategy: freeze_k_percent}}
      lr: {low: 1.0e-5, high: 1.0e-2, log: true}
      batch_size: {choices: [16, 32, 64]}
    sampler: tpe                    # tpe (default) or random; `seed:` seeds it
    pruner: median                  # median (default), percentile, hyperband, threshold, none;
                                    # or {type: median, n_warmup_steps: 2, ...} with its options

Ranges with integer bounds are searched as integers; ``log: true`` searches on a log scale,
``step:`` on a grid. ``when`` searches a parameter only in trials where the named earlier
parameters (or base options) have the given value (or one of a list of values).

Everything in the file is checked when it is read (``load_sweep_spec``): every choice and
both ends of every range against the training options, the sampler and the pruner, so a typo
fails in a second, not after hours of trials. Errors name the file (``--config``) and the key.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from inat_finetune.errors import UserError
from inat_finetune.runtime.distributed import count_devices
from inat_finetune.runtime.hardware import resolve_accelerator
from inat_finetune.training.config import TrainConfig, explain_validation_error

OBJECTIVE = "val/acc"  # reported per epoch for pruning; the trial's value is its best


NOT_SEARCHABLE = frozenset({"output", "run_name"})  # the sweep decides where trials go


class SearchParam(BaseModel):
    """One searched option: ``choices``, or a ``low``..``high`` range (``log``, ``step``)."""

    model_config = ConfigDict(extra="forbid")

    choices: list[Any] | None = None
    low: int | float | None = None
    high: int | float | None = None
    log: bool = False
    step: int | float | None = None
    when: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> SearchParam:
        ranged = self.low is not None or self.high is not None or self.step is not None
        if self.choices is not None:
            if ranged or self.log:
                raise ValueError("give either choices: [...] or low:/high:, not both")
            if not self.choices:
                raise ValueError("choices: is empty")
            return self
        if self.low is None or self.high is None:
            raise ValueError("needs choices: [...] or both low: and high:")
        if self.low >= self.high:
            raise ValueError(f"low {self.low} must be below high {self.high}")
        if self.log and self.low <= 0:
            raise ValueError("log: true needs low > 0")
        if self.log and self.step is not None:
            raise ValueError("log: true and step: cannot be combined")
        return self

    @property
    def is_int(self) -> bool:
        return all(
            isinstance(v, int) and not isinstance(v, bool)
            for v in (self.low, self.high, self.step if self.step is not None else 1)
        )

    def bounds(self) -> list[Any]:
        return list(self.choices) if self.choices is not None else [self.low, self.high]

    def applies(self, values: dict[str, Any]) -> bool:
        for name, wanted in (self.when or {}).items():
            allowed = wanted if isinstance(wanted, list) else [wanted]
            if values.get(name) not in allowed:
                return False
        return True


class SweepSpec(BaseModel):
    """The contents of ``sweep.yaml`` (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    study_name: str | None = None
    base: dict[str, Any] = {}
    search: dict[str, SearchParam]
    sampler: str = "tpe"
    seed: int | None = None
    pruner: str | dict[str, Any] = "median"


def _dashes_to_underscores(values: dict[str, Any]) -> dict[str, Any]:
    return {str(k).replace("-", "_"): v for k, v in values.items()}


def load_sweep_spec(path: str | Path, **overrides: Any) -> tuple[SweepSpec, TrainConfig]:
    """Read and check ``sweep.yaml``; ``overrides`` (not None) replace base options.

    Every choice and both ends of every range are checked against the training options now, so
    a typo fails in a second, not after hours of trials.
    """
    path = Path(path)
    source = f"--config {path}"
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{source}: no such file") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{source}: not valid YAML ({exc})".replace("\n", " ")) from None
    if not isinstance(loaded, dict) or "search" not in loaded:
        raise UserError(f"{source}: must be a mapping with a search: section (and base:)")
    loaded["base"] = _dashes_to_underscores(loaded.get("base") or {})
    loaded["search"] = _dashes_to_underscores(loaded.get("search") or {})
    try:
        spec = SweepSpec(**loaded)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise UserError(f"{source}: {where}: {first['msg']}") from None
    spec.base.update(_dashes_to_underscores({k: v for k, v in overrides.items() if v is not None}))
    base = validated(spec.base, f"{source} base")
    known = set(TrainConfig.model_fields)
    for name, param in spec.search.items():
        if name not in known or name in NOT_SEARCHABLE:
            raise UserError(
                f"{source}: search.{name}: not a searchable train option; use one of "
                f"{', '.join(sorted(known - NOT_SEARCHABLE))}"
            )
        for condition in param.when or {}:
            if condition not in known:
                raise UserError(f"{source}: search.{name}.when: unknown option '{condition}'")
        for value in param.bounds():
            validated({**spec.base, name: value}, f"{source} search.{name}")
    if not spec.search:
        raise UserError(f"{source}: search: is empty; name at least one option to search")
    make_sampler(spec, source)
    make_pruner(spec, source)
    return spec, base


def validated(values: dict[str, Any], source: str) -> TrainConfig:
    try:
        return TrainConfig(**values)
    except ValidationError as exc:
        raise UserError(explain_validation_error(exc, source)) from None


def make_sampler(
    spec: SweepSpec, source: str = "sweep", seed: int | None = None
) -> optuna.samplers.BaseSampler:
    seed = spec.seed if seed is None else seed
    if spec.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise UserError(f"{source}: sampler: {spec.sampler!r}; use tpe or random")


PRUNERS: dict[str, Callable[..., optuna.pruners.BasePruner]] = {
    "median": optuna.pruners.MedianPruner,
    "percentile": optuna.pruners.PercentilePruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "threshold": optuna.pruners.ThresholdPruner,
    "none": optuna.pruners.NopPruner,
}


# Epoch 0 of fine-tuning is mostly the new head settling: judge trials from epoch 1 on.
PRUNER_DEFAULTS = {"median": {"n_warmup_steps": 1}, "percentile": {"n_warmup_steps": 1}}


def make_pruner(spec: SweepSpec, source: str = "sweep") -> optuna.pruners.BasePruner:
    options = dict(spec.pruner) if isinstance(spec.pruner, dict) else {"type": spec.pruner}
    kind = str(options.pop("type", "median"))
    if kind not in PRUNERS:
        raise UserError(f"{source}: pruner: {kind!r}; use one of {', '.join(PRUNERS)}")
    try:
        return PRUNERS[kind](**{**PRUNER_DEFAULTS.get(kind, {}), **options})
    except (TypeError, ValueError) as exc:
        raise UserError(f"{source}: pruner {kind}: {exc}") from None


def suggest(trial: optuna.Trial, spec: SweepSpec) -> dict[str, Any]:
    """The trial's values for the search space, in the order the file lists them."""
    values: dict[str, Any] = dict(spec.base)
    chosen: dict[str, Any] = {}
    for name, param in spec.search.items():
        if not param.applies(values):
            continue
        if param.choices is not None:
            value = trial.suggest_categorical(name, param.choices)
        elif param.is_int:
            value = trial.suggest_int(
                name, int(param.low), int(param.high), step=int(param.step or 1), log=param.log
            )
        else:
            value = trial.suggest_float(
                name, float(param.low), float(param.high), step=param.step, log=param.log
            )
        values[name] = chosen[name] = value
    return chosen


def one_device(base: TrainConfig, spec_path: str | Path) -> TrainConfig:
    """Trials run in one process each: scale a sweep out by workers, not by DDP in a trial."""
    accelerator = resolve_accelerator(base.accelerator)
    if base.num_nodes > 1 or (
        base.devices not in ("auto", "-1") and count_devices(base.devices, accelerator) > 1
    ):
        raise UserError(
            f"--config {spec_path}: a sweep trial runs in one process (devices: 1); to use "
            "several GPUs run one worker per GPU: CUDA_VISIBLE_DEVICES=0 inat-finetune sweep ..."
        )
    if base.data is None:
        raise UserError(f"--config {spec_path}: base: needs data: (or pass --data)")
    return base.model_copy(update={"devices": "1"})
