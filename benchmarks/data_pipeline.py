"""Images per second: the naive ImageFolder loader against the prepared-image cache.

    PYTHONPATH=src python benchmarks/data_pipeline.py               # 256 generated 1024x768 JPEGs
    PYTHONPATH=src python benchmarks/data_pipeline.py --images 512 --workers 2

Generates photo-like 1024x768 JPEGs (smooth gradients, shapes and grain, quality 90, so they
decode like photographs rather than like noise), then times full passes of 2-worker
DataLoaders, batch 32, that yield normalised 224-px tensors:

* naive: ``torchvision.datasets.ImageFolder`` with PIL transforms, the whole JPEG decoded;
* direct: the project's loader without the cache (JPEG draft mode, then the same transforms);
* prepared: the project's loader reading the prepared-image cache (built once, timed apart).

The project's loaders are set up as the datamodule sets them up (the training loader shuffles
and augments each sample under its own seed, ``data.sampling.ResumableLoader``) and timed as a
CPU run uses them: they hand over uint8 images and the datamodule normalises each batch on the
device (``FineTuneDataModule.on_after_batch_transfer``), here this CPU, so that step runs in the
main process inside the timed loop and every loader ends with the same normalised float32
batches; their workers keep freed memory (``allocator.keep_freed_memory``) and so does the main
process, as inside ``train`` on a CPU (``allocator.freed_memory_kept``).
``--normalise-in-workers`` times the older hand-over (each worker normalises each image and
hands over float32); ``--default-allocator`` leaves the main process with glibc's defaults, as
``reuse_freed_memory: false`` does.

Each is timed with the evaluation transform (resize, centre crop), with the training
augmentation (random resized crop, flip, colour jitter, rotation) per image in the workers
(``--augment-on cpu``), and with the same augmentation on the batch after the transfer
(``--augment-on device``, ``data/batch_augment.py``): the workers then read the stored uint8
image and draw its parameters, and the batch is augmented in the main process, here on this
CPU, inside the timed loop; timed once with the random resized crops made on the device with
the rest, and once in the workers (``crop_in_loader``, the default without a GPU). After one
untimed pass (so the page cache is equally warm for all), full passes repeat for at least 3
seconds and the mean rate is reported: a prepared pass over 256 images lasts a tenth of a
second, too short to time once.
"""

from __future__ import annotations

import inat_finetune  # noqa: F401 - first: sets OpenMP's wait policy before torch loads

# isort: split
import argparse
import os
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from naive_loop import naive_transforms
from PIL import Image, ImageDraw, ImageFilter
from run_speed import load, machine
from torch.utils.data import DataLoader
from torchvision import datasets

from inat_finetune.data.datamodule import FineTuneDataModule
from inat_finetune.data.folders import make_split
from inat_finetune.data.sampling import ResumableLoader
from inat_finetune.models.backbones import IMAGENET_PREPROCESSING
from inat_finetune.runtime.allocator import freed_memory_kept, keep_freed_memory
from inat_finetune.speed.prepared import prepared_images_for


def photo_like(path: Path, seed: int, size: tuple[int, int] = (1024, 768)) -> None:
    """A JPEG with the low-frequency structure and grain of a photograph."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack(
        [
            rng.uniform(40, 200)
            + rng.uniform(-60, 60) * np.sin(x / rng.uniform(80, 300) + c)
            + rng.uniform(-60, 60) * np.cos(y / rng.uniform(80, 300) + 2 * c)
            for c in range(3)
        ],
        axis=-1,
    )
    image = Image.fromarray(base.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(25):
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        box = [x0, y0, x0 + rng.integers(20, 300), y0 + rng.integers(20, 300)]
        draw.ellipse(box, fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    image = image.filter(ImageFilter.GaussianBlur(2))
    grain = rng.normal(0, 6, (h, w, 3))
    pixels = (np.asarray(image, dtype=np.float32) + grain).clip(0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=90)


def images_per_second(loader: DataLoader, on_device: Any = None, seconds: float = 3.0) -> float:
    """Mean images/s over full passes repeated for at least ``seconds``, after one untimed pass
    (page cache and persistent workers warm); ``on_device`` is applied to each batch, timed."""

    def one_pass() -> int:
        count = 0
        for batch in loader:
            images, labels = on_device(batch) if on_device else batch
            assert images.dtype == torch.float32
            count += len(labels)
        return count

    one_pass()
    started, count = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        count += one_pass()
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--size", type=int, nargs=2, default=(1024, 768), metavar=("W", "H"))
    parser.add_argument(
        "--normalise-in-workers",
        action="store_true",
        help="the project's workers normalise each image and hand over float32",
    )
    parser.add_argument(
        "--default-allocator",
        action="store_true",
        help="glibc's default allocator settings in the main process for the project's loaders",
    )
    parser.add_argument("--out", type=Path, help="also write the markdown report here")
    args = parser.parse_args()

    lines = [
        f"- date: {datetime.now().isoformat(timespec='minutes')}",
        f"- machine: {machine()}",
        f"- command: `{' '.join(['python', *sys.argv])}`",
        f"- {args.images} generated {args.size[0]}x{args.size[1]} JPEGs, {args.workers} workers, "
        f"batch {args.batch_size}, 224-px output; the project's loaders normalise "
        + ("in the workers" if args.normalise_in_workers else "uint8 batches in the main process")
        + (", glibc defaults" if args.default_allocator else ", freed memory kept")
        + " in the main process",
        f"- load average (1/5/15 min) at start: {load()}",
    ]
    with tempfile.TemporaryDirectory(prefix="inat-pipeline-") as tmp:
        root = Path(tmp) / "data"
        for i in range(args.images):
            photo_like(root / ("a", "b")[i % 2] / f"{i}.jpg", seed=i, size=tuple(args.size))
        size_mb = sum(p.stat().st_size for p in root.rglob("*.jpg")) / 1e6
        lines.append(f"- JPEGs on disk: {size_mb / args.images * 1000:.0f} KB each")
        split = make_split(root, seed=0, val_fraction=0.01, test_fraction=0.01)
        pre = IMAGENET_PREPROCESSING
        started = time.perf_counter()
        store, summary = prepared_images_for(split, pre, cache_dir=str(Path(tmp) / "cache"))
        build_s = time.perf_counter() - started
        n = sum(len(split.samples(s)) for s in ("train", "val", "test"))
        lines.append(
            f"- building the prepared cache once: {build_s:.1f} s for {n} images "
            f"({n / build_s:.0f} images/s, {summary}), "
            f"{store.arrays.data_path.stat().st_size / n / 1000:.0f} KB per image"
        )
        # All images in one "train" split so each loader sees every image once per pass.
        everything = split.samples("train") + split.samples("val") + split.samples("test")
        loader_args = dict(batch_size=args.batch_size, num_workers=args.workers)
        # The naive loader first, for both transforms: the project's allocator setting leaves
        # glibc's thresholds fixed for the rest of the process (runtime/allocator.py), which would
        # also speed up naive workers started after it.
        naive = {}
        for augment in (False, True):
            train_tf, _ = naive_transforms(augment)
            naive_ds = datasets.ImageFolder(str(root), transform=train_tf)
            naive[augment] = images_per_second(DataLoader(naive_ds, **loader_args))
        rows = []
        modes = (
            ("evaluation transform", False, "cpu", None),
            ("training augmentation, per image in the workers", True, "cpu", None),
            ("training augmentation, on the batch, crops on the device", True, "device", False),
            ("training augmentation, on the batch, crops in the workers", True, "device", True),
        )
        for title, augment, augment_on, crop_in_loader in modes:
            rates = {}
            for name, image_store in (("direct", None), ("prepared", store)):
                dm = FineTuneDataModule(
                    split,
                    pre,
                    args.batch_size,
                    args.workers,
                    augment,
                    image_store=image_store,
                    normalise_on_device=not args.normalise_in_workers,
                    augment_on=augment_on,
                    crop_in_loader=crop_in_loader,
                )
                dataset = dm.dataset("train")
                dataset.samples = everything
                # Set up as the datamodule's own loaders are: training's shuffles and seeds
                # each sample (data.sampling), evaluation's reads in order.
                loader = (
                    ResumableLoader(
                        dataset,
                        args.batch_size,
                        seed=0,
                        num_workers=args.workers,
                        collate_fn=dm.train_collate(),
                    )
                    if augment
                    else DataLoader(
                        dataset,
                        persistent_workers=True,
                        worker_init_fn=keep_freed_memory,
                        **loader_args,
                    )
                )
                with freed_memory_kept(not args.default_allocator):
                    rates[name] = images_per_second(loader, dm.on_after_batch_transfer)
            rows.append(
                f"| {title} | "
                f"{naive[augment]:.0f} | {rates['direct']:.0f} | {rates['prepared']:.0f} | "
                f"{rates['prepared'] / naive[augment]:.1f}x |"
            )
            print(rows[-1], flush=True)
    lines.append(f"- load average at end: {load()}")
    lines += [
        "",
        "| transform | naive ImageFolder (img/s) | project, no cache (img/s) "
        "| prepared cache (img/s) | prepared / naive |",
        "|---|---:|---:|---:|---:|",
        *rows,
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.write_text(report)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
