"""Figures made of photos: random samples of a class, the prediction grid, the most confident
mistakes.

Photos are decoded small (JPEG draft mode) and pasted as pixels at fixed positions under a text
figure (``figure_files.save_figure``): placing one axes per photo with a layout engine took twice
as long. Each figure comes two ways: ``*_figure`` returns a Figure for a notebook to show inline,
``plot_*`` writes the PNG a run directory and the report hold.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image, ImageOps

from inat_finetune.data.folders import DataSplit
from inat_finetune.data.images import load_image
from inat_finetune.errors import UserError
from inat_finetune.reporting.figure_files import (
    DPI,
    FRAME_PX,
    GRID_COLS,
    HEADER_IN,
    RIGHT,
    SAMPLE_COLS,
    THUMB_PX,
    TILE_MARGIN_PX,
    TITLE_PX,
    WRONG,
    Photos,
    choose_class,
    default_out,
    header,
    inline_figure,
    literal,
    read_predictions,
    require_file,
    resolve_split,
    save_figure,
    short,
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


def _class_samples(
    split_or_data: DataSplit | str | Path, split: str, class_name: str | None, n: int, seed: int
) -> tuple[Figure, Photos]:
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
    header(
        fig,
        f"{literal(name)}: {len(chosen)} random {split} images (of {len(files)}, seed {seed})",
        16,
    )
    return fig, photos


def class_samples_figure(
    split_or_data: DataSplit | str | Path,
    split: str = "train",
    class_name: str | None = None,
    n: int = 10,
    seed: int = 0,
) -> Figure:
    """A row of ``n`` random images of one class (a random class if none is named), seeded."""
    return inline_figure(*_class_samples(split_or_data, split, class_name, n, seed))


def plot_class_samples(
    split_or_data: DataSplit | str | Path,
    split: str = "train",
    class_name: str | None = None,
    n: int = 10,
    seed: int = 0,
    *,
    out: str | Path,
) -> Path:
    """``class_samples_figure`` written as a PNG at ``out``."""
    fig, photos = _class_samples(split_or_data, split, class_name, n, seed)
    return save_figure(fig, out, photos)


def _prediction_tiles(
    run_dir: Path, rows: list[dict[str, str]], title: str, empty_message: str
) -> tuple[Figure, Photos]:
    if not rows:
        fig = Figure(figsize=(6, 1.5), dpi=DPI)
        fig.text(0.5, 0.6, title, ha="center", va="center", fontsize=13, fontweight="bold")
        fig.text(0.5, 0.3, empty_message, ha="center", va="center", fontsize=11)
        return fig, ()
    split = DataSplit.load(require_file(run_dir / "split.json", "split.json"))
    root = Path(split.root)
    tiles = []
    for row in rows:
        wrong = row["true"] != row["predicted"]
        p_true = row.get(f"p_{row['true']}")
        # On a mistake, how much probability the truth got says how near the model came.
        truth = f"true: {short(row['true'])}"
        if wrong and p_true:
            truth += f" ({float(p_true):.2f})"
        tiles.append(
            Tile(
                root / row["path"],
                f"pred: {short(row['predicted'])} ({float(row['confidence']):.2f})\n{truth}",
                colour=WRONG if wrong else RIGHT,
                bold=wrong,
                framed=wrong,
            )
        )
    fig, photos = _tile_figure(tiles, GRID_COLS, 2.1, 2.5)
    header(fig, title, 13)
    return fig, photos


def _prediction_grid(run_dir: str | Path, n: int, seed: int) -> tuple[Figure, Photos]:
    run_dir = Path(run_dir)
    predictions = read_predictions(run_dir)
    chosen = random.Random(seed).sample(predictions, min(n, len(predictions)))
    wrong = sum(r["true"] != r["predicted"] for r in chosen)
    title = (
        f"{len(chosen)} random test images (seed {seed}): "
        f"{len(chosen) - wrong} right, {wrong} wrong (red)"
    )
    return _prediction_tiles(run_dir, chosen, title, "the test set is empty")


def prediction_grid_figure(run_dir: str | Path, n: int = 30, seed: int = 0) -> Figure:
    """``n`` random test images (seeded) with prediction and truth; wrong ones framed in red."""
    return inline_figure(*_prediction_grid(run_dir, n, seed))


def plot_prediction_grid(
    run_dir: str | Path, n: int = 30, seed: int = 0, out: str | Path | None = None
) -> Path:
    """``prediction_grid_figure`` written as ``figures/prediction_grid.png`` (or ``out``)."""
    target = default_out(run_dir, "prediction_grid", out)
    fig, photos = _prediction_grid(run_dir, n, seed)
    return save_figure(fig, target, photos)


def _confident_mistakes(run_dir: str | Path, n: int) -> tuple[Figure, Photos]:
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
        "no mistakes: every test image was classified correctly",
    )


def confident_mistakes_figure(run_dir: str | Path, n: int = 12) -> Figure:
    """The wrong predictions the model was surest of: label noise and look-alike classes show here."""
    return inline_figure(*_confident_mistakes(run_dir, n))


def plot_confident_mistakes(
    run_dir: str | Path, n: int = 12, out: str | Path | None = None
) -> Path:
    """``confident_mistakes_figure`` written as ``figures/confident_mistakes.png`` (or ``out``)."""
    target = default_out(run_dir, "confident_mistakes", out)
    fig, photos = _confident_mistakes(run_dir, n)
    return save_figure(fig, target, photos)
