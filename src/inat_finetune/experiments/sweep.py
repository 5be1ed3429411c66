"""Hyper-parameter sweeps with Optuna: many ``train`` runs, shared by any number of workers.

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

Every trial is an ordinary run directory; the objective is its best validation accuracy, never
test accuracy (choosing on test accuracy would make the reported test accuracy optimistic).
Trials are pruned from their per-epoch validation accuracy. ``--trials N`` is the size of the
whole study, not per worker: any number of workers can run the same command against one storage
(a SQLite file in the sweep directory by default, any Optuna RDB URL with ``--storage``), and
together they run N trials (trials that fail count too). Each worker writes, when it stops:

    <output>/sweep-<study>/
        study.db           the Optuna storage (SQLite, unless --storage names another)
        trials/<..>-trial-NNNN/  one run directory per trial run here
        best_config.yaml   the best trial's configuration: `inat-finetune train --config` it
        trials.csv, sweep.md, report.html, figures/  the sweep report (see sweep_report)
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import optuna
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from inat_finetune.data.folders import DataSplit
from inat_finetune.errors import UserError
from inat_finetune.runfiles import write_text_atomic, write_yaml_atomic
from inat_finetune.runtime.distributed import count_devices
from inat_finetune.runtime.hardware import resolve_accelerator
from inat_finetune.training.config import TrainConfig, explain_validation_error
from inat_finetune.training.run import train
from inat_finetune.training.setup import split_for_run

log = logging.getLogger(__name__)


OBJECTIVE = "val/acc"  # reported per epoch for pruning; the trial's value is its best


OVER_BUDGET = "over_budget"  # user attribute of a trial asked for after the study was full


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


@dataclass
class SweepResult:
    sweep_dir: Path
    study_name: str
    storage: str
    trials_run_here: int
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None


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
    base = _validated(spec.base, f"{source} base")
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
            _validated({**spec.base, name: value}, f"{source} search.{name}")
    if not spec.search:
        raise UserError(f"{source}: search: is empty; name at least one option to search")
    _sampler(spec, source)
    _pruner(spec, source)
    return spec, base


def _validated(values: dict[str, Any], source: str) -> TrainConfig:
    try:
        return TrainConfig(**values)
    except ValidationError as exc:
        raise UserError(explain_validation_error(exc, source)) from None


def _sampler(
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


def _pruner(spec: SweepSpec, source: str = "sweep") -> optuna.pruners.BasePruner:
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


class PruningCallback(L.Callback):
    """Reports each epoch's validation accuracy to the trial; stops training when it is pruned.

    Training stops at the end of the epoch instead of raising, so the pruned trial still leaves a
    complete run directory (tested checkpoint, report) to look at.
    """

    def __init__(self, trial: optuna.Trial, monitor: str = OBJECTIVE) -> None:
        self.trial = trial
        self.monitor = monitor
        self.pruned_at: int | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if trainer.sanity_checking or value is None:
            return
        epoch = trainer.current_epoch
        self.trial.report(float(value), step=epoch)
        if self.pruned_at is None and self.trial.should_prune():
            self.pruned_at = epoch
            trainer.should_stop = True


def default_storage(sweep_dir: Path) -> str:
    return f"sqlite:///{(sweep_dir / 'study.db').resolve()}"


def _retry(what: Callable[[], Any], attempts: int = 8) -> Any:
    """Workers starting together race to create the same tables and study; the loser retries."""
    import sqlalchemy.exc

    for attempt in range(attempts):
        try:
            return what()
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def open_study(storage: str, study_name: str, spec: SweepSpec) -> optuna.Study:
    import sqlalchemy.exc

    engine_kwargs: dict[str, Any] = {}
    if storage.startswith("sqlite"):
        # SQLite lets one writer in at a time; others wait up to this long instead of failing.
        engine_kwargs = {"connect_args": {"timeout": 60}}
    try:
        rdb = _retry(lambda: optuna.storages.RDBStorage(storage, engine_kwargs=engine_kwargs))
    except (sqlalchemy.exc.ArgumentError, sqlalchemy.exc.OperationalError, ImportError) as exc:
        raise UserError(f"--storage {storage}: cannot open it ({exc})".splitlines()[0]) from None
    return _retry(
        lambda: optuna.create_study(
            storage=rdb,
            study_name=study_name,
            direction="maximize",
            sampler=_sampler(spec),
            pruner=_pruner(spec),
            load_if_exists=True,
        )
    )


def _counted(trial: optuna.trial.FrozenTrial) -> bool:
    return not trial.user_attrs.get(OVER_BUDGET)


def _started(study: optuna.Study) -> int:
    return sum(_counted(t) for t in study.get_trials(deepcopy=False))


def _within_budget(study: optuna.Study, number: int, budget: int) -> bool:
    """Whether trial ``number`` is one of the study's first ``budget`` trials.

    Trial numbers are handed out one by one by the storage, so every worker agrees on this
    without a lock. (A trial over the budget that is not yet marked is counted here, which only
    happens when this one is over the budget too.)
    """
    earlier = [t for t in study.get_trials(deepcopy=False) if t.number < number and _counted(t)]
    return len(earlier) < budget


def _one_device(base: TrainConfig, spec_path: str | Path) -> TrainConfig:
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


def sweep_dir_for(output: str | Path, study_name: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", study_name).strip("-") or "sweep"
    return Path(output) / f"sweep-{safe}"


def run_sweep(
    spec_path: str | Path,
    trials: int,
    storage: str | None = None,
    study_name: str | None = None,
    progress: bool = True,
    trial_reports: bool = True,
    **overrides: Any,
) -> SweepResult:
    """Run trials until the study holds ``trials`` of them, then write the sweep's outputs."""
    if trials < 0:
        raise UserError(f"--trials {trials}: must be 0 (only write the report) or more")
    spec, base = load_sweep_spec(spec_path, **overrides)
    base = _one_device(base, spec_path)
    name = study_name or spec.study_name or Path(spec_path).stem
    sweep_dir = sweep_dir_for(base.output, name)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    storage_url = storage or default_storage(sweep_dir)
    study = open_study(storage_url, name, spec)
    log.info("Study %s in %s: %d of %d trials started", name, storage_url, _started(study), trials)

    splits: dict[tuple[Any, ...], DataSplit] = {}
    worker = f"{socket.gethostname()}:{os.getpid()}"
    ran = 0
    while _started(study) < trials:
        trial = study.ask()
        if spec.seed is not None:
            # Seeded by trial number, not once per worker: workers sharing a study would
            # otherwise all propose the same first configurations.
            study.sampler = _sampler(spec, seed=spec.seed + trial.number)
        if not _within_budget(study, trial.number, trials):
            # Another worker asked at the same moment and took the last place.
            trial.set_user_attr(OVER_BUDGET, True)
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            break
        trial.set_user_attr("worker", worker)
        ran += 1
        try:
            value = _run_trial(trial, spec, base, sweep_dir, splits, progress, trial_reports)
        except optuna.TrialPruned as pruned:
            log.info("Trial %d pruned: %s", trial.number, pruned)
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            continue
        except RuntimeError as exc:
            # Out of memory, a diverging configuration: this trial fails, the sweep goes on.
            log.error("Trial %d failed: %s", trial.number, str(exc).splitlines()[0])
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            continue
        except BaseException:
            # Bad options (UserError) fail every trial alike; Ctrl+C stops the worker.
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise
        study.tell(trial, value)
        log.info("Trial %d: best val acc %.4f", trial.number, value)
    return write_sweep_outputs(study, sweep_dir, base, storage_url, ran)


def _run_trial(
    trial: optuna.Trial,
    spec: SweepSpec,
    base: TrainConfig,
    sweep_dir: Path,
    splits: dict[tuple[Any, ...], DataSplit],
    progress: bool,
    report: bool,
) -> float:
    params = suggest(trial, spec)
    values = {
        **base.model_dump(),
        **params,
        "output": str(sweep_dir / "trials"),
        "run_name": f"trial-{trial.number:04d}",
    }
    if base.wandb:
        values["wandb_group"] = base.wandb_group or sweep_dir.name
    config = _validated(values, f"trial {trial.number}")
    trial.set_user_attr("config", config.to_yaml_dict())
    log.info("Trial %d: %s", trial.number, ", ".join(f"{k}={v}" for k, v in params.items()))
    # All trials on one split (unless the split's own options are searched): scan it once.
    key = (config.data, config.seed, config.val_fraction, config.test_fraction)
    if key not in splits:
        splits[key] = split_for_run(config)
    pruning = PruningCallback(trial)
    result = train(config, split=splits[key], progress=progress, report=report, callbacks=[pruning])
    trial.set_user_attr("run_dir", str(result.run_dir))
    trial.set_user_attr("test_acc", result.results["test_acc"])
    if pruning.pruned_at is not None:
        raise optuna.TrialPruned(f"after epoch {pruning.pruned_at}")
    return float(result.results["best_val_acc"])


def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """One row per counted trial, in trial-number order."""
    rows = []
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        if not _counted(t):
            continue
        duration = (
            (t.datetime_complete - t.datetime_start).total_seconds()
            if (t.datetime_complete and t.datetime_start)
            else None
        )
        rows.append(
            {
                "number": t.number,
                "state": t.state.name.lower(),
                "value": t.value,
                "params": dict(t.params),
                "curve": dict(sorted(t.intermediate_values.items())),
                "epochs": len(t.intermediate_values),
                "duration_s": round(duration, 1) if duration is not None else None,
                "run_dir": t.user_attrs.get("run_dir"),
                "worker": t.user_attrs.get("worker"),
                "config": t.user_attrs.get("config"),
                "test_acc": t.user_attrs.get("test_acc"),
            }
        )
    return rows


def best_row(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    complete = [r for r in rows if r["state"] == "complete" and r["value"] is not None]
    # Ties go to the earlier trial, as in Optuna.
    return max(complete, key=lambda r: (r["value"], -r["number"])) if complete else None


def best_config(best: dict[str, Any], base: TrainConfig, study_name: str) -> dict[str, Any]:
    """The best trial's configuration, writing its run where plain `train` runs go."""
    config = dict(best["config"])
    config.update({"output": base.output, "run_name": f"{study_name}-best"})
    return TrainConfig(**config).to_yaml_dict()


def trials_csv(rows: list[dict[str, Any]]) -> str:
    names = sorted({name for row in rows for name in row["params"]})
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["number", "state", "best_val_acc", "epochs", "duration_s", *names, "run_dir"])
    for row in rows:
        writer.writerow(
            [
                row["number"],
                row["state"],
                "" if row["value"] is None else f"{row['value']:.6f}",
                row["epochs"],
                "" if row["duration_s"] is None else row["duration_s"],
                *(row["params"].get(name, "") for name in names),
                row["run_dir"] or "",
            ]
        )
    return buffer.getvalue()


def param_importances(study: optuna.Study) -> dict[str, float] | str:
    """Optuna's importances (PED-ANOVA), or why there are none yet."""
    import warnings

    complete = [
        t
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if _counted(t)
    ]
    if len(complete) < 2:
        return "needs at least two completed trials"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            evaluator = optuna.importance.PedAnovaImportanceEvaluator()
            return dict(optuna.importance.get_param_importances(study, evaluator=evaluator))
    except (ValueError, RuntimeError, ZeroDivisionError) as exc:
        return f"not computable yet ({exc})"


def write_sweep_outputs(
    study: optuna.Study,
    sweep_dir: Path,
    base: TrainConfig,
    storage: str,
    ran: int,
) -> SweepResult:
    """trials.csv, best_config.yaml, sweep.md, figures and report.html, from the storage.

    Every worker writes them when it stops, atomically, so the last one to stop leaves the
    complete picture; `inat-finetune sweep --trials 0` rewrites them at any time.
    """
    from inat_finetune.reporting.sweep_report import write_sweep_report

    rows = trial_rows(study)
    best = best_row(rows)
    write_text_atomic(sweep_dir / "trials.csv", trials_csv(rows))
    if best is not None and best["config"]:
        write_yaml_atomic(sweep_dir / "best_config.yaml", best_config(best, base, study.study_name))
    summary = {
        "study_name": study.study_name,
        "storage": storage,
        "objective": f"best {OBJECTIVE} over the epochs (maximised)",
        "rows": rows,
        "best": best,
        "importances": param_importances(study),
    }
    write_sweep_report(sweep_dir, summary)
    return SweepResult(sweep_dir, study.study_name, storage, ran, rows, best)


def wandb_sweep_config(spec_path: str | Path, **overrides: Any) -> dict[str, Any]:
    """The same search as a W&B sweep: `wandb sweep` this file, then `wandb agent` the id.

    Each W&B run calls ``inat-finetune train --config <its parameters as JSON>`` (JSON is YAML),
    so no option needs a flag spelling. W&B has no conditional parameters: ``when`` is dropped,
    and a parameter that does not apply is simply ignored by training (freeze_percent outside
    freeze_k_percent).
    """
    spec, base = load_sweep_spec(spec_path, **overrides)
    base = _one_device(base, spec_path)
    parameters: dict[str, Any] = {
        name: {"value": value}
        for name, value in {**base.to_yaml_dict(), "wandb": True}.items()
        if value is not None and name not in spec.search
    }
    for name, param in spec.search.items():
        if param.choices is not None:
            parameters[name] = {"values": list(param.choices)}
        elif param.step is not None:
            parameters[name] = {
                "distribution": "q_uniform",
                "min": param.low,
                "max": param.high,
                "q": param.step,
            }
        elif param.is_int:
            kind = "q_log_uniform_values" if param.log else "int_uniform"
            parameters[name] = {"distribution": kind, "min": param.low, "max": param.high}
            if param.log:
                parameters[name]["q"] = 1
        else:
            kind = "log_uniform_values" if param.log else "uniform"
            parameters[name] = {
                "distribution": kind,
                "min": float(param.low),
                "max": float(param.high),
            }
    config: dict[str, Any] = {
        "name": spec.study_name or Path(spec_path).stem,
        "project": base.wandb_project,
        "method": "random" if spec.sampler == "random" else "bayes",
        "metric": {"name": OBJECTIVE, "goal": "maximize"},
        "parameters": parameters,
        "command": ["${env}", "inat-finetune", "train", "--config", "${args_json_file}"],
    }
    pruner = spec.pruner if isinstance(spec.pruner, str) else spec.pruner.get("type", "median")
    if pruner != "none":
        config["early_terminate"] = {"type": "hyperband", "min_iter": 2}
    return config


def export_wandb(spec_path: str | Path, out: str | Path, **overrides: Any) -> Path:
    return write_yaml_atomic(out, wandb_sweep_config(spec_path, **overrides))
