"""What every figure shares: sizes, colours, the run files they read, rendering and saving.

Figures are plain ``matplotlib.figure.Figure`` objects rendered by Agg, never pyplot: no display
is needed and no global state is shared between calls (a notebook shows a returned Figure inline
and nothing stays open). Each figure has a fixed size in inches at ``DPI``, so its pixel size is
known in advance (the tests rely on it). ``save_figure`` writes one atomically as a PNG, with
photos pasted in at fixed pixel positions; ``inline_figure`` gives the same picture as a Figure.
The readers (``load_results``, ``read_metrics``, ``read_predictions``) read only a run
directory's files, so figures can be redrawn for any finished run without the model.
"""

from __future__ import annotations

import csv
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from inat_finetune.data.folders import DataSplit, make_split
from inat_finetune.errors import UserError
from inat_finetune.runfiles import atomic_write, read_json

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


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise UserError(
            f"{path}: missing; {path.parent} needs {what} (is it a run directory made by "
            "`inat-finetune train`?)"
        )
    return path


def load_results(run_dir: str | Path) -> dict[str, Any]:
    return read_json(require_file(Path(run_dir) / "results.json", "results.json"))


def read_metrics(run_dir: str | Path) -> dict[str, dict[int, float]]:
    """``metrics.csv`` as {metric: {epoch: value}}; Lightning writes train and val on separate rows."""
    path = require_file(Path(run_dir) / "metrics.csv", "metrics.csv")
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
    path = require_file(Path(run_dir) / "test_predictions.csv", "test_predictions.csv")
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


def render_rgb(fig: Figure, photos: Photos = ()) -> np.ndarray:
    """``fig`` rendered by Agg as RGB pixels, with ``photos`` (top, left, pixels) pasted over it."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgb = np.array(np.asarray(canvas.buffer_rgba())[..., :3])
    for top, left, pixels in photos:
        rgb[top : top + pixels.shape[0], left : left + pixels.shape[1]] = pixels
    return rgb


def save_figure(fig: Figure, out: str | Path, photos: Photos = ()) -> Path:
    """Render ``fig``, paste ``photos`` (top, left, pixels) over it, write it as a PNG."""
    # Rendered by Agg and saved as RGB through PIL: no alpha channel (a quarter fewer bytes for
    # photo grids) and no matplotlib URL in the PNG metadata (the report has no external links).
    # zlib level 3 instead of 6: a photo grid encodes in 0.14 s instead of 0.37 s, 7% larger.
    image = Image.fromarray(render_rgb(fig, photos))
    return atomic_write(
        out, lambda handle: image.save(handle, format="PNG", dpi=(DPI, DPI), compress_level=3)
    )


def inline_figure(fig: Figure, photos: Photos = ()) -> Figure:
    """A Figure a notebook shows inline: ``fig`` itself, or with ``photos`` pasted in, a Figure
    of the same size holding the rendered picture (photos are pasted as pixels, not drawn)."""
    if not photos:
        return fig
    picture = Figure(figsize=tuple(fig.get_size_inches()), dpi=DPI)
    axes = picture.add_axes((0, 0, 1, 1))
    axes.imshow(render_rgb(fig, photos), interpolation="antialiased")
    axes.set_axis_off()
    return picture


def header(fig: Figure, title: str, fontsize: int) -> None:
    fig.text(
        0.5,
        1 - HEADER_IN / 2 / fig.get_figheight(),
        title,
        ha="center",
        va="center",
        fontsize=fontsize,
        fontweight="bold",
    )


def literal(text: str) -> str:
    # Class and run names are user data: a "$" would otherwise start matplotlib mathtext.
    return text.replace("$", r"\$")


def short(text: str, limit: int = 18) -> str:
    return literal(text if len(text) <= limit else text[: limit - 1] + "…")


def percent(value: Any, digits: int = 1) -> str:
    """A fraction as a percentage; "n/a" for missing or NaN values (unfinished runs)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return "n/a"
    return "n/a" if math.isnan(number) else f"{100 * number:.{digits}f}%"


def default_out(run_dir: str | Path, name: str, out: str | Path | None) -> Path:
    return Path(out) if out is not None else Path(run_dir) / FIGURES_DIR / f"{name}.png"
