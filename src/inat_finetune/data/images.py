"""Reading one photo safely: images bounded by memory, never a pipe, always 8-bit RGB.

Images are bounded by memory, not only by pixels (``memory_refusal``, the one guard every entry
point calls: the scan behind train, prepare and check-data, ``load_image`` behind training,
evaluation, prepare, predict and serve). From the header alone, before any pixel is decoded,
an image is refused when

* its pixel count is over PIL's ``Image.MAX_IMAGE_PIXELS`` (the decompression-bomb limit);
* its long side is more than ``MAX_ASPECT_RATIO`` times its short side: resizing the short
  side to the network's size scales the long side up by the same factor, so a 146 KB PNG of
  4 x 20,000,000 px would need tens of gigabytes;
* decoding it (``DECODED_BYTES_PER_PIXEL`` per pixel: PIL's 4-byte pixels and the RGB copy) or
  resizing it to the target short side would take more than ``IMAGE_MEMORY_BUDGET``.

Files that are not regular files (named pipes, devices, sockets) are refused without reading
them: opening a named pipe would wait forever for a writer. ``check_image`` is the scan's
verdict on one file: None when it is a usable image, else the reason it is skipped.
"""


from __future__ import annotations


import logging

import os

import random

import stat

import warnings

from collections import Counter

from collections.abc import Sequence

from concurrent.futures import ThreadPoolExecutor

from contextlib import nullcontext

from dataclasses import asdict, dataclass, field

from pathlib import Path

from typing import IO, Any

import lightning as L

import numpy as np

import torch

from PIL import Image, ImageOps

from torch.utils.data import DataLoader, Dataset

from torchvision.transforms import v2

from inat_finetune.runtime.allocator import keep_freed_memory

from inat_finetune.runtime.distributed import evaluation_sampler

from inat_finetune.errors import UserError

from inat_finetune.models.backbones import Preprocessing

from inat_finetune.runfiles import read_json, write_json_atomic



# GIF is left out on purpose: in scraped datasets GIFs are placeholders ("image not found")
# or animations, not photographs.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})


# The memory bounds of one image (module docstring); the pixel limit is PIL's MAX_IMAGE_PIXELS.
MAX_ASPECT_RATIO = 50


IMAGE_MEMORY_BUDGET = 1 << 30  # bytes, per image being decoded or resized


DECODED_BYTES_PER_PIXEL = 8  # PIL holds 4 bytes per pixel, and load_image makes an RGB copy


RESIZED_BYTES_PER_PIXEL = 6  # the uint8 RGB result and the resize's intermediate pass


class ImageRefused(ValueError):
    """An image refused without decoding it; ``reason`` is the skip reason, limits included."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.3g} GiB"


def memory_refusal(
    size: tuple[int, int], target: int | None = None, max_pixels: int | None = None
) -> str | None:
    """Why an image of ``size`` (width, height, from its header) must not be decoded, or None.

    ``target`` is the short side it will be resized to (None: not known yet, as in the scan);
    ``max_pixels`` the pixel limit to apply (None: none here, PIL applies its own on open).
    """
    width, height = size
    short, long = min(width, height), max(width, height)
    described = f"{width:,} x {height:,} px"
    if short < 1:
        return f"does not decode (header says {described})"
    if max_pixels is not None and width * height > max_pixels:
        return f"over the pixel limit ({max_pixels} pixels)"
    if long > MAX_ASPECT_RATIO * short:
        return (
            f"over the image memory budget ({described} is 1:{long / short:,.0f}; "
            f"the limit is 1:{MAX_ASPECT_RATIO} long side to short side, which keeps resizing "
            f"it under {_gib(IMAGE_MEMORY_BUDGET)})"
        )
    decoded = width * height * DECODED_BYTES_PER_PIXEL
    resized = 0 if target is None else target * -(-long * target // short) * RESIZED_BYTES_PER_PIXEL
    needed = max(decoded, resized)
    if needed > IMAGE_MEMORY_BUDGET:
        step = "decoding" if decoded >= resized else f"resizing it to {target} px"
        return (
            f"over the image memory budget ({described}: {step} takes {_gib(needed)}; "
            f"the limit is {_gib(IMAGE_MEMORY_BUDGET)} per image)"
        )
    return None


_FILE_KINDS = {
    stat.S_IFIFO: "named pipe",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
    stat.S_IFSOCK: "socket",
    stat.S_IFDIR: "directory",
}


def not_regular_reason(mode: int) -> str | None:
    """Why a file of ``st_mode`` is not read as an image (a pipe, a device...), or None."""
    if stat.S_ISREG(mode):
        return None
    kind = _FILE_KINDS.get(stat.S_IFMT(mode), "special file")
    return f"not a regular file ({kind})"


def open_regular(path: str | Path) -> IO[bytes]:
    """Open ``path`` for reading only if it is a regular file; raise ImageRefused otherwise.

    Opened without blocking and checked on the open handle, so a named pipe (which would wait
    for a writer) or a file swapped for one after a check is never read.
    """
    reason = not_regular_reason(os.stat(path).st_mode)  # a socket cannot even be opened
    if reason is not None:
        raise ImageRefused(reason)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    descriptor = os.open(path, flags)
    try:
        reason = not_regular_reason(os.fstat(descriptor).st_mode)
        if reason is not None:
            raise ImageRefused(reason)
        if hasattr(os, "set_blocking"):
            os.set_blocking(descriptor, True)
        return os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise


def check_image(path: Path) -> str | None:
    """Return why ``path`` is not a usable image, or None if it decodes."""
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        return f"not an image file ({path.suffix or 'no extension'})"
    try:
        with open_regular(path) as handle:
            if os.fstat(handle.fileno()).st_size == 0:
                return "empty file"
            return _check_decodes(handle)
    except ImageRefused as exc:
        return exc.reason
    except Image.DecompressionBombError:
        return f"over the pixel limit ({Image.MAX_IMAGE_PIXELS} pixels)"
    except PermissionError:
        return "not readable (permission denied)"
    except (OSError, SyntaxError, ValueError) as exc:
        return f"does not decode ({type(exc).__name__}: {exc})"


def _check_decodes(handle: IO[bytes]) -> str | None:
    with Image.open(handle) as img:
        # Compared here, not by turning PIL's warning into an error: warning filters are
        # process-wide, and this runs in threads that would undo each other's filters.
        reason = memory_refusal(img.size, max_pixels=Image.MAX_IMAGE_PIXELS)
        if reason is not None:
            return reason
        # Reduced-size JPEG decoding reads every byte of the stream (so truncation is
        # caught) at a fraction of the cost of a full decode.
        img.draft("RGB", (64, 64))
        reason = memory_refusal(img.size)  # what this decode will hold, after the draft
        if reason is not None:
            return reason
        img.load()
    return None


def unusable_images(paths: Sequence[Path], progress: bool = False) -> list[tuple[Path, str]]:
    """The files of ``paths`` that the scan would now skip, each with why (its own check).

    ``train --resume`` runs this over a run's split before it changes anything in the run.
    """
    with (
        ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool,
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        checks = pool.map(check_image, paths)
        if progress:
            from rich.progress import track

            checks = track(checks, total=len(paths), description="Checking the run's images")
        reasons = list(checks)
    return [(path, why) for path, why in zip(paths, reasons, strict=True) if why is not None]


def load_image(path: str | Path | IO[bytes], draft_size: int | None = None) -> Image.Image:
    """Open any photo as 8-bit RGB: EXIF rotation applied, 16-bit, CMYK, palette, alpha handled.

    ``draft_size`` is also the short side the caller resizes to: an image whose decode or resize
    would exceed the memory budget raises ImageRefused before any pixel is decoded, and so does
    a path that is not a regular file (a named pipe would block).
    """
    opened = isinstance(path, str | Path)
    source = open_regular(path) if opened else path
    with source if opened else nullcontext(), Image.open(source) as img:
        if draft_size:
            # JPEG decoding at a reduced scale that still covers draft_size: large photos decode
            # several times faster and lose nothing once resized to the network's input.
            img.draft("RGB", (draft_size, draft_size))
        reason = memory_refusal(img.size, draft_size)
        if reason is not None:
            raise ImageRefused(reason)
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            array = np.asarray(img, dtype=np.float32)
            top = 65535.0 if array.max() > 255 else 255.0
            img = Image.fromarray((array / top * 255).clip(0, 255).astype(np.uint8))
        if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
            img = img.convert("RGBA")
            background = Image.new("RGBA", img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(background, img)
        return img.convert("RGB")


def unusable_after_scan(path: str | Path, exc: Exception) -> str:
    """The one-line error for an image the data scan accepted that now cannot be used.

    Training and evaluation both read images this way, so the message names what happened to
    the file, not the stage.
    """
    again = "or scan the data again (a new run, or evaluate with --data)"
    if isinstance(exc, FileNotFoundError):
        what = "no longer exists (it was there when the data was scanned); restore it"
    elif isinstance(exc, ImageRefused):
        what = f"{exc.reason}; it changed after the data was scanned: replace it"
    else:
        what = f"could not be decoded ({exc}); it changed after the data was scanned: replace it"
    return f"{path}: {what}, {again}"

