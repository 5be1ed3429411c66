"""report.html: every section, every figure embedded, nothing external, all text escaped."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest
from conftest import make_class_folders
from test_plots import make_run_dir
from typer.testing import CliRunner

from inat_finetune.cli.main import app
from inat_finetune.errors import UserError
from inat_finetune.reporting.report import RUN_SECTIONS, write_report
from inat_finetune.runfiles import write_json_atomic
from inat_finetune.training.config import TrainConfig
from inat_finetune.training.run import train

EMBEDDED = "data:image/png;base64,"


def embedded(page: str, png: Path) -> bool:
    return EMBEDDED + base64.b64encode(png.read_bytes()).decode("ascii") in page


def assert_self_contained(page: str) -> None:
    """No resource or link leaves the page: images are data URIs, links are in-page anchors."""
    for value in re.findall(r'\bsrc="([^"]*)"', page):
        assert value.startswith(EMBEDDED), value[:60]
    for value in re.findall(r'\bhref="([^"]*)"', page):
        assert value.startswith("#"), value
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page and "<link" not in page and "@import" not in page
    assert "url(" not in page


def run_anchors(prefix: str = "") -> list[str]:
    return [f'id="{prefix}{key}"' for key in RUN_SECTIONS]


def test_run_report_has_every_section_and_figure(tmp_path: Path) -> None:
    run = make_run_dir(tmp_path)
    path = write_report(run)
    assert path == run / "report.html"
    page = path.read_text(encoding="utf-8")
    for anchor in run_anchors():
        assert anchor in page
    for heading in (
        "Configuration",
        "Dataset",
        "Images per class per split",
        "Files skipped (1)",
        "Training curves",
        "Confusion matrix",
        "Per-class accuracy",
        "Test predictions",
        "Timings",
    ):
        assert heading in page
    figures = sorted((run / "figures").glob("*.png"))
    assert len(figures) == 6
    assert page.count(EMBEDDED) == len(figures)
    for png in figures:
        assert embedded(page, png), png.name
    assert_self_contained(page)
    # The numbers come from the run's files.
    assert "75.00%" in page  # test accuracy: 6 of 8 right
    assert "2 of 3" in page  # kept epoch, counted from 1
    assert "not an image file" in page
    assert "12.5 s" in page and "freeze_last" in page


def test_report_reuses_figures_and_draws_missing_ones(tmp_path: Path) -> None:
    run = make_run_dir(tmp_path)
    write_report(run)
    curves = run / "figures" / "curves.png"
    kept = curves.stat().st_mtime_ns
    (run / "figures" / "confusion.png").unlink()
    page = write_report(run).read_text(encoding="utf-8")
    assert curves.stat().st_mtime_ns == kept
    assert (run / "figures" / "confusion.png").is_file()
    assert embedded(page, run / "figures" / "confusion.png")


def test_text_from_run_files_is_escaped(tmp_path: Path) -> None:
    evil = 'a<b>&"$x$c'
    run = make_run_dir(tmp_path, classes=(evil, "plain"))
    page = write_report(run).read_text(encoding="utf-8")
    assert "a&lt;b&gt;&amp;&quot;$x$c" in page
    assert "<b>" not in page
    assert_self_contained(page)


def test_unfinished_run_still_gets_a_report(tmp_path: Path) -> None:
    run = make_run_dir(tmp_path)
    for name in ("results.json", "test_predictions.csv"):
        (run / name).unlink()
    page = write_report(run).read_text(encoding="utf-8")
    for anchor in run_anchors():
        assert anchor in page
    assert "results.json is missing" in page
    assert page.count(EMBEDDED) == 2  # curves and class samples; no faked results


def make_comparison(tmp_path: Path, then_trained: bool = False) -> Path:
    comparison = tmp_path / "20260101-000000-compare"
    rows = []
    # The best validation accuracy is not the best test accuracy: selection must follow val.
    for strategy, val, test in (
        ("freeze_last", 0.70, 0.95),
        ("freeze_k_percent", 0.90, 0.60),
        ("freeze_except_bn_and_fc", 0.80, 0.70),
    ):
        run = make_run_dir(comparison / "runs", strategy, strategy=strategy, accs=(0.9, val))
        rows.append(
            {
                "strategy": strategy,
                "run_dir": f"runs/{strategy}",
                "train_acc": 0.9,
                "val_acc": val,
                "test_acc": test,
                "trainable_params": 2562,
                "total_params": 2226434,
                "wall_time_s": 61.0,
            }
        )
        assert run.is_dir()
    summary = {"rows": rows, "best_strategy": "freeze_k_percent", "selected_by": "val_acc"}
    if then_trained:
        make_run_dir(comparison, "final", strategy="freeze_k_percent")
        summary["then_trained"] = "final"
    write_json_atomic(comparison / "comparison.json", summary)
    return comparison


def test_comparison_report(tmp_path: Path) -> None:
    comparison = make_comparison(tmp_path)
    page = write_report(comparison).read_text(encoding="utf-8")
    assert 'id="comparison"' in page
    assert "selected by validation accuracy" in page
    best_row = re.search(r'<tr class="best">(.*?)</tr>', page).group(1)
    assert "freeze_k_percent" in best_row and "90.00%" in best_row
    assert page.count('<tr class="best">') == 1
    # The selected run in full, each strategy's run in part.
    for anchor in run_anchors("final-"):
        assert anchor in page
    for index in range(3):
        for key in ("config", "curves", "confusion", "per-class", "timings"):
            assert f'id="run{index}-{key}"' in page
    assert embedded(page, comparison / "figures" / "comparison.png")
    for strategy in ("freeze_last", "freeze_k_percent", "freeze_except_bn_and_fc"):
        assert embedded(page, comparison / "runs" / strategy / "figures" / "curves.png")
    # Prediction grids only for the selected run: the others' are neither shown nor drawn.
    assert not (comparison / "runs" / "freeze_last" / "figures" / "prediction_grid.png").exists()
    selected = comparison / "runs" / "freeze_k_percent" / "figures"
    for png in selected.glob("*.png"):
        assert embedded(page, png), png.name
    assert_self_contained(page)


def test_comparison_report_shows_the_longer_trained_winner(tmp_path: Path) -> None:
    comparison = make_comparison(tmp_path, then_trained=True)
    page = write_report(comparison).read_text(encoding="utf-8")
    assert "The selected strategy trained longer: final" in page
    assert embedded(page, comparison / "final" / "figures" / "prediction_grid.png")


def test_not_a_run_directory(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not a run directory"):
        write_report(tmp_path)
    with pytest.raises(UserError, match="no such directory"):
        write_report(tmp_path / "missing")


def test_report_command(tmp_path: Path) -> None:
    run = make_run_dir(tmp_path)
    runner = CliRunner()
    result = runner.invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert (run / "report.html").is_file()
    result = runner.invoke(app, ["report", str(tmp_path / "nowhere")])
    assert result.exit_code == 2
    assert "error:" in result.output


def test_report_of_a_real_training_run(tmp_path: Path) -> None:
    """The one real run: the report must read what `train` actually writes, not just our fakes."""
    data = tmp_path / "data"
    make_class_folders(data, {"cats": 10, "dogs": 10})
    config = TrainConfig(
        data=str(data),
        backbone="mobilenet_v2",
        strategy="freeze_last",
        epochs=2,
        img_size=32,
        batch_size=8,
        num_workers=0,
        accelerator="cpu",
        output=str(tmp_path / "runs"),
    )
    run = train(config, progress=False).run_dir
    page = write_report(run).read_text(encoding="utf-8")
    for anchor in run_anchors():
        assert anchor in page
    figures = sorted((run / "figures").glob("*.png"))
    assert {p.stem for p in figures} == {
        "curves",
        "confusion",
        "per_class_accuracy",
        "prediction_grid",
        "confident_mistakes",
        "class_samples",
    }
    for png in figures:
        assert embedded(page, png), png.name
    assert "Figure not available" not in page
    assert_self_contained(page)
