"""Shared fixtures: generated image folders and the real photo sets in ../shared/datasets."""

from __future__ import annotations

import inat_finetune  # noqa: F401 - first: sets OpenMP's wait policy before torch loads

# isort: split
import os
import shutil
import struct
import tempfile
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATASETS = ROOT.parent / "shared" / "datasets"
HYMENOPTERA = SHARED_DATASETS / "hymenoptera"
FLOWERS = SHARED_DATASETS / "flowers"

# Keep torch to the machine's cores and W&B away from the network in every test.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def pytest_report_header(config) -> str:
    """The free space where the tests write, so a run that fills the disk says so up front."""
    folder = tempfile.gettempdir()
    return f"free disk in {folder}: {shutil.disk_usage(folder).free / 2**30:.1f} GiB"


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Image and feature caches go to a fresh folder, never the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("INAT_FINETUNE_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


class ModuleTempFactory:
    """``tmp_path_factory.mktemp`` for module-scoped fixtures: what they make goes when the module
    ends, unless a test failed meanwhile (then it stays to look at, as a failing test's
    ``tmp_path`` does). Their runs' checkpoints would otherwise pile up until the session ends."""

    def __init__(self, factory: pytest.TempPathFactory) -> None:
        self.factory = factory
        self.made: list[Path] = []

    def mktemp(self, basename: str) -> Path:
        path = self.factory.mktemp(basename)
        self.made.append(path)
        return path


@pytest.fixture(scope="module")
def module_tmp_factory(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ModuleTempFactory]:
    """The module's ``ModuleTempFactory``; its folders are removed at the module's end."""
    failed_before = request.session.testsfailed
    folders = ModuleTempFactory(tmp_path_factory)
    yield folders
    if request.session.testsfailed == failed_before:
        for path in folders.made:
            shutil.rmtree(path, ignore_errors=True)


# The smallest real training run: options most training tests start from (a dict to update).
TINY_TRAIN = dict(
    backbone="mobilenet_v2",
    strategy="freeze_last",
    img_size=32,
    batch_size=4,
    num_workers=0,
    epochs=1,
    precision="32-true",
)


def write_image(path: Path, seed: int, size: tuple[int, int] = (48, 40), mode: str = "RGB") -> Path:
    """A small random but decodable image; ``seed`` makes its content unique."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGB")
    if mode != "RGB":
        image = image.convert(mode)
    image.save(path)
    return path


def write_tall_png(path: Path, width: int = 4, height: int = 20_000_000) -> Path:
    """A grey PNG of ``width`` x ``height`` px written row block by row block, never held whole:
    4 x 20,000,000 px is 146 KB on disk, and ~80 GB once its short side is resized to 73 px."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    row = b"\x00" + b"\x80" * width  # filter byte "none", then mid-grey pixels
    per_block = max(1, (1 << 20) // len(row))
    block = row * per_block
    deflate = zlib.compressobj(9)
    parts = []
    for start in range(0, height, per_block):
        rows = min(per_block, height - start)
        parts.append(deflate.compress(block if rows == per_block else row * rows))
    parts.append(deflate.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", b"".join(parts))
        + chunk(b"IEND", b"")
    )
    return path


def make_class_folders(
    root: Path, counts: dict[str, int], seed: int = 0, ext: str = ".jpg"
) -> dict[str, list[Path]]:
    """``root/<class>/<class>_<i><ext>`` with ``counts[class]`` images each."""
    made: dict[str, list[Path]] = {}
    for c_index, (name, count) in enumerate(sorted(counts.items())):
        made[name] = [
            write_image(root / name / f"{name}_{i}{ext}", seed * 100_000 + c_index * 1000 + i)
            for i in range(count)
        ]
    return made


@pytest.fixture
def image_folder(tmp_path: Path):
    """Factory for generated class-folder datasets under tmp_path."""

    def make(counts: dict[str, int], sub: str = "data", seed: int = 0) -> Path:
        root = tmp_path / sub
        make_class_folders(root, counts, seed)
        return root

    return make


@pytest.fixture
def nature_like(tmp_path: Path) -> Path:
    """A miniature nature_12K tree: inaturalist_12K/{train,val}/<Class>/ with .DS_Store junk."""
    base = tmp_path / "nature_12K" / "inaturalist_12K"
    classes = ["Amphibia", "Aves", "Fungi"]
    make_class_folders(base / "train", {c: 6 for c in classes}, seed=1)
    make_class_folders(base / "val", {c: 2 for c in classes}, seed=2)
    for junk in (
        base / ".DS_Store",
        base / "train" / ".DS_Store",
        base / "val" / "Aves" / ".DS_Store",
    ):
        junk.write_bytes(b"\x00\x00\x00\x01Bud1")
    return tmp_path / "nature_12K"


def require_shared(path: Path) -> Path:
    if not path.is_dir():
        pytest.fail(f"{path} is missing: the shared photo sets must sit next to the repository")
    return path


@pytest.fixture
def named_pipe():
    """Factory for named pipes (``os.mkfifo``). A watchdog thread notices any reader that opens
    one (a read-open blocks until a writer comes), records the pipe in ``make.opened`` and frees
    the reader, so a regression fails its test instead of hanging the suite."""
    made: list[Path] = []
    stop = threading.Event()

    def make(path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(path)
        made.append(path)
        return path

    make.opened = []

    def watch() -> None:
        while not stop.wait(0.05):
            for path in list(made):
                try:  # succeeds only while a reader has the pipe open
                    os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
                except OSError:
                    continue
                make.opened.append(path)

    watchdog = threading.Thread(target=watch, daemon=True)
    watchdog.start()
    yield make
    stop.set()
    watchdog.join()
