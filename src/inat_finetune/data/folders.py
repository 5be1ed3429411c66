"""Find the images and split them: dataset layouts, the scan, the stratified split.

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

How one file is judged (memory bounds, pipes, decoding) is ``data.images``.
"""


from __future__ import annotations

from inat_finetune.data.images import check_image


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



log = logging.getLogger(__name__)


IGNORED_DIR_NAMES = frozenset({"__MACOSX"})


NATURE12K_DIR = "inaturalist_12K"


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
    # check_image reports over-size images itself; the filter is set once, here, not per thread.
    with (
        ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool,
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        checks = pool.map(lambda item: check_image(item[1]), candidates)
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

