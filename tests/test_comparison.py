"""The strategy comparison: shared split, selection by validation accuracy, files, W&B offline."""

from __future__ import annotations

import json

import pytest
from conftest import make_class_folders
from typer.testing import CliRunner

from inat_finetune.cli.main import app
from inat_finetune.errors import UserError
from inat_finetune.experiments.comparison import compare, parse_strategies, select_best
from inat_finetune.training.config import load_config

TINY = dict(backbone="mobilenet_v2", img_size=32, batch_size=8, num_workers=0, epochs=1)


def test_selection_uses_validation_never_test():
    rows = [
        {"strategy": "a", "val_acc": 0.80, "test_acc": 0.99, "trainable_params": 10},
        {"strategy": "b", "val_acc": 0.90, "test_acc": 0.50, "trainable_params": 10},
    ]
    assert select_best(rows)["strategy"] == "b"
    rows.append({"strategy": "c", "val_acc": 0.90, "test_acc": 0.1, "trainable_params": 5})
    assert select_best(rows)["strategy"] == "c"  # tie on val: the smaller model


def test_strategy_list_errors():
    assert parse_strategies("freeze_last, none") == ["freeze_last", "none"]
    with pytest.raises(UserError, match="unknown"):
        parse_strategies("freeze_last,freeze_most")
    with pytest.raises(UserError, match="twice"):
        parse_strategies("none,none")


@pytest.fixture(scope="module")
def comparison(module_tmp_factory, monkeypatch_module):
    root = module_tmp_factory.mktemp("cmp")
    make_class_folders(root / "data" / "train", {"a": 10, "b": 10})
    make_class_folders(root / "data" / "val", {"a": 3, "b": 3}, seed=7)
    monkeypatch_module.setenv("WANDB_MODE", "offline")
    cfg = load_config(None, data=str(root / "data"), output=str(root / "out"), wandb=True, **TINY)
    return compare(
        cfg, ["freeze_last", "freeze_except_bn_and_fc"], then_train_epochs=2, progress=False
    )


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_comparison_numbers_equal_each_runs_results(comparison):
    base = comparison.comparison_dir
    saved = json.loads((base / "comparison.json").read_text())
    assert saved == comparison.comparison
    for row in saved["rows"]:
        results = json.loads((base / row["run_dir"] / "results.json").read_text())
        assert row["strategy"] == results["strategy"]
        assert row["val_acc"] == results["best_val_acc"]
        assert row["test_acc"] == results["test_acc"]
        assert row["train_acc"] == results["final_train_acc"]
        assert row["trainable_params"] == results["trainable_params"]
        assert row["wall_time_s"] > 0
    best = max(saved["rows"], key=lambda r: (r["val_acc"], -r["trainable_params"]))
    assert saved["best_strategy"] == best["strategy"] and saved["selected_by"] == "val_acc"


def test_all_strategies_share_one_split(comparison):
    base = comparison.comparison_dir
    splits = [
        (base / r["run_dir"] / "split.json").read_text() for r in comparison.comparison["rows"]
    ]
    assert len(set(splits)) == 1


def test_winner_is_trained_longer_and_tested(comparison):
    base = comparison.comparison_dir
    final_dir = base / comparison.comparison["then_trained"]
    results = json.loads((final_dir / "results.json").read_text())
    assert results["strategy"] == comparison.comparison["best_strategy"]
    assert results["epochs"] == 2
    assert comparison.comparison["final"]["test_acc"] == results["test_acc"]


def test_comparison_writes_table_chart_and_report(comparison):
    base = comparison.comparison_dir
    table = (base / "comparison.md").read_text()
    assert "(selected)" in table and "freeze_last" in table
    assert (base / "figures" / "comparison.png").stat().st_size > 10_000
    html = (base / "report.html").read_text()
    assert "selected by validation accuracy" in html.lower()
    for row in comparison.comparison["rows"]:
        assert (base / row["run_dir"] / "report.html").is_file()
        assert (base / row["run_dir"] / "figures" / "prediction_grid.png").is_file()


def test_wandb_offline_run_holds_metrics_images_and_group(comparison):
    base = comparison.comparison_dir
    for row in comparison.comparison["rows"]:
        (wandb_run,) = (base / row["run_dir"] / "wandb").glob("offline-run-*")
        log = next(wandb_run.glob("run-*.wandb")).read_bytes()
        # metrics per epoch, the resolved config, final test metrics, the comparison's group
        for key in (
            b"val/acc",
            b"train/loss",
            b"freeze_percent",
            b"final/test_acc",
            base.name.encode(),
        ):
            assert key in log, key
        media = wandb_run / "files" / "media"
        images = {p.name.rsplit("_", 2)[0] for p in (media / "images" / "figures").glob("*.png")}
        assert {"prediction_grid", "confusion", "curves", "per_class_accuracy"} <= images
        tables = {p.name.rsplit("_", 2)[0] for p in (media / "table").glob("*.table.json")}
        assert tables == {"test_predictions", "confusion_matrix_table"}  # the chart's table


def test_compare_cli_errors_are_one_line(tmp_path):
    make_class_folders(tmp_path / "d", {"a": 3, "b": 3})
    result = CliRunner().invoke(
        app, ["compare", "--data", str(tmp_path / "d"), "--strategies", "x"]
    )
    assert result.exit_code == 2 and "--strategies x" in result.output
