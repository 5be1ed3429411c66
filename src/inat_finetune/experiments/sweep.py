"""Hyper-parameter sweeps with Optuna: many ``train`` runs, shared by any number of workers.

A sweep is described by one YAML file (``experiments/sweep_spec.py``: the format, the
search space, sampler and pruner).

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
        trials.csv, sweep.md, report.html, figures/  the sweep report (see sweep_outputs)
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import optuna

from inat_finetune.data.folders import DataSplit
from inat_finetune.errors import UserError
from inat_finetune.experiments.sweep_outputs import (
    OVER_BUDGET,
    SweepResult,
    counted,
    write_sweep_outputs,
)
from inat_finetune.experiments.sweep_spec import (
    OBJECTIVE,
    SweepSpec,
    load_sweep_spec,
    make_pruner,
    make_sampler,
    one_device,
    suggest,
    validated,
)
from inat_finetune.runfiles import write_yaml_atomic
from inat_finetune.training.config import TrainConfig
from inat_finetune.training.run import train
from inat_finetune.training.setup import split_for_run

log = logging.getLogger(__name__)


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
            sampler=make_sampler(spec),
            pruner=make_pruner(spec),
            load_if_exists=True,
        )
    )


def _started(study: optuna.Study) -> int:
    return sum(counted(t) for t in study.get_trials(deepcopy=False))


def _within_budget(study: optuna.Study, number: int, budget: int) -> bool:
    """Whether trial ``number`` is one of the study's first ``budget`` trials.

    Trial numbers are handed out one by one by the storage, so every worker agrees on this
    without a lock. (A trial over the budget that is not yet marked is counted here, which only
    happens when this one is over the budget too.)
    """
    earlier = [t for t in study.get_trials(deepcopy=False) if t.number < number and counted(t)]
    return len(earlier) < budget


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
    base = one_device(base, spec_path)
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
            study.sampler = make_sampler(spec, seed=spec.seed + trial.number)
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
    config = validated(values, f"trial {trial.number}")
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


def wandb_sweep_config(spec_path: str | Path, **overrides: Any) -> dict[str, Any]:
    """The same search as a W&B sweep: `wandb sweep` this file, then `wandb agent` the id.

    Each W&B run calls ``inat-finetune train --config <its parameters as JSON>`` (JSON is YAML),
    so no option needs a flag spelling. W&B has no conditional parameters: ``when`` is dropped,
    and a parameter that does not apply is simply ignored by training (freeze_percent outside
    freeze_k_percent).
    """
    spec, base = load_sweep_spec(spec_path, **overrides)
    base = one_device(base, spec_path)
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
