"""One self-contained ``report.html`` for a run directory or a comparison directory.

The page carries everything inside itself (figures as base64 PNG data URIs, CSS inline, no
scripts, fonts or links to anywhere else), so it can be mailed, archived or opened offline and
still show the whole experiment. Figures that are missing are drawn first (``plots``); every
piece of text from the run files is HTML-escaped, since class names and paths are user data.
The pieces every page is made of are in ``reporting/html_blocks.py``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from inat_finetune.errors import UserError
from inat_finetune.reporting import plots
from inat_finetune.reporting.auto_section import AUTO_ANCHOR, AUTO_TITLE, auto_section_body
from inat_finetune.reporting.html_blocks import (
    cards_html,
    count_text,
    duration_text,
    esc,
    figure_html,
    generated_at,
    kv_html,
    page_html,
    pct,
    section_html,
    table_html,
)
from inat_finetune.runfiles import read_json, write_text_atomic

log = logging.getLogger(__name__)

REPORT_NAME = "report.html"


MAX_SKIPPED_LISTED = 50


def _read_optional(path: Path) -> Any:
    if not path.is_file():
        return None
    if path.suffix in (".yaml", ".yml"):
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    return read_json(path)


def _config_section(run_dir: Path) -> str:
    config = _read_optional(run_dir / "config.yaml")
    if not isinstance(config, dict):
        return '<p class="missing">config.yaml is missing.</p>'
    note = (
        '<p class="muted">The resolved configuration; pass this run\'s <code>config.yaml</code> '
        "back with <code>--config</code> to repeat it.</p>"
    )
    return note + kv_html(config)


def _dataset_section(run_dir: Path, figures: dict[str, Path]) -> str:
    summary = _read_optional(run_dir / "dataset.json")
    if not isinstance(summary, dict):
        return '<p class="missing">dataset.json is missing.</p>'
    classes = list(summary.get("classes", []))
    images = summary.get("images", {})
    splits = [s for s in ("train", "val", "test") if s in images]
    rows = [
        [
            esc(c),
            *(f"{images[s].get(c, 0):,}" for s in splits),
            f"{sum(images[s].get(c, 0) for s in splits):,}",
        ]
        for c in classes
    ]
    totals = [sum(images[s].values()) for s in splits]
    rows.append(
        [
            "<strong>total</strong>",
            *(f"<strong>{t:,}</strong>" for t in totals),
            f"<strong>{sum(totals):,}</strong>",
        ]
    )
    parts = [
        kv_html(
            {
                "data root": summary.get("root"),
                "layout": summary.get("layout"),
                "classes": len(classes),
            }
        ),
        "<h3>Images per class per split</h3>",
        table_html(["class", *splits, "all"], rows, numeric=set(range(1, len(splits) + 2))),
    ]
    skipped = summary.get("skipped", [])
    parts.append(f"<h3>Files skipped ({len(skipped):,})</h3>")
    if skipped:
        by_reason = summary.get("skipped_by_reason", {})
        parts.append(
            "<p>These files were not used: they are not images or do not decode.</p>"
            + table_html(
                ["reason", "files"],
                [[esc(r), f"{n:,}"] for r, n in by_reason.items()],
                numeric={1},
            )
        )
        listed = skipped[:MAX_SKIPPED_LISTED]
        parts.append(
            table_html(
                ["file", "why"],
                [[f"<code>{esc(s.get('path'))}</code>", esc(s.get("reason"))] for s in listed],
            )
        )
        if len(skipped) > len(listed):
            parts.append(
                f'<p class="muted">… and {len(skipped) - len(listed):,} more; see dataset.json.</p>'
            )
    else:
        parts.append("<p>None: every file found was a readable image.</p>")
    if "class_samples" in figures:
        parts.append("<h3>Sample images</h3>")
        parts.append(figure_html(figures["class_samples"], "random training images of one class"))
    return "".join(parts)


def _curves_section(figures: dict[str, Path]) -> str:
    return figure_html(
        figures.get("curves"),
        "training curves",
        "Accuracy and loss per epoch on the training and validation subsets; the star marks "
        "the epoch whose checkpoint was kept and tested.",
    )


def _confusion_section(figures: dict[str, Path]) -> str:
    return figure_html(
        figures.get("confusion"),
        "test confusion matrix",
        "Rows are the true classes, columns the predictions; the right panel divides each row "
        "by its total.",
    )


def _per_class_section(figures: dict[str, Path]) -> str:
    return figure_html(figures.get("per_class_accuracy"), "per-class test accuracy")


def _predictions_section(figures: dict[str, Path]) -> str:
    return figure_html(
        figures.get("prediction_grid"),
        "random test predictions",
        "Random test images with the predicted class (and its probability) above the true "
        "class; wrong predictions are titled and framed in red.",
    ) + figure_html(
        figures.get("confident_mistakes"),
        "most confident mistakes",
        "The wrong predictions with the highest probability: look here for mislabelled "
        "images and classes that look alike.",
    )


def _timings_section(results: dict[str, Any] | None) -> str:
    if not results:
        return '<p class="missing">results.json is missing: the run did not finish.</p>'
    epochs = results.get("epochs")
    train_time = results.get("train_time_s")
    per_epoch = train_time / epochs if isinstance(train_time, (int, float)) and epochs else None
    speed_paths = results.get("speed_paths") or {}
    return kv_html(
        {
            "training (incl. validation)": duration_text(train_time),
            "epochs": epochs,
            "per epoch": duration_text(per_epoch),
            "testing": duration_text(results.get("test_time_s")),
            "accelerator": results.get("accelerator"),
            "precision": results.get("precision"),
            "channels last": results.get("channels_last"),
            "image cache": speed_paths.get("image_cache"),
            "feature cache": speed_paths.get("feature_cache"),
            "DataLoader workers": speed_paths.get("workers"),
            "depthwise gradient": speed_paths.get("depthwise_grad"),
            "memory allocator": speed_paths.get("allocator"),
            "augmentation": speed_paths.get("augmentation"),
            "images train/val/test": "/".join(
                str(v) for v in (results.get("num_images") or {}).values()
            )
            or None,
        }
    )


RUN_SECTIONS = {
    # anchor suffix: title
    "config": "Configuration",
    "dataset": "Dataset",
    "curves": "Training curves",
    "confusion": "Confusion matrix",
    "per-class": "Per-class accuracy",
    "predictions": "Test predictions",
    "timings": "Timings",
}


# The figures (plots.RUN_FIGURES names) each section shows: only those are drawn.
SECTION_FIGURES = {
    "dataset": ("class_samples",),
    "curves": ("curves",),
    "confusion": ("confusion",),
    "per-class": ("per_class_accuracy",),
    "predictions": ("prediction_grid", "confident_mistakes"),
}


def _run_cards(results: dict[str, Any] | None) -> str:
    if not results:
        return ""
    trainable, total = results.get("trainable_params"), results.get("total_params")
    share = f" ({100 * trainable / total:.1f}%)" if isinstance(trainable, int) and total else ""
    return cards_html(
        [
            ("test accuracy", pct(results.get("test_acc"))),
            ("best validation accuracy", pct(results.get("best_val_acc"))),
            ("final train accuracy", pct(results.get("final_train_acc"))),
            (
                "kept epoch",
                _kept_epoch(results),
            ),
            ("trainable parameters", count_text(trainable) + share),
            ("training time", duration_text(results.get("train_time_s"))),
        ]
    )


def _kept_epoch(results: dict[str, Any]) -> str:
    # results.json counts epochs from 0 (Lightning's index); people and the curves count from 1.
    best, epochs = results.get("best_epoch"), results.get("epochs")
    return f"{best + 1} of {epochs}" if isinstance(best, int) else "n/a"


def run_sections(
    run_dir: Path, prefix: str = "", only: set[str] | None = None
) -> list[tuple[str, str, str]]:
    """(anchor, title, html) for each section of one run, drawing any missing figure first."""
    keys = [key for key in RUN_SECTIONS if only is None or key in only]
    wanted = {figure for key in keys for figure in SECTION_FIGURES.get(key, ())}
    figures = plots.make_run_figures(run_dir, overwrite=False, names=wanted)
    results = _read_optional(run_dir / "results.json")
    bodies = {
        "config": lambda: _config_section(run_dir),
        "dataset": lambda: _dataset_section(run_dir, figures),
        "curves": lambda: _curves_section(figures),
        "confusion": lambda: _confusion_section(figures),
        "per-class": lambda: _per_class_section(figures),
        "predictions": lambda: _predictions_section(figures),
        "timings": lambda: _timings_section(results),
    }
    return [(f"{prefix}{key}", RUN_SECTIONS[key], bodies[key]()) for key in keys]


def _run_page(run_dir: Path) -> str:
    results = _read_optional(run_dir / "results.json")
    sections = run_sections(run_dir)
    if results and isinstance(results.get("auto"), dict):  # --recipe auto: its choice first
        sections.insert(0, (AUTO_ANCHOR, AUTO_TITLE, auto_section_body(results["auto"])))
    what = ""
    if results:
        what = f"{results.get('backbone', '?')} · {results.get('strategy', '?')}"
    header = (
        f"<header><h1>Run report: {esc(run_dir.name)}</h1>"
        f'<p class="meta">{esc(what)} · run directory <code>{esc(run_dir)}</code> · '
        f"generated {esc(generated_at())}</p>{_run_cards(results)}</header>"
    )
    body = "".join(section_html(anchor, title, html_) for anchor, title, html_ in sections)
    nav = [(anchor, title) for anchor, title, _ in sections]
    return page_html(f"Run report: {run_dir.name}", header, nav, body)


def _run_dir(comparison_dir: Path, value: Any) -> Path | None:
    if not value:
        return None
    path = Path(value)
    return path if path.is_absolute() else comparison_dir / path


def _comparison_table(comparison: dict[str, Any]) -> str:
    best = comparison.get("best_strategy")
    rows_html, row_classes = [], []
    for row in comparison["rows"]:
        trainable, total = row.get("trainable_params"), row.get("total_params")
        share = f"{100 * trainable / total:.1f}%" if isinstance(trainable, int) and total else "n/a"
        is_best = row["strategy"] == best
        name = esc(row["strategy"]) + ('<span class="badge">selected</span>' if is_best else "")
        rows_html.append(
            [
                name,
                pct(row.get("train_acc")),
                pct(row.get("val_acc")),
                pct(row.get("test_acc")),
                count_text(trainable),
                count_text(total),
                share,
                duration_text(row.get("wall_time_s")),
            ]
        )
        row_classes.append("best" if is_best else "")
    header = [
        "strategy",
        "train acc",
        "val acc",
        "test acc",
        "trainable params",
        "total params",
        "trainable share",
        "wall time",
    ]
    return table_html(header, rows_html, set(range(1, 8)), row_classes)


def _comparison_cards(
    best: str | None, best_row: dict[str, Any] | None, then_trained: bool, final: Any
) -> list[tuple[str, str]]:
    """The selected strategy, its accuracies, and the longer run's test accuracy if any."""
    cards = [
        ("selected strategy", best or "n/a"),
        ("its validation accuracy", pct((best_row or {}).get("val_acc"))),
        ("its test accuracy", pct((best_row or {}).get("test_acc"))),
    ]
    if then_trained and final:
        cards.append(
            (f"test accuracy after {final.get('epochs')} epochs", pct(final.get("test_acc")))
        )
    return cards


def _selection_section(comparison_dir: Path, comparison: dict[str, Any]) -> str:
    """Which strategy was selected and by what, the table of strategies and the chart."""
    best = comparison.get("best_strategy")
    selected_by = comparison.get("selected_by", "val_acc")
    chart = comparison_dir / plots.FIGURES_DIR / "comparison.png"
    if not chart.is_file():
        chart = plots.plot_comparison(comparison_dir)
    selection = (
        f"<p><strong>{esc(best)}</strong> was selected by validation accuracy "
        f"(<code>{esc(selected_by)}</code>); test accuracy played no part in the choice, so "
        "the test numbers stay an unbiased estimate.</p>"
        if best
        else '<p class="missing">No best strategy recorded in comparison.json.</p>'
    )
    return section_html(
        "comparison",
        "Comparison of strategies",
        selection
        + _comparison_table(comparison)
        + figure_html(
            chart, "accuracy per strategy", "Train, validation and test accuracy per strategy."
        ),
    )


def _final_run_section(
    final_dir: Path, then_trained: bool, final_results: Any
) -> tuple[str, list[tuple[str, str]]]:
    """The selected strategy's run (or its longer run) in full, and its navigation links."""
    if then_trained:
        heading = f"The selected strategy trained longer: {final_dir.name}"
    else:
        heading = f"The selected strategy's run: {final_dir.name}"
    sections = run_sections(final_dir, prefix="final-")
    body = (
        f'<section id="final"><h2>{esc(heading)}</h2>{_run_cards(final_results)}'
        + "".join(section_html(a, t, h) for a, t, h in sections)
        + "</section>"
    )
    return body, [("final", "Selected run")] + [(a, t) for a, t, _ in sections]


def _strategy_runs_section(comparison_dir: Path, rows: list[dict[str, Any]], best: Any) -> str:
    """Every strategy's own run, the prediction grids left out: they are large and only the
    selected model's predictions matter for the conclusion."""
    runs = []
    for index, row in enumerate(rows):
        run_dir = _run_dir(comparison_dir, row.get("run_dir"))
        label = (
            f"{row['strategy']} · val {pct(row.get('val_acc'))} · test {pct(row.get('test_acc'))}"
        )
        if run_dir is None or not run_dir.is_dir():
            runs.append(
                f'<p class="missing">{esc(label)}: run directory {esc(row.get("run_dir"))} not found.</p>'
            )
            continue
        sections = run_sections(
            run_dir,
            prefix=f"run{index}-",
            only={"config", "curves", "confusion", "per-class", "timings"},
        )
        runs.append(
            f'<details class="run" id="run{index}" open><summary>{esc(label)}'
            + ('<span class="badge">selected</span>' if row["strategy"] == best else "")
            + "</summary>"
            + "".join(section_html(a, t, h) for a, t, h in sections)
            + "</details>"
        )
    return '<section id="runs"><h2>Each strategy\'s run</h2>' + "".join(runs) + "</section>"


def _comparison_page(comparison_dir: Path) -> str:
    comparison = plots.load_comparison(comparison_dir)
    rows = comparison["rows"]
    best = comparison.get("best_strategy")
    best_row = next((r for r in rows if r["strategy"] == best), None)
    then_trained = _run_dir(comparison_dir, comparison.get("then_trained"))
    final_dir = then_trained or _run_dir(comparison_dir, (best_row or {}).get("run_dir"))
    final_results = _read_optional(final_dir / "results.json") if final_dir else None
    cards = _comparison_cards(best, best_row, bool(then_trained), final_results)
    header = (
        f"<header><h1>Strategy comparison: {esc(comparison_dir.name)}</h1>"
        f'<p class="meta">comparison directory <code>{esc(comparison_dir)}</code> · generated '
        f"{esc(generated_at())}</p>{cards_html(cards)}</header>"
    )
    body = [_selection_section(comparison_dir, comparison)]
    nav = [("comparison", "Comparison")]
    if final_dir is not None and final_dir.is_dir():
        final_body, final_nav = _final_run_section(final_dir, bool(then_trained), final_results)
        body.append(final_body)
        nav += final_nav
    body.append(_strategy_runs_section(comparison_dir, rows, best))
    nav.append(("runs", "Each strategy"))
    return page_html(f"Strategy comparison: {comparison_dir.name}", header, nav, "".join(body))


def write_report(run_or_comparison_dir: str | Path) -> Path:
    """Write ``report.html`` into a run or comparison directory and return its path."""
    path = Path(run_or_comparison_dir).resolve()
    if not path.is_dir():
        raise UserError(f"{path}: no such directory; pass a run or comparison directory")
    if (path / "comparison.json").is_file():
        page = _comparison_page(path)
    elif any((path / name).is_file() for name in ("results.json", "metrics.csv")):
        page = _run_page(path)
    else:
        raise UserError(
            f"{path}: not a run directory (no results.json or metrics.csv) nor a comparison "
            "directory (no comparison.json); pass what `inat-finetune train` or `compare` made"
        )
    return write_text_atomic(path / REPORT_NAME, page)
