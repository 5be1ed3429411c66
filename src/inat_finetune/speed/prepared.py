"""The prepared-image cache: every photo decoded and resized once, then read in every epoch.

Decoding is where an image pipeline spends its time: nature_12K's photos are ~800x600 JPEGs
and the network sees 224 px, yet without this cache every epoch of every strategy of every run
decodes every photo again. With it, an epoch reads small uint8 arrays from one memory-mapped
file (``caching.ArrayStore``), which costs a memory copy instead of a JPEG decode.

What is stored for each image: the image exactly as ``data.load_image`` returns it (EXIF
rotation, 16-bit, CMYK and alpha handled, JPEG draft mode), resized with antialiasing so that
its shorter side is ``size``, as uint8 channels x height x width. Images no larger than that
are kept as they are. Each stored image is checked against its checksum when a run opens the
cache and when it is read (``speed/caching.py``): a damaged or truncated cache costs the damaged
images' preparation again, with a warning, never a wrong image; ``prepare`` and the run's
summary count the ones it found.

Why ``size`` is the preprocessing's ``resize_size`` (256 for the 224-px presets) and not
larger: the evaluation transform's ``Resize(resize_size)`` is then a no-op, so validation and
test images read from the cache are bit for bit the ones the direct path produces, and one
copy serves training and evaluation. Training's ``RandomResizedCrop`` crops from this copy
instead of from the draft-decoded photo (whose shorter side is 256-511 px); its crops cover on
average about half of the image and are scaled up ~1.2x to 224 px, so little detail is lost.

Disk: a 4:3 photo takes 256 x 341 x 3 bytes (~260 KB), about 3 GB for nature_12K's 12k
photos. Raw arrays rather than re-encoded JPEGs because reading must be far cheaper than
decoding (``benchmarks/data_pipeline.py`` measures it); turn the cache off with
``--no-image-cache``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from inat_finetune.data.datamodule import cpu_cores
from inat_finetune.data.folders import DataSplit, make_split
from inat_finetune.data.images import load_image
from inat_finetune.errors import UserError
from inat_finetune.models.backbones import Preprocessing
from inat_finetune.speed.caching import ArrayStore, StoredArrays, cache_root, short_hash

log = logging.getLogger(__name__)


PREPARED_VERSION = 1


CHUNK = 64  # images decoded concurrently; bounds the memory held by finished but unwritten ones


def image_store(
    root: str | Path, size: int, interpolation: str = "bilinear", cache_dir: str | None = None
) -> ArrayStore:
    """The store of one dataset's images prepared at one size."""
    root = str(Path(root).resolve())
    meta = {
        "kind": "images",
        "version": PREPARED_VERSION,
        "root": root,
        "size": size,
        "interpolation": interpolation,
    }
    folder = f"{Path(root).name}-{size}px-{short_hash(meta)}"
    return ArrayStore(cache_root(cache_dir) / "images" / folder, "uint8", meta)


def prepare_image(path: str | Path, size: int, interpolation: str = "bilinear") -> np.ndarray:
    """One image decoded (draft mode) and resized to shorter side ``size``: uint8 (3, H, W)."""
    try:
        image = F.pil_to_tensor(load_image(path, draft_size=size))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: could not be decoded while preparing images ({exc})") from exc
    if min(image.shape[-2:]) > size:
        # The same call as the evaluation transform's Resize, so its result is reproduced exactly.
        image = F.resize(
            image, [size], interpolation=InterpolationMode(interpolation), antialias=True
        )
    return image.numpy()


def _prepare_all(
    paths: list[Path], size: int, interpolation: str, progress: bool
) -> Iterator[tuple[Path, np.ndarray]]:
    # Threads, not processes: PIL's decoder and torch's resize release the GIL.
    with ThreadPoolExecutor(max_workers=cpu_cores()) as pool:

        def prepared() -> Iterator[tuple[Path, np.ndarray]]:
            for start in range(0, len(paths), CHUNK):
                chunk = paths[start : start + CHUNK]
                arrays = pool.map(lambda p: prepare_image(p, size, interpolation), chunk)
                yield from zip(chunk, arrays, strict=True)

        done: Iterator[tuple[Path, np.ndarray]] = prepared()
        if progress:
            from rich.progress import track

            done = track(done, total=len(paths), description=f"Preparing images ({size} px)")
        yield from done


def build(store: ArrayStore, paths: Sequence[str | Path], progress: bool = False) -> int:
    """Prepare the images of ``paths`` not yet in ``store`` (or changed); return how many."""
    size, interpolation = store.meta["size"], store.meta["interpolation"]
    return store.update(paths, lambda todo: _prepare_all(todo, size, interpolation, progress))


class PreparedImageDataset(Dataset):
    """(image, label) pairs read from the prepared-image cache; the same transforms apply."""

    def __init__(
        self, samples: Sequence[tuple[Path, int]], transform: Any, arrays: StoredArrays
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.arrays = arrays

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        image = tv_tensors.Image(torch.from_numpy(self.arrays[path]))
        return self.transform(image), label


@dataclass
class PreparedImages:
    """The prepared images of one split, handed to ``FineTuneDataModule(image_store=...)``."""

    arrays: StoredArrays
    size: int

    def dataset(self, samples: Sequence[tuple[Path, int]], transform: Any) -> Dataset:
        return PreparedImageDataset(samples, transform, self.arrays)


def split_paths(split: DataSplit) -> list[Path]:
    return [path for name in ("train", "val", "test") for path, _ in split.samples(name)]


def prepared_images_for(
    split: DataSplit,
    preprocessing: Preprocessing,
    enabled: bool = True,
    cache_dir: str | None = None,
    progress: bool = False,
) -> tuple[PreparedImages | None, str]:
    """Build or update the cache for every image of ``split``; say what was done.

    Returns None (decode every epoch, as without the cache) when it is turned off or its
    folder cannot be written: the cache is a speed path, never a reason for a run to fail.
    """
    if not enabled:
        return None, "off"
    paths = split_paths(split)
    size = preprocessing.resize_size
    try:
        store = image_store(split.root, size, preprocessing.interpolation, cache_dir)
        computed = build(store, paths, progress)
        images = PreparedImages(store.arrays(paths), size)
    except OSError as exc:
        log.warning("Image cache unusable (%s); decoding the photos in every epoch instead", exc)
        return None, f"off ({type(exc).__name__})"
    damaged = f", {len(store.damaged)} of them damaged in the cache" if store.damaged else ""
    return images, f"on ({len(paths) - computed} reused, {computed} prepared{damaged})"


@dataclass
class PrepareResult:
    directory: Path
    images: int
    prepared: int  # of them: ``damaged``, found damaged in the cache (``ArrayStore.audit``)
    data_bytes: int
    damaged: int = 0


def prepare(
    data: str | Path,
    size: int = 256,
    interpolation: str = "bilinear",
    cache_dir: str | None = None,
    progress: bool = True,
) -> PrepareResult:
    """``inat-finetune prepare``: fill the cache for every usable image under ``data``."""
    if size < 16:
        raise UserError(f"--size {size}: must be at least 16 pixels")
    try:
        InterpolationMode(interpolation)
    except ValueError:
        raise UserError(
            f"--interpolation {interpolation}: use bilinear, bicubic or nearest"
        ) from None
    split = make_split(data, progress=progress)
    paths = split_paths(split)
    store = image_store(split.root, size, interpolation, cache_dir)
    try:
        computed = build(store, paths, progress)
    except OSError as exc:
        raise UserError(
            f"--cache-dir {store.directory.parent.parent}: cannot write the cache ({exc}); "
            "pass a writable folder"
        ) from None
    return PrepareResult(
        store.directory,
        len(paths),
        computed,
        store.data_path.stat().st_size,
        len(store.damaged),
    )
