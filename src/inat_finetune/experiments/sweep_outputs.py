"""What a sweep leaves beside its trials: ``trials.csv``, ``best_config.yaml`` and the report.

Drawn from the study's storage only, never from one worker's memory, so whichever worker
stops last writes the complete picture, and ``inat-finetune sweep --trials 0`` rewrites it at
any time. Trials asked for after the study was full (marked ``OVER_BUDGET``) are not counted.
The best trial is the best completed one by validation accuracy (ties: the earlier trial).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from inat_finetune.experiments.sweep_spec import OBJECTIVE
from inat_finetune.runfiles import write_text_atomic, write_yaml_atomic
from inat_finetune.training.config import TrainConfig

OVER_BUDGET = "over_budget"  # user attribute of a trial asked for after the study was full


@dataclass
class SweepResult:
    sweep_dir: Path
    study_name: str
    storage: str
    trials_run_here: int
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None


def counted(trial: optuna.trial.FrozenTrial) -> bool:
    return not trial.user_attrs.get(OVER_BUDGET)


def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """One row per counted trial, in trial-number order."""
    rows = []
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        if not counted(t):
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
        if counted(t)
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
