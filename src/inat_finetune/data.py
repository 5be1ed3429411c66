"""Find the images, split them, and feed them to Lightning.

Accepted layouts (``detect_layout``):

* nature_12K: ``<root>/inaturalist_12K/{train,val}`` (also ``<root>`` being ``inaturalist_12K``);
  its ``val/`` is the *test* set, the validation set is carved out of ``train/``.
* ``<root>/{train,val}`` or ``<root>/{train,test}``: the same; ``val/`` or ``test/`` is the test set.
* ``<root>/{train,val,test}``: all three given, nothing is carved out.
* ``<root>/<class>/*``: a flat folder of class folders; test and validation sets are carved out,
  stratified.

Only files that are real images count: a file needs an image extension and must decode.
Everything else (``.DS_Store``, placeholders such as GIFs, zero-byte or truncated files) is
skipped, counted and reported, never silently dropped and never fed to the network.

Images are bounded by memory, not only by pixels (``memory_refusal``, the one guard every entry
point calls: the scan behind train, prepare and check-data, ``load_image`` behind training,
evaluation, prepare, predict and serve). From the header alone, before any pixel is decoded,
an image is refused when

* its pixel count is over PIL's ``Image.MAX_IMAGE_PIXELS`` (the decompression-bomb limit);
* its long side is more than ``MAX_ASPECT_RATIO`` (50) times its short side: resizing the short
  side to the network's size scales the long side up by the same factor, so a 146 KB PNG of
  4 x 20,000,000 px would become 80 GB. At 1:50 a 256-px resize stays under 10 MB;
* decoding it (``DECODED_BYTES_PER_PIXEL`` per pixel: PIL's 4-byte pixels and the RGB copy) or
  resizing it to the target short side would take more than ``IMAGE_MEMORY_BUDGET`` (1 GiB).

Files that are not regular files (named pipes, devices, sockets) are refused without reading
them: opening a named pipe would wait forever for a writer.
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

from inat_finetune.allocator import keep_freed_memory
from inat_finetune.distributed import evaluation_sampler
from inat_finetune.errors import UserError
from inat_finetune.models import Preprocessing
from inat_finetune.runfiles import read_json, write_json_atomic

log = logging.getLogger(__name__)

# GIF is left out on purpose: in scraped datasets GIFs are placeholders ("image not found")
# or animations, not photographs.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
IGNORED_DIR_NAMES = frozenset({"__MACOSX"})
NATURE12K_DIR = "inaturalist_12K"

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


@dataclass(frozen=True)
class SkippedFile:
    path: str
    reason: str


@dataclass(frozen=True)
class DatasetLayout:
    """Where the class folders of each split live."""

    kind: str  # "nature12k", "train_test", "train_val_test" or "flat"
    root: Path
    train_dir: Path
    test_dir: Path | None  # None: carve the test set out of train_dir (flat layout)
    val_dir: Path | None = None  # None: carve the validation set out of train_dir


def _visible_dirs(path: Path) -> list[Path]:
    return sorted(
        p
        for p in path.iterdir()
        if p.is_dir() and not p.name.startswith(".") and p.name not in IGNORED_DIR_NAMES
    )


def detect_layout(root: str | Path) -> DatasetLayout:
    root = Path(root).expanduser()
    if not root.exists():
        raise UserError(f"--data {root}: no such directory; pass the folder that holds the images")
    if not root.is_dir():
        raise UserError(f"--data {root}: not a directory; pass the folder that holds the images")
    if (root / NATURE12K_DIR).is_dir():
        root = root / NATURE12K_DIR
    subdirs = {p.name.lower(): p for p in _visible_dirs(root)}
    if "train" in subdirs:
        train = subdirs["train"]
        val, test = subdirs.get("val"), subdirs.get("test")
        kind = "nature12k" if root.name == NATURE12K_DIR else "train_test"
        if test is not None and val is not None:
            return DatasetLayout("train_val_test", root, train, test, val)
        if test is None and val is None:
            raise UserError(
                f"--data {root}: found train/ but no val/ or test/; add a test split or pass a "
                "folder of class folders so one is carved out"
            )
        return DatasetLayout(kind, root, train, test or val)
    if not subdirs:
        raise UserError(
            f"--data {root}: no class folders found; expected <class>/ folders or train/ and val/"
        )
    return DatasetLayout("flat", root, root, None)


def _check_image(path: Path) -> str | None:
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


def _walk_files(folder: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The files under ``folder``, and the folders left out and why (reported, never silent).

    Symlinked folders are not followed, so a link to a parent cannot trap the walk.
    """
    files: list[Path] = []
    left_out: list[tuple[Path, str]] = []

    def unreadable(error: OSError) -> None:
        left_out.append((Path(error.filename), f"folder not readable ({error.strerror})"))

    for dirpath, dirnames, filenames in os.walk(folder, onerror=unreadable, followlinks=False):
        links = [d for d in dirnames if (Path(dirpath) / d).is_symlink()]
        left_out.extend((Path(dirpath) / d, "symlinked folder, not followed") for d in links)
        dirnames[:] = sorted(d for d in dirnames if d not in IGNORED_DIR_NAMES and d not in links)
        files.extend(Path(dirpath) / name for name in sorted(filenames))
    return files, left_out


def scan_class_folders(
    folder: Path, data_root: Path, progress: bool = False
) -> tuple[dict[str, list[str]], list[SkippedFile]]:
    """Map each class folder of ``folder`` to its usable images (paths relative to data_root)."""
    classes = _visible_dirs(folder)
    skipped = []
    # A class folder that is a link to this folder or above it would hold every other class.
    looping = [cls for cls in classes if folder.resolve().is_relative_to(cls.resolve())]
    for cls in looping:
        skipped.append(
            SkippedFile(cls.relative_to(data_root).as_posix(), "symlink to a parent folder")
        )
    classes = [cls for cls in classes if cls not in looping]
    candidates = []
    for cls in classes:
        files, left_out = _walk_files(cls)
        candidates += [(cls.name, path) for path in files]
        skipped += [SkippedFile(p.relative_to(data_root).as_posix(), why) for p, why in left_out]
    # _check_image reports over-size images itself; the filter is set once, here, not per thread.
    with (
        ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool,
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        checks = pool.map(lambda item: _check_image(item[1]), candidates)
        if progress:
            from rich.progress import track

            checks = track(checks, total=len(candidates), description=f"Checking {folder.name}/")
        reasons = list(checks)
    by_class: dict[str, list[str]] = {cls.name: [] for cls in classes}
    for (name, path), reason in zip(candidates, reasons, strict=True):
        rel = path.relative_to(data_root).as_posix()
        if reason is None:
            by_class[name].append(rel)
        else:
            skipped.append(SkippedFile(rel, reason))
    # Junk lying next to the class folders (.DS_Store at the split's top level) is counted too.
    for path in sorted(folder.iterdir()):
        if path.is_file():
            skipped.append(
                SkippedFile(path.relative_to(data_root).as_posix(), "not in a class folder")
            )
    return by_class, skipped


def unusable_images(paths: Sequence[Path], progress: bool = False) -> list[tuple[Path, str]]:
    """The files of ``paths`` that the scan would now skip, each with why (its own check).

    ``train --resume`` runs this over a run's split before it changes anything in the run.
    """
    with (
        ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool,
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        checks = pool.map(_check_image, paths)
        if progress:
            from rich.progress import track

            checks = track(checks, total=len(paths), description="Checking the run's images")
        reasons = list(checks)
    return [(path, why) for path, why in zip(paths, reasons, strict=True) if why is not None]


def split_stratified(
    by_class: dict[str, list[str]], fraction: float, seed: int
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Hold out ``fraction`` of each class, at least one image where the class has two or more.

    Each class is shuffled with its own generator seeded by (seed, class name), so adding or
    removing images of one class never moves images of another between splits.
    """
    kept: dict[str, list[str]] = {}
    held: dict[str, list[str]] = {}
    for name, files in by_class.items():
        files = sorted(files)
        random.Random(f"{seed}:{name}").shuffle(files)
        n_held = round(len(files) * fraction)
        if fraction > 0 and len(files) >= 2:
            n_held = min(max(n_held, 1), len(files) - 1)
        held[name], kept[name] = sorted(files[:n_held]), sorted(files[n_held:])
    return kept, held


@dataclass
class DataSplit:
    """Which image is in which split: the contents of ``split.json``."""

    root: str
    layout: str
    classes: list[str]
    seed: int
    val_fraction: float
    test_fraction: float | None
    train: dict[str, list[str]]
    val: dict[str, list[str]]
    test: dict[str, list[str]]
    skipped: list[SkippedFile] = field(default_factory=list)

    def samples(self, split: str) -> list[tuple[Path, int]]:
        files = getattr(self, split)
        root = Path(self.root)
        return [
            (root / rel, index)
            for index, name in enumerate(self.classes)
            for rel in files.get(name, [])
        ]

    def counts(self) -> dict[str, dict[str, int]]:
        return {
            split: {name: len(getattr(self, split).get(name, [])) for name in self.classes}
            for split in ("train", "val", "test")
        }

    def summary(self) -> dict[str, Any]:
        reasons = Counter(s.reason.split(" (")[0] for s in self.skipped)
        return {
            "root": self.root,
            "layout": self.layout,
            "classes": self.classes,
            "images": self.counts(),
            "skipped_total": len(self.skipped),
            "skipped_by_reason": dict(reasons),
            "skipped": [asdict(s) for s in self.skipped],
        }

    def save(self, path: str | Path) -> Path:
        return write_json_atomic(path, asdict(self))

    @classmethod
    def load(cls, path: str | Path) -> DataSplit:
        data = read_json(path)
        data["skipped"] = [SkippedFile(**s) for s in data.get("skipped", [])]
        return cls(**data)


def make_split(
    data: str | Path,
    seed: int = 42,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    progress: bool = False,
) -> DataSplit:
    """Scan ``data``, drop and count junk, and split it stratified and reproducibly."""
    if not 0 < val_fraction < 1:
        raise UserError(f"--val-fraction {val_fraction}: must be between 0 and 1 (exclusive)")
    if not 0 < test_fraction < 1:
        raise UserError(f"--test-fraction {test_fraction}: must be between 0 and 1 (exclusive)")
    layout = detect_layout(data)
    root = layout.root
    train_pool, skipped = scan_class_folders(layout.train_dir, root, progress)
    _require_images(train_pool, layout.train_dir)
    classes = sorted(train_pool)
    used_test_fraction: float | None = None
    if layout.test_dir is None:
        used_test_fraction = test_fraction
        train_pool, test = split_stratified(train_pool, test_fraction, seed)
    else:
        test, test_skipped = scan_class_folders(layout.test_dir, root, progress)
        skipped += test_skipped
        _require_images(test, layout.test_dir)
        unknown = sorted(set(test) - set(classes))
        if unknown:
            raise UserError(
                f"{layout.test_dir}: classes {unknown} are not in {layout.train_dir}; "
                "the model cannot predict classes it never saw. Remove them or add training images"
            )
    if layout.val_dir is None:
        train, val = split_stratified(train_pool, val_fraction, seed)
    else:
        train, val = train_pool, {}
        val_found, val_skipped = scan_class_folders(layout.val_dir, root, progress)
        skipped += val_skipped
        _require_images(val_found, layout.val_dir)
        val.update(val_found)
    if len(classes) < 2:
        raise UserError(
            f"{layout.train_dir}: found only {len(classes)} class folder ({classes}); "
            "a classifier needs at least two"
        )
    split = DataSplit(
        root=str(root.resolve()),
        layout=layout.kind,
        classes=classes,
        seed=seed,
        val_fraction=val_fraction,
        test_fraction=used_test_fraction,
        train=train,
        val=val,
        test=test,
        skipped=skipped,
    )
    if skipped:
        reasons = Counter(s.reason.split(" (")[0] for s in skipped)
        listed = ", ".join(f"{n} {reason}" for reason, n in reasons.most_common())
        log.warning(
            "Skipped %d file%s (%s); see dataset.json for the list",
            len(skipped),
            "" if len(skipped) == 1 else "s",
            listed,
        )
    return split


def _require_images(by_class: dict[str, list[str]], folder: Path) -> None:
    empty = [name for name, files in by_class.items() if not files]
    if empty:
        raise UserError(
            f"{folder}: class folders {empty} hold no readable images; add images or remove them"
        )


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


class ImageListDataset(Dataset):
    """(image path, label) pairs decoded on access."""

    def __init__(
        self, samples: Sequence[tuple[Path, int]], transform: Any, draft_size: int | None = None
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.draft_size = draft_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        try:
            image = load_image(path, self.draft_size)
        except (OSError, ValueError) as exc:
            raise UserError(unusable_after_scan(path, exc)) from exc
        return self.transform(image), label


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


class ToNormalisedFloat:
    """Image to normalised float32 ``(x / 255 - mean) / std`` in one subtraction and one
    multiplication.

    The same values as ``ToImage``, ``ToDtype(scale=True)`` and ``Normalize`` (to ~1e-6) in
    about half the time: reading a prepared image costs little more than this step, so it
    bounds the prepared cache's images/s.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean, self.std = tuple(mean), tuple(std)
        self._shift = {  # by input dtype: uint8 holds 0-255, floats 0-1
            torch.uint8: torch.tensor(self.mean).mul(255).view(-1, 1, 1),
            torch.float32: torch.tensor(self.mean).view(-1, 1, 1),
        }
        self._scale = {
            torch.uint8: torch.tensor(self.std).mul(255).reciprocal().view(-1, 1, 1),
            torch.float32: torch.tensor(self.std).reciprocal().view(-1, 1, 1),
        }
        # Copies on other devices, made once: a copy per batch would wait on the device.
        self._elsewhere: dict[tuple[torch.dtype, torch.device], tuple[torch.Tensor, ...]] = {}

    def __call__(self, image: Any) -> torch.Tensor:
        """One image (C, H, W) or a batch (B, C, H, W), on any device."""
        if not isinstance(image, torch.Tensor):
            image = v2.functional.to_image(image)
        tensor = image.as_subclass(torch.Tensor)
        if tensor.dtype not in self._shift:
            tensor = v2.functional.to_dtype(tensor, torch.float32, scale=True)
        kind = tensor.dtype
        shift, scale = self._shift[kind], self._scale[kind]
        if tensor.device != shift.device:
            key = (kind, tensor.device)
            if key not in self._elsewhere:
                self._elsewhere[key] = (shift.to(tensor.device), scale.to(tensor.device))
            shift, scale = self._elsewhere[key]
        # Never in place on the input. uint8 is converted first, then shifted and scaled in
        # place: the same values as a promoting subtraction (which converts each element the
        # same way) at a quarter of its time. Elementwise and exactly rounded, so a batch gets
        # bit for bit the values its images would get one by one.
        if kind == torch.uint8:
            return tensor.to(torch.float32).sub_(shift).mul_(scale)
        return tensor.sub(shift).mul_(scale)

    def __repr__(self) -> str:  # part of the feature cache's key: stable, and names the values
        return f"{type(self).__name__}(mean={list(self.mean)}, std={list(self.std)})"


def _output_steps(pre: Preprocessing, normalise: bool) -> list[Any]:
    """The last step of every transform: normalised float32, or the uint8 image as it is, to
    be normalised on the device (``FineTuneDataModule.on_after_batch_transfer``)."""
    return [ToNormalisedFloat(pre.mean, pre.std) if normalise else v2.ToPureTensor()]


def build_train_transform(
    pre: Preprocessing, augment: bool = True, normalise: bool = True
) -> v2.Compose:
    """The seed's augmentation: random resized crop, flip, colour jitter, rotation."""
    if not augment:
        return build_eval_transform(pre, normalise)
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RandomResizedCrop(
                pre.crop_size, interpolation=pre.interpolation_mode, antialias=True
            ),
            v2.RandomHorizontalFlip(),
            v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05),
            v2.RandomRotation(15),
            *_output_steps(pre, normalise),
        ]
    )


def build_eval_transform(pre: Preprocessing, normalise: bool = True) -> v2.Compose:
    """Deterministic: resize, centre crop and normalise exactly as the weights were trained."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(pre.resize_size, interpolation=pre.interpolation_mode, antialias=True),
            v2.CenterCrop(pre.crop_size),
            *_output_steps(pre, normalise),
        ]
    )


SMALL_CPU_MACHINE = 4  # cores; at most this many, and no accelerator: see default_num_workers


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_num_workers(accelerator: str = "auto", prepared: bool = False) -> int:
    """DataLoader worker processes when ``--num-workers`` is not given.

    One per core (at most 8), except when a small machine computes on its CPU and reads the
    prepared-image cache: the network already keeps every core busy there, reading a prepared
    image is a memory copy, and worker processes only add contention and start-up. On 2 cores
    that made MobileNetV2 training epochs ~25% faster without augmentation and no slower with
    it; decoding JPEGs still gains from workers (benchmarks/RESULTS.md).
    """
    cores = cpu_cores()
    if prepared and accelerator == "cpu" and cores <= SMALL_CPU_MACHINE:
        return 0
    return min(8, cores)


class FineTuneDataModule(L.LightningDataModule):
    """Train/val/test loaders over a ``DataSplit``; augmentation on the training subset only.

    With ``normalise_on_device`` (the default) the loaders hand over uint8 images and
    ``on_after_batch_transfer`` normalises each batch once it is on the device, as TorchGeo's
    datamodules apply their batch transforms: a quarter of the bytes through the workers'
    shared memory, pinned memory and the host-to-device copy, and no per-image normalisation
    in the workers (``benchmarks/data_pipeline.py``). The values are the same as normalising
    each image in the worker. A Trainer given this datamodule applies the hook; code that
    iterates the loaders itself calls ``on_after_batch_transfer`` on each batch (or sets
    ``normalise_on_device=False``).
    """

    def __init__(
        self,
        split: DataSplit,
        preprocessing: Preprocessing,
        batch_size: int = 32,
        num_workers: int | None = None,
        augment: bool = True,
        seed: int = 42,
        image_store: Any = None,
        train_transform: Any = None,
        eval_preprocessing: Preprocessing | None = None,
        test_transform: Any = None,
        normalise_on_device: bool = True,
    ) -> None:
        """``train_transform`` replaces the seed's augmentation; ``eval_preprocessing`` sets
        another size for validation and test (``--test-img-size``); ``test_transform`` replaces
        the test transform (multi-crop test-time augmentation needs the whole resized image).
        Transforms passed in are built with ``normalise=not normalise_on_device``; one that
        normalises anyway (random erasing must come after normalisation) still works: the
        hook leaves float batches alone."""
        super().__init__()
        self.split = split
        self.preprocessing = preprocessing
        self.batch_size = batch_size
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.augment = augment
        self.seed = seed
        # prepared.PreparedImages: read decoded, resized images instead of decoding the photos.
        self.image_store = image_store
        self.train_transform = train_transform
        self.eval_preprocessing = eval_preprocessing or preprocessing
        self.test_transform = test_transform
        # Applied to uint8 batches on the device; None when the workers normalise.
        self.normalise = (
            ToNormalisedFloat(preprocessing.mean, preprocessing.std)
            if normalise_on_device
            else None
        )

    def dataset(self, split: str) -> Dataset:
        pre = self.preprocessing if split == "train" else self.eval_preprocessing
        in_workers = self.normalise is None
        if split == "train":
            transform = self.train_transform
            if transform is None:
                transform = build_train_transform(pre, self.augment, normalise=in_workers)
        elif split == "test" and self.test_transform is not None:
            transform = self.test_transform
        else:
            transform = build_eval_transform(pre, normalise=in_workers)
        # The store holds images at one resize size; a split evaluated at another size
        # (--test-img-size) decodes the photos instead.
        if self.image_store is not None and self.image_store.size == pre.resize_size:
            return self.image_store.dataset(self.split.samples(split), transform)
        return ImageListDataset(self.split.samples(split), transform, draft_size=pre.resize_size)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        dataset = self.dataset(split)
        # Under DDP each rank evaluates its own shard, every image exactly once. (Training gets
        # Lightning's shuffling DistributedSampler, seeded by seed_everything.)
        sampler = None if shuffle else evaluation_sampler(dataset, self.trainer)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            sampler=sampler,
            generator=generator,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=keep_freed_memory,
        )

    def train_dataloader(self) -> DataLoader:
        if self.trainer is None or self.trainer.world_size == 1:
            # Resumable mid-epoch, and augmented per sample under its own seed (see sampling).
            from inat_finetune.sampling import ResumableLoader

            return ResumableLoader(
                self.dataset("train"),
                self.batch_size,
                self.seed,
                self.num_workers,
                pin_memory=torch.cuda.is_available(),
            )
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int = 0) -> Any:
        images, labels = batch
        if self.normalise is not None and images.dtype == torch.uint8:
            images = self.normalise(images)
        return images, labels
