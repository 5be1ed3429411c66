"""The array store and the prepared-image cache: exact images, reuse, invalidation, the CLI."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import make_class_folders, write_image
from PIL import Image
from typer.testing import CliRunner

from inat_finetune.cli.main import app
from inat_finetune.data.datamodule import FineTuneDataModule
from inat_finetune.data.folders import make_split
from inat_finetune.models.backbones import IMAGENET_PREPROCESSING
from inat_finetune.speed.caching import ArrayStore, cache_root
from inat_finetune.speed.prepared import image_store, prepare, prepared_images_for


def _files(tmp_path, n):
    return [write_image(tmp_path / f"f{i}.png", seed=i, size=(8 + i, 6)) for i in range(n)]


def test_store_computes_once_and_reads_back_exactly(tmp_path):
    files = _files(tmp_path, 4)
    calls = []

    def compute(todo):
        calls.append(list(todo))
        for path in todo:
            yield path, np.asarray(Image.open(path)).astype(np.float32)

    store = ArrayStore(tmp_path / "store", "float32", {"kind": "test"})
    assert store.update(files, compute) == 4
    again = ArrayStore(tmp_path / "store", "float32", {"kind": "test"})  # a later run
    assert again.update(files, compute) == 0 and len(calls) == 1
    arrays = again.arrays(files)
    for path in files:
        assert np.array_equal(arrays[path], np.asarray(Image.open(path)).astype(np.float32))
    # Another description of how arrays are computed starts empty.
    assert ArrayStore(tmp_path / "store", "float32", {"kind": "other"}).stale(files) == files


def test_store_recomputes_changed_files_and_compacts(tmp_path):
    files = _files(tmp_path, 3)
    store = ArrayStore(tmp_path / "store", "uint8", {"kind": "test"})

    def compute(todo):
        for path in todo:
            yield path, np.asarray(Image.open(path))

    store.update(files, compute)
    write_image(files[1], seed=99, size=(30, 20))  # replaced: new size, new content
    os.utime(files[2], ns=(0, 0))  # only touched: its time changed
    assert store.stale(files) == [files[1], files[2]]
    assert store.update(files, compute) == 2
    assert np.array_equal(store.arrays(files)[files[1]], np.asarray(Image.open(files[1])))
    # Keep rewriting one file: dead bytes pile up until the data file is compacted.
    for seed in range(200, 206):
        write_image(files[0], seed=seed, size=(300, 300))
        store.update(files, compute)
    assert store.data_name != "data-0.bin"
    assert len(list((tmp_path / "store").glob("data-*.bin"))) == 1
    for path in files:
        assert np.array_equal(store.arrays([path])[path], np.asarray(Image.open(path)))


def test_store_keeps_what_was_computed_before_an_error(tmp_path):
    files = _files(tmp_path, 3)

    def fails_on_the_last(todo):
        for path in todo[:-1]:
            yield path, np.asarray(Image.open(path))
        raise KeyboardInterrupt

    store = ArrayStore(tmp_path / "store", "uint8", {"kind": "test"})
    with pytest.raises(KeyboardInterrupt):
        store.update(files, fails_on_the_last)
    again = ArrayStore(tmp_path / "store", "uint8", {"kind": "test"})  # the next run
    assert again.stale(files) == files[-1:]
    assert np.array_equal(again.arrays(files[:1])[files[0]], np.asarray(Image.open(files[0])))


def test_stores_filled_together_take_only_their_stale_paths(tmp_path):
    files = _files(tmp_path, 3)
    first = ArrayStore(tmp_path / "a", "float32", {"kind": "a"})
    second = ArrayStore(tmp_path / "b", "float32", {"kind": "b"})
    second.update(files[:2], lambda todo: ((p, np.zeros(2)) for p in todo))
    with first.filling(files) as (todo_a, put_a), second.filling(files) as (todo_b, put_b):
        assert todo_a == files and todo_b == files[2:]
        for path in todo_a:
            put_a(path, np.full(2, 1.0))
            if path in todo_b:
                put_b(path, np.full(2, 2.0))
    assert not first.stale(files) and not second.stale(files)
    assert second.arrays(files)[files[2]].tolist() == [2.0, 2.0]
    assert second.arrays(files)[files[0]].tolist() == [0.0, 0.0]


def test_cache_folder_order_of_precedence(monkeypatch, tmp_path):
    """--cache-dir, else $INAT_FINETUNE_CACHE, else $XDG_CACHE_HOME/inat-finetune, else
    ~/.cache/inat-finetune; ``~`` expanded in each."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("INAT_FINETUNE_CACHE", "~/env")
    assert cache_root(tmp_path / "given") == tmp_path / "given"  # the option beats both
    assert cache_root("~/given") == tmp_path / "home" / "given"
    assert cache_root(None) == tmp_path / "home" / "env"  # the variable beats XDG
    # The stores are made under the folder cache_root chose.
    store = image_store(tmp_path / "data", 64)
    assert store.directory.parent == tmp_path / "home" / "env" / "images"
    monkeypatch.setenv("INAT_FINETUNE_CACHE", "")  # set but empty: as if unset
    assert cache_root(None) == tmp_path / "xdg" / "inat-finetune"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root(None) == tmp_path / "home" / ".cache" / "inat-finetune"


@pytest.fixture
def photos(tmp_path):
    """Larger-than-input photos so the cache really resizes: JPEG, PNG with alpha, EXIF-rotated."""
    root = tmp_path / "data"
    for c_index, name in enumerate(("ants", "bees")):
        for i in range(5):
            write_image(root / name / f"{i}.jpg", seed=c_index * 10 + i, size=(120 + 7 * i, 90))
    rgba = Image.new("RGBA", (100, 140), (200, 30, 30, 128))
    rgba.save(root / "ants" / "alpha.png")
    rotated = Image.new("RGB", (160, 100), (10, 200, 10))
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees
    rotated.save(root / "bees" / "rotated.jpg", exif=exif)
    return root


def test_images_from_the_cache_equal_the_direct_path(photos, tmp_path):
    split = make_split(photos, seed=0)
    pre = IMAGENET_PREPROCESSING.at_size(64)  # resize to 73 px, crop 64
    store, summary = prepared_images_for(split, pre, cache_dir=str(tmp_path / "c"))
    assert summary == "on (0 reused, 12 prepared)"
    direct = FineTuneDataModule(split, pre, augment=False)
    cached = FineTuneDataModule(split, pre, augment=False, image_store=store)
    for name in ("train", "val", "test"):
        a, b = direct.dataset(name), cached.dataset(name)
        assert len(a) == len(b) > 0
        for i in range(len(a)):
            (x, y), (u, v) = a[i], b[i]
            assert y == v and torch.equal(x, u), (name, i)
    # Stored small: the shorter side is the resize size.
    arrays = store.arrays
    assert all(min(arrays[p].shape[1:]) == pre.resize_size for p in arrays.entries)
    # Augmented training images come out in the same shape, handed over as uint8.
    augmented = FineTuneDataModule(split, pre, augment=True, image_store=store)
    image, _ = augmented.dataset("train")[0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.uint8
    image, _ = augmented.on_after_batch_transfer((image[None], torch.tensor([0])))
    assert image.dtype == torch.float32 and image.min() < 0 < image.max()


def test_changed_source_image_is_prepared_again(photos, tmp_path):
    split = make_split(photos, seed=0)
    pre = IMAGENET_PREPROCESSING.at_size(64)
    cache = str(tmp_path / "c")
    prepared_images_for(split, pre, cache_dir=cache)
    changed = photos / "bees" / "2.jpg"
    write_image(changed, seed=777, size=(150, 100))
    store, summary = prepared_images_for(split, pre, cache_dir=cache)
    assert summary == "on (11 reused, 1 prepared)"
    assert store.arrays[changed].shape == (3, 73, 109)  # the new image, not the old 134x90 one
    _, summary = prepared_images_for(split, pre, enabled=False, cache_dir=cache)
    assert summary == "off"


def test_unwritable_cache_falls_back_to_decoding(photos, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    split = make_split(photos, seed=0)
    store, summary = prepared_images_for(split, IMAGENET_PREPROCESSING, cache_dir=str(blocker))
    assert store is None and summary.startswith("off (")


def test_prepare_command(photos, tmp_path):
    cache = tmp_path / "c"
    runner = CliRunner()
    result = runner.invoke(
        app, ["prepare", "--data", str(photos), "--size", "64", "--cache-dir", str(cache)]
    )
    assert result.exit_code == 0, result.output
    assert "12 images" in result.output and "12 prepared" in result.output
    again = prepare(photos, size=64, cache_dir=str(cache), progress=False)
    assert (again.images, again.prepared) == (12, 0)
    assert image_store(photos, 64, cache_dir=str(cache)).directory == again.directory
    bad = runner.invoke(app, ["prepare", "--data", str(photos), "--size", "8"])
    assert bad.exit_code == 2 and "--size 8" in bad.output


def test_training_reads_the_cache_and_compiles_on_request(tmp_path, monkeypatch):
    from inat_finetune.training.config import load_config
    from inat_finetune.training.run import train

    compiled = []  # torch.compile itself takes minutes on 2 cores: record the call instead
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compiled.append(self))

    make_class_folders(tmp_path / "d", {"a": 6, "b": 6})
    cfg = load_config(
        None,
        data=str(tmp_path / "d"),
        output=str(tmp_path / "runs"),
        backbone="mobilenet_v2",
        weights="none",
        img_size=32,
        epochs=1,
        batch_size=4,
        num_workers=0,
        strategy="freeze_k_percent",
        precision="32-true",
        cache_dir=str(tmp_path / "c"),
        compile=True,
    )
    result = train(cfg, progress=False, report=False)
    assert result.results["speed_paths"] == {
        "image_cache": "on (0 reused, 12 prepared)",
        "feature_cache": "off (augmentation on; --no-augment lets a frozen backbone's "
        "features be cached)",
        "compile": True,
        "workers": 0,
        "depthwise_grad": "native",  # torch.compile makes its own backward
        "allocator": "freed memory reused (glibc)",
        "augmentation": "on the device, per batch (crops "
        + ("on the device)" if torch.cuda.is_available() else "in the loader)"),
    }
    assert [type(m).__name__ for m in compiled] == ["MobileNetV2"]
