"""Charts of finished runs (training curves, confusion matrix, per-class accuracy, the strategy
comparison) and ``make_run_figures``, which draws every figure of a run into its ``figures/``.

Charts read only a run directory's files (``metrics.csv``, ``results.json``,
``comparison.json``). Each comes two ways: ``*_figure`` returns a Figure for a notebook to show
inline, ``plot_*`` writes the PNG. The photo figures live in ``photo_grids``, what all figures
share in ``figure_files``; their public names are importable from here too, as before the split.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator, PercentFormatter

from inat_finetune.errors import UserError
from inat_finetune.reporting.figure_files import (
    DPI,
    FIGURES_DIR,
    SPLIT_COLOURS,
    choose_class,
    default_out,
    literal,
    load_results,
    percent,
    read_metrics,
    read_predictions,
    require_file,
    resolve_split,
    save_figure,
    short,
)
from inat_finetune.reporting.photo_grids import (
    class_samples_figure,
    confident_mistakes_figure,
    plot_class_samples,
    plot_confident_mistakes,
    plot_prediction_grid,
    prediction_grid_figure,
)
from inat_finetune.runfiles import read_json

__all__ = [
    "DPI",
    "FIGURES_DIR",
    "RUN_FIGURES",
    "choose_class",
    "class_samples_figure",
    "comparison_figure",
    "confident_mistakes_figure",
    "confusion_figure",
    "curves_figure",
    "load_comparison",
    "load_results",
    "make_run_figures",
    "per_class_accuracy_figure",
    "percent",
    "plot_class_samples",
    "plot_comparison",
    "plot_confident_mistakes",
    "plot_confusion",
    "plot_curves",
    "plot_per_class_accuracy",
    "plot_prediction_grid",
    "prediction_grid_figure",
    "read_metrics",
    "read_predictions",
    "resolve_split",
    "save_figure",
]

log = logging.getLogger(__name__)


def curves_figure(run_dir: str | Path) -> Figure:
    """Train and validation accuracy and loss per epoch, the checkpointed epoch marked."""
    series = read_metrics(run_dir)
    if not any(k in series for k in ("train/acc", "val/acc", "train/loss", "val/loss")):
        raise UserError(f"{Path(run_dir) / 'metrics.csv'}: no train/val metrics logged yet")
    fig = Figure(figsize=(12, 4.5), dpi=DPI, layout="constrained")
    acc_ax, loss_ax = fig.subplots(1, 2)
    val_acc = series.get("val/acc", {})
    best_epoch = max(val_acc, key=val_acc.__getitem__) if val_acc else None
    for ax, metric, title in ((acc_ax, "acc", "Accuracy"), (loss_ax, "loss", "Loss")):
        for stage in ("train", "val"):
            points = sorted(series.get(f"{stage}/{metric}", {}).items())
            if points:
                # Epochs are counted from 1 on the axis, as a person counts them.
                xs = [epoch + 1 for epoch, _ in points]
                ax.plot(
                    xs,
                    [v for _, v in points],
                    marker="o",
                    color=SPLIT_COLOURS[stage],
                    label="train" if stage == "train" else "validation",
                )
        if best_epoch is not None:
            ax.axvline(best_epoch + 1, color="#999999", linestyle=":", linewidth=1)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel(title.lower())
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    acc_ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    if best_epoch is not None:
        acc_ax.plot(
            [best_epoch + 1],
            [val_acc[best_epoch]],
            marker="*",
            markersize=16,
            color="#c44e52",
            linestyle="none",
            label=f"best validation (epoch {best_epoch + 1}, checkpoint)",
        )
    # One legend below both panels: inside, it would cover the curves of some run or other.
    handles, labels = acc_ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), frameon=False)
    fig.suptitle(f"Training curves: {literal(Path(run_dir).name)}", fontsize=13, fontweight="bold")
    return fig


def plot_curves(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """``curves_figure`` written as ``figures/curves.png`` (or ``out``)."""
    return save_figure(curves_figure(run_dir), default_out(run_dir, "curves", out))


def confusion_figure(run_dir: str | Path) -> Figure:
    """The test confusion matrix twice: counts, and row-normalised (each row is a class's recall)."""
    results = load_results(run_dir)
    classes = list(results.get("class_names", []))
    counts = np.asarray(results.get("confusion_matrix", []), dtype=float)
    if not classes or counts.shape != (len(classes), len(classes)):
        raise UserError(f"{Path(run_dir) / 'results.json'}: no confusion matrix for its classes")
    totals = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    k = len(classes)
    side = max(4.5, 0.5 * k + 2.5)
    fig = Figure(figsize=(2 * side + 0.5, side + 0.6), dpi=DPI, layout="constrained")
    labels = [short(c) for c in classes]
    font = 10 if k <= 10 else 8 if k <= 20 else 6
    for ax, matrix, title, fmt in (
        (fig.add_subplot(1, 2, 1), counts, "Counts", lambda v: f"{v:.0f}"),
        (fig.add_subplot(1, 2, 2), normalised, "Row-normalised (recall)", lambda v: f"{v:.0%}"),
    ):
        top = matrix.max() if matrix.size and matrix.max() > 0 else 1.0
        ax.imshow(matrix, cmap="Blues", vmin=0, vmax=top)
        ax.set_title(title)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_xticks(
            range(k), labels, rotation=45 if k > 3 else 0, ha="right" if k > 3 else "center"
        )
        ax.set_yticks(range(k), labels)
        if k <= 30:
            for i in range(k):
                for j in range(k):
                    ax.text(
                        j,
                        i,
                        fmt(matrix[i, j]),
                        ha="center",
                        va="center",
                        fontsize=font,
                        color="white" if matrix[i, j] > 0.5 * top else "black",
                    )
    fig.suptitle(
        f"Test confusion matrix ({int(counts.sum())} images, accuracy {percent(results.get('test_acc'))})",
        fontsize=13,
        fontweight="bold",
    )
    return fig


def plot_confusion(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """``confusion_figure`` written as ``figures/confusion.png`` (or ``out``)."""
    return save_figure(confusion_figure(run_dir), default_out(run_dir, "confusion", out))


def per_class_accuracy_figure(run_dir: str | Path) -> Figure:
    """Test accuracy of each class against the overall accuracy; n/a for a class not tested."""
    results = load_results(run_dir)
    per_class = results.get("per_class_test_acc") or {}
    if not per_class:
        raise UserError(f"{Path(run_dir) / 'results.json'}: no per_class_test_acc")
    classes = list(per_class)
    # None (null): the class had no test image; it gets no bar and the label n/a.
    measured = [per_class[c] for c in classes]
    values = [0.0 if v is None else float(v) for v in measured]
    matrix = results.get("confusion_matrix") or []
    names = results.get("class_names") or classes
    support = {
        c: (int(row[i]), int(sum(row)))
        for i, (c, row) in enumerate(zip(names, matrix, strict=False))
    }
    k = len(classes)
    fig = Figure(figsize=(9, max(3.0, 0.45 * k + 1.5)), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    positions = list(range(k))
    ax.barh(positions, values, color="#4c72b0")
    ax.set_yticks(positions, [short(c, 24) for c in classes])
    ax.invert_yaxis()
    for y, (name, value, shown) in enumerate(zip(classes, values, measured, strict=True)):
        right, total = support.get(name, (None, None))
        label = percent(shown) + (f"  ({right}/{total})" if total else "  (no test images)")
        # A white box keeps the label readable where the overall-accuracy line crosses it.
        ax.text(
            min(value, 1.0) + 0.01,
            y,
            label,
            va="center",
            fontsize=9,
            bbox={"facecolor": "white", "edgecolor": "none", "pad": 1},
            zorder=3,
        )
    overall = results.get("test_acc")
    if overall is not None:
        ax.axvline(
            float(overall), color="#c44e52", linestyle="--", label=f"overall {percent(overall)}"
        )
        # Below the axes: inside, it would cover the labels of the last bars.
        fig.legend(loc="outside lower center", frameon=False)
    ax.set_xlim(0, 1.25)
    ax.set_xticks([0, 0.25, 0.5, 0.75, 1.0])
    ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_xlabel("test accuracy")
    ax.set_ylabel("class")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title("Per-class test accuracy", fontsize=13, fontweight="bold")
    return fig


def plot_per_class_accuracy(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """``per_class_accuracy_figure`` written as ``figures/per_class_accuracy.png`` (or ``out``)."""
    return save_figure(
        per_class_accuracy_figure(run_dir), default_out(run_dir, "per_class_accuracy", out)
    )


def comparison_figure(comparison_dir: str | Path) -> Figure:
    """Train, validation and test accuracy per strategy; the one chosen by validation marked."""
    comparison = load_comparison(comparison_dir)
    rows = comparison["rows"]
    best = comparison.get("best_strategy")
    k = len(rows)
    fig = Figure(figsize=(max(7.0, 2.4 * k + 1.5), 5.0), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    width = 0.26
    for offset, stage in zip((-width, 0.0, width), ("train", "val", "test"), strict=True):
        values = [_number(r.get(f"{stage}_acc")) for r in rows]
        xs = [i + offset for i in range(k)]
        bars = ax.bar(
            xs, [0 if math.isnan(v) else v for v in values], width, color=SPLIT_COLOURS[stage]
        )
        for bar, value in zip(bars, values, strict=True):
            ax.text(
                bar.get_x() + bar.get_width() / 2,
                (0 if math.isnan(value) else value) + 0.01,
                percent(value),
                ha="center",
                va="bottom",
                fontsize=8,
            )
    labels = [
        f"{r['strategy']}\n(selected)" if r["strategy"] == best else r["strategy"] for r in rows
    ]
    ax.set_xticks(range(k), labels)
    for tick, row in zip(ax.get_xticklabels(), rows, strict=True):
        if row["strategy"] == best:
            tick.set_fontweight("bold")
            tick.set_color("#c44e52")
    ax.set_ylim(0, 1.12)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_ylabel("accuracy")
    ax.set_xlabel("freezing strategy")
    ax.grid(axis="y", alpha=0.3)
    # Below the axes: inside, it would cover the value labels of bars near 100%.
    fig.legend(
        handles=[
            Patch(color=SPLIT_COLOURS[s], label=n)
            for s, n in (("train", "train"), ("val", "validation"), ("test", "test"))
        ],
        loc="outside lower center",
        ncols=3,
        frameon=False,
    )
    selected_by = comparison.get("selected_by", "val_acc")
    ax.set_title(
        f"Strategies compared (best chosen by {selected_by}, never by test)",
        fontsize=13,
        fontweight="bold",
    )
    return fig


def plot_comparison(comparison_dir: str | Path, out: str | Path | None = None) -> Path:
    """``comparison_figure`` written as ``figures/comparison.png`` (or ``out``)."""
    return save_figure(
        comparison_figure(comparison_dir), default_out(comparison_dir, "comparison", out)
    )


def load_comparison(comparison_dir: str | Path) -> dict[str, Any]:
    """``comparison.json`` as {"rows": [...], "best_strategy": ..., ...}; a bare list is rows."""
    path = require_file(Path(comparison_dir) / "comparison.json", "comparison.json")
    data = read_json(path)
    if isinstance(data, list):
        data = {"rows": data}
    rows = next(
        (data[k] for k in ("rows", "runs", "strategies") if isinstance(data.get(k), list)), None
    )
    if not rows or not all(isinstance(r, dict) and "strategy" in r for r in rows):
        raise UserError(f"{path}: expected a list of rows with a 'strategy' each")
    return {**data, "rows": rows}


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


RUN_FIGURES: dict[str, tuple[str, Callable[[Path], Path]]] = {
    # name: (file it needs, how to draw it)
    "curves": ("metrics.csv", plot_curves),
    "confusion": ("results.json", plot_confusion),
    "per_class_accuracy": ("results.json", plot_per_class_accuracy),
    "prediction_grid": ("test_predictions.csv", plot_prediction_grid),
    "confident_mistakes": ("test_predictions.csv", plot_confident_mistakes),
    "class_samples": (
        "split.json",
        lambda run_dir: plot_class_samples(
            run_dir, out=run_dir / FIGURES_DIR / "class_samples.png"
        ),
    ),
}


def make_run_figures(
    run_dir: str | Path, overwrite: bool = True, names: Collection[str] | None = None
) -> dict[str, Path]:
    """Draw every per-run figure into ``run_dir/figures/``; figures whose inputs are missing
    (a run that stopped early has no results.json) are left out, not faked."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    made: dict[str, Path] = {}
    for name, (needs, draw) in RUN_FIGURES.items():
        if names is not None and name not in names:
            continue
        target = run_dir / FIGURES_DIR / f"{name}.png"
        if not overwrite and target.is_file():
            made[name] = target
            continue
        if not (run_dir / needs).is_file():
            log.warning("%s: no %s, so no %s figure", run_dir, needs, name)
            continue
        try:
            made[name] = draw(run_dir)
        except UserError as exc:
            # One unreadable input must not cost the other figures (or the report) their place.
            log.warning("no %s figure: %s", name, exc)
    return made
