"""Optuna sweeps: the search space file, pruning, two workers on one SQLite study, W&B export."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import ROOT, make_class_folders
from typer.testing import CliRunner

from inat_finetune.cli.main import app
from inat_finetune.errors import UserError
from inat_finetune.experiments.sweep import (
    OVER_BUDGET,
    default_storage,
    load_sweep_spec,
    run_sweep,
    suggest,
    sweep_dir_for,
    wandb_sweep_config,
)
from inat_finetune.training.config import load_config

WORKER_TIMEOUT_S = 240
BASE = dict(
    backbone="resnet18",  # weights none: nothing to download; no dropout
    weights="none",
    img_size=32,
    batch_size=8,
    num_workers=0,
    epochs=2,
    accelerator="cpu",
    precision="32-true",
)
SEARCH = {
    "strategy": {"choices": ["freeze_last", "freeze_k_percent", "none"]},
    "freeze_percent": {"low": 0.1, "high": 0.9, "when": {"strategy": "freeze_k_percent"}},
    "lr": {"low": "1e-4", "high": 1.0e-2, "log": True},  # "1e-4" is a string to YAML 1.1
    "weight_decay": {"low": 1.0e-6, "high": 1.0e-2, "log": True},
    "augment": {"choices": [True, False]},
}


@pytest.fixture(scope="module")
def data(module_tmp_factory) -> Path:
    root = module_tmp_factory.mktemp("sweepdata") / "data"
    make_class_folders(root, {"cat": 8, "dog": 8, "fox": 8})
    return root


def write_spec(path: Path, data: Path, output: Path, **extra) -> Path:
    spec = {"base": {**BASE, "data": str(data), "output": str(output)}, "search": SEARCH, **extra}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------------
# The search space


@pytest.mark.parametrize(
    ("search", "message"),
    [
        ({"learning_rate": {"low": 0.1, "high": 1.0}}, "search.learning_rate: not a searchable"),
        ({"output": {"choices": ["a", "b"]}}, "search.output: not a searchable"),
        ({"strategy": {"choices": ["freeze_last", "bogus"]}}, "search.strategy"),
        ({"lr": {"low": 0.1, "high": 0.01}}, "must be below high"),
        ({"lr": {"low": 0.0, "high": 0.1, "log": True}}, "log: true needs low > 0"),
        ({"lr": {"choices": [0.1], "low": 0.1}}, "not both"),
        ({"epochs": {"low": 0, "high": 3}}, "search.epochs"),
        ({"lr": {"low": 0.1, "high": 1, "when": {"nope": 1}}}, "when: unknown option 'nope'"),
    ],
)
def test_bad_search_spaces_are_refused_with_the_key(tmp_path, search, message):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"base": {"data": str(tmp_path)}, "search": search}))
    with pytest.raises(UserError, match=message) as caught:
        load_sweep_spec(path)
    assert str(path) in str(caught.value)


def test_conditional_parameter_is_searched_only_where_it_applies(tmp_path, data):
    spec, _ = load_sweep_spec(write_spec(tmp_path / "s.yaml", data, tmp_path))
    assert spec.search["lr"].low == pytest.approx(1e-4)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(30):
        trial = study.ask()
        params = suggest(trial, spec)
        seen.add(params["strategy"])
        assert ("freeze_percent" in params) == (params["strategy"] == "freeze_k_percent")
        assert 1e-4 <= params["lr"] <= 1e-2 and isinstance(params["augment"], bool)
        study.tell(trial, 0.0)
    assert seen == {"freeze_last", "freeze_k_percent", "none"}


def test_wandb_export_is_the_same_space_and_feeds_train(tmp_path, data):
    path = write_spec(tmp_path / "s.yaml", data, tmp_path / "out", sampler="random")
    config = wandb_sweep_config(path)
    params = config["parameters"]
    assert config["metric"] == {"name": "val/acc", "goal": "maximize"}
    assert config["method"] == "random"
    assert params["strategy"] == {"values": SEARCH["strategy"]["choices"]}
    assert params["lr"] == {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2}
    assert params["freeze_percent"]["distribution"] == "uniform"
    assert params["backbone"] == {"value": "resnet18"} and params["wandb"] == {"value": True}
    assert "${args_json_file}" in config["command"]
    # What the W&B agent hands to `train --config`: one value per parameter, as JSON.
    chosen = {
        name: p["value"] if "value" in p else p["values"][0] if "values" in p else p["min"]
        for name, p in params.items()
    }
    run_config = tmp_path / "args.json"
    run_config.write_text(json.dumps(chosen))
    loaded = load_config(run_config)
    assert loaded.lr == pytest.approx(1e-4) and loaded.wandb is True
    out = tmp_path / "sweep_wandb.yaml"
    result = CliRunner().invoke(app, ["sweep", "--config", str(path), "--export-wandb", str(out)])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(out.read_text()) == config


def test_example_sweep_file_is_valid():
    spec, base = load_sweep_spec(ROOT / "examples" / "sweep.yaml")
    assert base.backbone == "resnet50" and "freeze_percent" in spec.search
    assert spec.search["freeze_percent"].when == {"strategy": "freeze_k_percent"}
    params = wandb_sweep_config(ROOT / "examples" / "sweep.yaml")["parameters"]
    assert params["devices"] == {"value": "1"}  # one process per trial, as in Optuna sweeps


def test_sweep_refuses_several_devices(tmp_path, data):
    path = tmp_path / "s.yaml"
    path.write_text(
        yaml.safe_dump({"base": {**BASE, "data": str(data), "devices": 2}, "search": SEARCH})
    )
    result = CliRunner().invoke(app, ["sweep", "--config", str(path), "--trials", "1"])
    assert result.exit_code == 2 and "one worker per GPU" in result.output


# ---------------------------------------------------------------------------------------------
# Running trials


def test_pruned_trial_stops_early_and_is_recorded(tmp_path, data):
    # A threshold no accuracy reaches: the first report (epoch 0) prunes the trial.
    path = write_spec(
        tmp_path / "s.yaml",
        data,
        tmp_path / "out",
        study_name="prune",
        pruner={"type": "threshold", "lower": 1.01},
    )
    result = run_sweep(path, trials=1, progress=False, trial_reports=False, epochs=3)
    (row,) = result.rows
    assert row["state"] == "pruned" and row["epochs"] == 1 and list(row["curve"]) == [0]
    run_results = json.loads((Path(row["run_dir"]) / "results.json").read_text())
    assert run_results["epochs"] == 1  # stopped after epoch 0 of 3, and still tested
    assert result.best is None and not (result.sweep_dir / "best_config.yaml").exists()
    assert "No trial has completed yet" in (result.sweep_dir / "report.html").read_text()
    # The study is full: another call runs nothing and only rewrites the report.
    again = run_sweep(path, trials=1, progress=False, trial_reports=False, epochs=3)
    assert again.trials_run_here == 0 and len(again.rows) == 1


def _start_worker(spec: Path, cwd: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    command = [sys.executable, "-m", "inat_finetune", "sweep", "--config", str(spec)]
    return subprocess.Popen(
        [*command, "--trials", "3", "--no-trial-reports"],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _finish(proc: subprocess.Popen) -> str:
    try:
        output, _ = proc.communicate(timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"sweep worker timed out after {WORKER_TIMEOUT_S} s:\n{output[-3000:]}")
    assert proc.returncode == 0, output[-4000:]
    return output


def test_two_workers_share_one_sqlite_study_and_the_best_config_trains(tmp_path, data):
    out = tmp_path / "out"
    spec = write_spec(
        tmp_path / "sweep.yaml", data, out, study_name="shared", sampler="random", seed=7
    )
    workers = [_start_worker(spec, tmp_path) for _ in range(2)]
    outputs = [_finish(w) for w in workers]

    sweep_dir = sweep_dir_for(out, "shared")
    study = optuna.load_study(study_name="shared", storage=default_storage(sweep_dir))
    trials = study.get_trials(deepcopy=False)
    counted = [t for t in trials if not t.user_attrs.get(OVER_BUDGET)]
    # Three trials in all, none run twice; an extra one a worker asked for at the same moment
    # as another is recorded as over budget and never trained.
    assert sorted(t.number for t in counted) == [0, 1, 2]
    assert len({t.number for t in trials}) == len(trials)
    assert all(t.state == optuna.trial.TrialState.FAIL for t in trials if t not in counted)
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in counted)
    assert len({t.user_attrs["worker"] for t in counted}) == 2, outputs  # both took part
    assert len({json.dumps(t.params, sort_keys=True) for t in counted}) == 3  # not duplicated
    runs = sorted((sweep_dir / "trials").iterdir())
    assert len(runs) == 3 and all((r / "results.json").is_file() for r in runs)

    # The report and the best configuration, from the storage.
    for name in ("trials.csv", "sweep.md", "report.html", "figures/history.png"):
        assert (sweep_dir / name).is_file(), name
    best = study.best_trial
    best_config = yaml.safe_load((sweep_dir / "best_config.yaml").read_text())
    assert best_config["lr"] == pytest.approx(best.params["lr"])
    assert best_config["strategy"] == best.params["strategy"]
    assert f"Best: trial {best.number}" in (sweep_dir / "sweep.md").read_text()

    # ... which `train --config` runs as it is (its output goes where plain runs go).
    result = CliRunner().invoke(
        app, ["train", "--config", str(sweep_dir / "best_config.yaml"), "--epochs", "1"]
    )
    assert result.exit_code == 0, result.output
    (run,) = [p for p in out.iterdir() if p.name.endswith("shared-best")]
    rerun = yaml.safe_load((run / "config.yaml").read_text())
    assert {k: v for k, v in rerun.items() if k != "epochs"} == {
        k: v for k, v in best_config.items() if k != "epochs"
    }
    assert json.loads((run / "results.json").read_text())["strategy"] == best.params["strategy"]
