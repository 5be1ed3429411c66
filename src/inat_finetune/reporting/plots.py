"""Figures of the data and of finished runs, drawn from the files a run directory holds.

Every function reads only files (``split.json``, ``metrics.csv``, ``results.json``,
``test_predictions.csv``, ``comparison.json``), so figures can be redrawn for any finished run
without the model. Figures are plain ``matplotlib.figure.Figure`` objects rendered by Agg, never
pyplot: no display is needed and no global state is shared between calls. Each figure has a
fixed size in inches at ``DPI``, so its pixel size is known in advance (the tests rely on it),
and is written atomically as a PNG whose path is returned.
"""

from __future__ import annotations

import csv
import logging
import math
import random
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import MaxNLocator, PercentFormatter
from PIL import Image, ImageOps

from inat_finetune.data.folders import DataSplit, make_split
from inat_finetune.data.images import load_image
from inat_finetune.errors import UserError
from inat_finetune.runfiles import atomic_write, read_json

log = logging.getLogger(__name__)


DPI = 100


FIGURES_DIR = "figures"


THUMB_PX = 224  # photos for tiles are decoded at about this size (JPEG draft mode): low memory


GRID_COLS = 6


SAMPLE_COLS = 10


HEADER_IN = 0.5  # room for a figure's overall title


TITLE_PX = 34  # two lines of 9-point text above a tile's photo


TILE_MARGIN_PX = 8  # white space around a tile's photo, room for its frame


FRAME_PX = 6  # the red frame around a wrong prediction's photo


WRONG = "#d00000"  # strongly red: wrong predictions (title and frame)


RIGHT = "#1a7f37"  # dark green: correct predictions


# Pixel blocks pasted over a rendered figure: (top row, left column, height x width x 3 uint8).
Photos = Sequence[tuple[int, int, np.ndarray]]


SPLIT_COLOURS = {"train": "#4c72b0", "val": "#dd8452", "test": "#55a868"}


def _require(path: Path, what: str) -> Path:
    if not path.is_file():
        raise UserError(
            f"{path}: missing; {path.parent} needs {what} (is it a run directory made by "
            "`inat-finetune train`?)"
        )
    return path


def load_results(run_dir: str | Path) -> dict[str, Any]:
    return read_json(_require(Path(run_dir) / "results.json", "results.json"))


def read_metrics(run_dir: str | Path) -> dict[str, dict[int, float]]:
    """``metrics.csv`` as {metric: {epoch: value}}; Lightning writes train and val on separate rows."""
    path = _require(Path(run_dir) / "metrics.csv", "metrics.csv")
    series: dict[str, dict[int, float]] = {}
    with path.open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if not row.get("epoch"):
                continue
            epoch = int(float(row["epoch"]))
            for key, value in row.items():
                if key in ("epoch", "step") or not value:
                    continue
                try:
                    series.setdefault(key, {})[epoch] = float(value)
                except ValueError:
                    continue
    return series


def read_predictions(run_dir: str | Path) -> list[dict[str, str]]:
    path = _require(Path(run_dir) / "test_predictions.csv", "test_predictions.csv")
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    missing = {"path", "true", "predicted", "confidence"} - set(rows[0] if rows else {})
    if rows and missing:
        raise UserError(
            f"{path}: columns {sorted(missing)} are missing; it is not a predictions file"
        )
    return rows


def resolve_split(split_or_data: DataSplit | str | Path) -> DataSplit:
    """A DataSplit from itself, a ``split.json``, a run directory, or a dataset folder."""
    if isinstance(split_or_data, DataSplit):
        return split_or_data
    path = Path(split_or_data)
    if path.is_file() and path.suffix == ".json":
        return DataSplit.load(path)
    if (path / "split.json").is_file():
        return DataSplit.load(path / "split.json")
    # A dataset folder: split it exactly as `train` does with its default seed.
    return make_split(path, progress=True)


def choose_class(classes: list[str], class_name: str | None, seed: int) -> str:
    """The class asked for, or a seeded random one."""
    if class_name is None:
        return random.Random(seed).choice(sorted(classes))
    if class_name not in classes:
        raise UserError(f"--class {class_name}: no such class; choose one of {', '.join(classes)}")
    return class_name


def save_figure(fig: Figure, out: str | Path, photos: Photos = ()) -> Path:
    """Render ``fig``, paste ``photos`` (top, left, pixels) over it, write it as a PNG."""
    # Rendered by Agg and saved as RGB through PIL: no alpha channel (a quarter fewer bytes for
    # photo grids) and no matplotlib URL in the PNG metadata (the report has no external links).
    # zlib level 3 instead of 6: a photo grid encodes in 0.14 s instead of 0.37 s, 7% larger.
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgb = np.array(np.asarray(canvas.buffer_rgba())[..., :3])
    for top, left, pixels in photos:
        rgb[top : top + pixels.shape[0], left : left + pixels.shape[1]] = pixels
    image = Image.fromarray(rgb)
    return atomic_write(
        out, lambda handle: image.save(handle, format="PNG", dpi=(DPI, DPI), compress_level=3)
    )


def _thumbnail(path: Path, side: int) -> np.ndarray | None:
    """A centre-cropped ``side`` x ``side`` thumbnail, or None when the file is gone or undecodable."""
    try:
        image = load_image(path, draft_size=max(side, THUMB_PX))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    return np.asarray(ImageOps.fit(image, (side, side), Image.Resampling.BILINEAR))


@dataclass
class Tile:
    """One photo of a tile figure, with the text above it; ``framed`` draws a red frame."""

    path: Path
    title: str = ""
    colour: str = "black"
    bold: bool = False
    framed: bool = False


def _tile_figure(
    tiles: list[Tile], cols: int, tile_w: float, tile_h: float
) -> tuple[Figure, Photos]:
    """Tiles in a grid under a header strip: a figure holding the text, and the photos (with
    their frames) for ``save_figure`` to paste at fixed pixel positions.

    One axes per photo, placed by a layout engine, took 0.66 s for 30 photos; this 0.35 s, a
    third of it the PNG encoding."""
    cols = max(1, min(cols, len(tiles)))
    rows = max(1, math.ceil(len(tiles) / cols))
    fig = Figure(figsize=(cols * tile_w, rows * tile_h + HEADER_IN), dpi=DPI)
    width, height = round(cols * tile_w * DPI), round((rows * tile_h + HEADER_IN) * DPI)
    photos: list[tuple[int, int, np.ndarray]] = []
    title_px = TITLE_PX if any(tile.title for tile in tiles) else 0
    tile_px, row_px = tile_w * DPI, tile_h * DPI
    side = int(min(tile_px, row_px - title_px)) - 2 * TILE_MARGIN_PX
    frame = (np.array(to_rgb(WRONG)) * 255).round().astype(np.uint8)
    for index, tile in enumerate(tiles):
        row, col = divmod(index, cols)
        left = round(col * tile_px + (tile_px - side) / 2)
        top = round(HEADER_IN * DPI + row * row_px + title_px + (row_px - title_px - side) / 2)
        photo = _thumbnail(tile.path, side)
        if tile.framed:
            f = FRAME_PX
            across, down = (
                np.broadcast_to(frame, shape) for shape in ((f, side + 2 * f, 3), (side, f, 3))
            )
            photos += [(top - f, left - f, across), (top + side, left - f, across)]
            photos += [(top, left - f, down), (top, left + side, down)]
        if photo is None:
            # The dataset may have moved since training; say so in the tile rather than fail.
            # Drawn, not pasted, so that the text stays on top.
            fig.add_artist(
                Rectangle(
                    (left / width, 1 - (top + side) / height),
                    side / width,
                    side / height,
                    transform=fig.transFigure,
                    facecolor="#dddddd",
                    edgecolor="none",
                    zorder=0,
                )
            )
            fig.text(
                (left + side / 2) / width,
                1 - (top + side / 2) / height,
                "image not found",
                ha="center",
                va="center",
                fontsize=8,
            )
        else:
            photos.append((top, left, photo))
        if tile.title:
            fig.text(
                (left + side / 2) / width,
                1 - (top - FRAME_PX - 2) / height,
                tile.title,
                ha="center",
                va="bottom",
                fontsize=9,
                color=tile.colour,
                fontweight="bold" if tile.bold else "normal",
            )
    return fig, photos


def _header(fig: Figure, title: str, fontsize: int) -> None:
    fig.text(
        0.5,
        1 - HEADER_IN / 2 / fig.get_figheight(),
        title,
        ha="center",
        va="center",
        fontsize=fontsize,
        fontweight="bold",
    )


def _literal(text: str) -> str:
    # Class and run names are user data: a "$" would otherwise start matplotlib mathtext.
    return text.replace("$", r"\$")


def _short(text: str, limit: int = 18) -> str:
    return _literal(text if len(text) <= limit else text[: limit - 1] + "…")


def percent(value: Any, digits: int = 1) -> str:
    """A fraction as a percentage; "n/a" for missing or NaN values (unfinished runs)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return "n/a"
    return "n/a" if math.isnan(number) else f"{100 * number:.{digits}f}%"


def _default_out(run_dir: str | Path, name: str, out: str | Path | None) -> Path:
    return Path(out) if out is not None else Path(run_dir) / FIGURES_DIR / f"{name}.png"


def plot_class_samples(
    split_or_data: DataSplit | str | Path,
    split: str = "train",
    class_name: str | None = None,
    n: int = 10,
    seed: int = 0,
    *,
    out: str | Path,
) -> Path:
    """A row of ``n`` random images of one class (a random class if none is named), seeded."""
    if split not in ("train", "val", "test"):
        raise UserError(f"--split {split}: use train, val or test")
    if n < 1:
        raise UserError(f"-n {n}: show at least one image")
    data = resolve_split(split_or_data)
    name = choose_class(data.classes, class_name, seed)
    files = sorted(getattr(data, split).get(name, []))
    if not files:
        raise UserError(f"--class {name}: no {split} images of this class; try another --split")
    chosen = random.Random(seed).sample(files, min(n, len(files)))
    tiles = [Tile(Path(data.root) / rel) for rel in chosen]
    fig, photos = _tile_figure(tiles, SAMPLE_COLS, 1.8, 1.8)
    _header(
        fig,
        f"{_literal(name)}: {len(chosen)} random {split} images (of {len(files)}, seed {seed})",
        16,
    )
    return save_figure(fig, out, photos)


def plot_curves(run_dir: str | Path, out: str | Path | None = None) -> Path:
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
    fig.suptitle(f"Training curves: {_literal(Path(run_dir).name)}", fontsize=13, fontweight="bold")
    return save_figure(fig, _default_out(run_dir, "curves", out))


def plot_confusion(run_dir: str | Path, out: str | Path | None = None) -> Path:
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
    labels = [_short(c) for c in classes]
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
    return save_figure(fig, _default_out(run_dir, "confusion", out))


def plot_per_class_accuracy(run_dir: str | Path, out: str | Path | None = None) -> Path:
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
    ax.set_yticks(positions, [_short(c, 24) for c in classes])
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
    return save_figure(fig, _default_out(run_dir, "per_class_accuracy", out))


def _prediction_tiles(
    run_dir: Path, rows: list[dict[str, str]], title: str, out: Path, empty_message: str
) -> Path:
    if not rows:
        fig = Figure(figsize=(6, 1.5), dpi=DPI)
        fig.text(0.5, 0.6, title, ha="center", va="center", fontsize=13, fontweight="bold")
        fig.text(0.5, 0.3, empty_message, ha="center", va="center", fontsize=11)
        return save_figure(fig, out)
    split = DataSplit.load(_require(run_dir / "split.json", "split.json"))
    root = Path(split.root)
    tiles = []
    for row in rows:
        wrong = row["true"] != row["predicted"]
        p_true = row.get(f"p_{row['true']}")
        # On a mistake, how much probability the truth got says how near the model came.
        truth = f"true: {_short(row['true'])}"
        if wrong and p_true:
            truth += f" ({float(p_true):.2f})"
        tiles.append(
            Tile(
                root / row["path"],
                f"pred: {_short(row['predicted'])} ({float(row['confidence']):.2f})\n{truth}",
                colour=WRONG if wrong else RIGHT,
                bold=wrong,
                framed=wrong,
            )
        )
    fig, photos = _tile_figure(tiles, GRID_COLS, 2.1, 2.5)
    _header(fig, title, 13)
    return save_figure(fig, out, photos)


def plot_prediction_grid(
    run_dir: str | Path, n: int = 30, seed: int = 0, out: str | Path | None = None
) -> Path:
    """``n`` random test images (seeded) with prediction and truth; wrong ones framed in red."""
    run_dir = Path(run_dir)
    predictions = read_predictions(run_dir)
    chosen = random.Random(seed).sample(predictions, min(n, len(predictions)))
    wrong = sum(r["true"] != r["predicted"] for r in chosen)
    title = (
        f"{len(chosen)} random test images (seed {seed}): "
        f"{len(chosen) - wrong} right, {wrong} wrong (red)"
    )
    return _prediction_tiles(
        run_dir,
        chosen,
        title,
        _default_out(run_dir, "prediction_grid", out),
        "the test set is empty",
    )


def plot_confident_mistakes(
    run_dir: str | Path, n: int = 12, out: str | Path | None = None
) -> Path:
    """The wrong predictions the model was surest of: label noise and look-alike classes show here."""
    run_dir = Path(run_dir)
    predictions = read_predictions(run_dir)
    mistakes = [r for r in predictions if r["true"] != r["predicted"]]
    mistakes.sort(key=lambda r: float(r["confidence"]), reverse=True)
    chosen = mistakes[:n]
    title = f"The {len(chosen)} most confident mistakes (of {len(mistakes)} wrong test predictions)"
    return _prediction_tiles(
        run_dir,
        chosen,
        title if chosen else "Most confident mistakes",
        _default_out(run_dir, "confident_mistakes", out),
        "no mistakes: every test image was classified correctly",
    )


def load_comparison(comparison_dir: str | Path) -> dict[str, Any]:
    """``comparison.json`` as {"rows": [...], "best_strategy": ..., ...}; a bare list is rows."""
    path = _require(Path(comparison_dir) / "comparison.json", "comparison.json")
    data = read_json(path)
    if isinstance(data, list):
        data = {"rows": data}
    rows = next(
        (data[k] for k in ("rows", "runs", "strategies") if isinstance(data.get(k), list)), None
    )
    if not rows or not all(isinstance(r, dict) and "strategy" in r for r in rows):
        raise UserError(f"{path}: expected a list of rows with a 'strategy' each")
    return {**data, "rows": rows}


def plot_comparison(comparison_dir: str | Path, out: str | Path | None = None) -> Path:
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
    return save_figure(fig, _default_out(comparison_dir, "comparison", out))


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
