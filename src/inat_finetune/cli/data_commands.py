"""The commands about data: download, prepare, check-data and show.

A UserError from anywhere below is reported by the command group (app.py): one line, exit 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from inat_finetune.cli.app import out
from inat_finetune.cli.options import field_option
from inat_finetune.errors import UserError
from inat_finetune.runfiles import check_output_dir, check_output_file

CacheDirOpt = field_option("cache_dir")


def download(
    dest: Annotated[Path, typer.Option("--dest", help="folder to put the dataset in")] = Path(
        "data"
    ),
    url: Annotated[
        str | None, typer.Option("--url", help=escape("zip archive [default: nature_12K's URL]"))
    ] = None,
    subset: Annotated[
        int | None,
        typer.Option("--subset", help="fetch only N training images per class (HTTP Range reads)"),
    ] = None,
    test_subset: Annotated[
        int | None,
        typer.Option(
            "--test-subset", help=escape("test images per class with --subset [default: N/5]")
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="seeds which images --subset picks")] = 42,
) -> None:
    """Download nature_12K (resumable, verified) and extract it; --subset for a quick start."""
    from rich.filesize import decimal

    from inat_finetune.data.download import NATURE12K_URL, download_dataset, download_subset

    check_output_dir(dest, "--dest")
    if subset is None:
        if test_subset is not None:
            raise UserError("--test-subset needs --subset N (the training images per class)")
        result = download_dataset(url or NATURE12K_URL, dest)
    else:
        test_n = test_subset if test_subset is not None else max(1, round(subset / 5))
        result = download_subset(url or NATURE12K_URL, dest, subset, test_n, seed)
    if result.already_complete:
        message = f"already complete: {result.root} ({result.files:,} files); nothing fetched"
    else:
        message = (
            f"ready: {result.root} ({result.files:,} files, {decimal(result.bytes_fetched)} "
            f"fetched, {result.skipped_members} junk entries skipped)"
        )
    # soft_wrap: paths are printed whole so they can be copied
    out.print(message, soft_wrap=True, highlight=False)
    out.print(f"next: inat-finetune check-data {result.root}", soft_wrap=True, highlight=False)


def prepare(
    data: Annotated[str, typer.Option("--data", help="dataset root, as passed to train")],
    size: Annotated[
        int,
        typer.Option(
            "--size",
            help="shorter side in pixels: the resize size of the input size you train with "
            "(256 for 224-px inputs, i.e. img_size x 256/224)",
        ),
    ] = 256,
    interpolation: Annotated[
        str, typer.Option(help="bilinear (torchvision presets) or bicubic (some timm presets)")
    ] = "bilinear",
    cache_dir: CacheDirOpt = None,
) -> None:
    """Decode and resize every image once into the cache that train and compare read from."""
    from rich.filesize import decimal

    from inat_finetune.speed.prepared import prepare as run_prepare

    result = run_prepare(data, size, interpolation, cache_dir)
    damaged = f" ({result.damaged:,} of them damaged in the cache)" if result.damaged else ""
    out.print(
        f"{result.images:,} images: {result.prepared:,} prepared{damaged}, "
        f"{result.images - result.prepared:,} already there; {decimal(result.data_bytes)} in "
        f"{result.directory}",
        soft_wrap=True,
        highlight=False,
    )


def check_data_command(
    path: Annotated[Path, typer.Argument(help="dataset root, as passed to --data")],
) -> None:
    """Count images per class and split; find unreadable files, duplicates, missing classes."""
    from inat_finetune.data.datacheck import check_data, render

    report = check_data(path, progress=True)
    render(report, out)
    if not report.ok:
        raise typer.Exit(code=1)


def show(
    data: Annotated[
        str,
        typer.Option("--data", help="dataset root, or a run directory (its split.json is used)"),
    ],
    split: Annotated[str, typer.Option("--split", help="train, val or test")] = "train",
    class_name: Annotated[
        str | None, typer.Option("--class", help=escape("class to show [default: a random one]"))
    ] = None,
    n: Annotated[int, typer.Option("-n", min=1, help="number of images")] = 10,
    seed: Annotated[int, typer.Option(help="seeds the class and image choice")] = 0,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", help=escape("PNG file to write [default: samples-<split>-<class>.png]")
        ),
    ] = None,
) -> None:
    """Save a row of random images of one class, titled with the class (seeded)."""
    from inat_finetune.reporting.plots import choose_class, plot_class_samples, resolve_split

    check_output_file(output, "--output", f"samples-{split}.png")
    data_split = resolve_split(data)
    name = choose_class(data_split.classes, class_name, seed)
    target = output or Path(f"samples-{split}-{name}.png")
    path = plot_class_samples(data_split, split, name, n, seed, out=target)
    out.print(f"wrote {path}")
