"""Caches that prove their contents: damaged, truncated or garbled stores are recomputed, never
trusted, and a reader keeps its data file across a compaction by someone else."""

from __future__ import annotations

import csv
import logging
import os
import pickle
import re
import shutil

import numpy as np
import pytest
from conftest import make_class_folders, write_image
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from typer.testing import CliRunner

from inat_finetune.cli.main import app
from inat_finetune.errors import UserError
from inat_finetune.speed.caching import INDEX_NAME, ArrayStore
from inat_finetune.training.config import load_config
from inat_finetune.training.run import train

DAMAGES = ("zeros", "random", "truncated")


def damage(data_file, how: str) -> None:
    """Zeros or random bytes over the middle third of a data file, or its last third cut off."""
    size = data_file.stat().st_size
    start, length = size // 3, size // 3
    if how == "truncated":
        with open(data_file, "r+b") as handle:
            handle.truncate(size - length)
        return
    noise = np.random.default_rng(7).integers(0, 256, length, dtype=np.uint8).tobytes()
    with open(data_file, "r+b") as handle:
        handle.seek(start)
        handle.write(bytes(length) if how == "zeros" else noise)


def _files(tmp_path, n):
    return [write_image(tmp_path / f"f{i}.png", seed=i, size=(20 + i, 16)) for i in range(n)]


def _pixels(todo):
    for path in todo:
        yield path, np.asarray(Image.open(path))


def _store(tmp_path):
    return ArrayStore(tmp_path / "store", "uint8", {"kind": "test"})


# ---------------------------------------------------------------------------------------------
# The store itself


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_entries_are_computed_again_with_a_warning(tmp_path, caplog, how):
    files = _files(tmp_path, 6)
    store = _store(tmp_path)
    store.update(files, _pixels)
    damage(store.data_path, how)
    again = _store(tmp_path)  # the next run: every source file is unchanged
    with caplog.at_level(logging.WARNING, logger="inat_finetune.speed.caching"):
        computed = again.update(files, _pixels)
    arrays = _store(tmp_path).arrays(files)
    for path in files:
        assert np.array_equal(arrays[path], np.asarray(Image.open(path)))
    assert computed == len(again.damaged) > 0  # only the damaged ones were computed again
    warning = next(r.getMessage() for r in caplog.records if "damaged" in r.getMessage())
    assert warning.startswith(f"{again.data_path}: {computed} stored array(s) damaged")
    assert not _store(tmp_path).stale(files)


def test_a_truncated_store_is_never_read_as_an_array(tmp_path):
    files = _files(tmp_path, 4)
    store = _store(tmp_path)
    store.update(files, _pixels)
    arrays = store.arrays(files)  # opened before the damage: reads are checked too
    damage(store.data_path, "truncated")
    fresh = _store(tmp_path).arrays(files)
    for reader in (arrays, fresh):
        with pytest.raises(UserError, match=str(store.data_path)) as caught:
            for path in files:
                reader[path]
        assert "run again" in str(caught.value)


def test_bytes_changed_under_a_reader_stop_it_with_the_cache_file_named(tmp_path):
    files = _files(tmp_path, 3)
    store = _store(tmp_path)
    store.update(files, _pixels)
    arrays = store.arrays(files)
    offset = store.entries[str(files[1])][3]
    with open(store.data_path, "r+b") as handle:
        handle.seek(offset + 5)
        handle.write(b"\xff\x00\xff")
    assert np.array_equal(arrays[files[0]], np.asarray(Image.open(files[0])))
    with pytest.raises(UserError, match=f"{store.data_path}: the stored array of {files[1]}"):
        arrays[files[1]]


@pytest.mark.parametrize("garbage", [b"", b"\x00" * 64, b"\xff\xfe{not json", b'{"version": 2}'])
def test_an_unreadable_index_means_an_empty_store_in_a_new_file(tmp_path, garbage):
    files = _files(tmp_path, 3)
    store = _store(tmp_path)
    store.update(files, _pixels)
    (store.directory / INDEX_NAME).write_bytes(garbage)
    again = _store(tmp_path)
    assert again.stale(files) == files
    assert again.update(files, _pixels) == 3
    # Rebuilt into a file of its own; the old one, which nobody reads, is gone.
    assert [p.name for p in store.directory.glob("data-*.bin")] == ["data-1.bin"]
    arrays = _store(tmp_path).arrays(files)
    assert all(np.array_equal(arrays[p], np.asarray(Image.open(p))) for p in files)


def test_malformed_entries_of_an_index_are_computed_again(tmp_path):
    import json

    files = _files(tmp_path, 3)
    store = _store(tmp_path)
    store.update(files, _pixels)
    index = json.loads((store.directory / INDEX_NAME).read_text())
    index["entries"][str(files[0])] = "garbage"
    index["entries"][str(files[1])][3] = -5  # a negative offset
    (store.directory / INDEX_NAME).write_text(json.dumps(index))
    assert _store(tmp_path).stale(files) == files[:2]
    index["data"] = "../store/data-0.bin"  # the same file, but named outside the folder
    (store.directory / INDEX_NAME).write_text(json.dumps(index))
    assert _store(tmp_path).stale(files) == files


# ---------------------------------------------------------------------------------------------
# Readers and compaction


class _Reading(Dataset):
    def __init__(self, arrays, paths):
        self.arrays, self.paths = arrays, paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        return self.arrays[self.paths[index]]


def _compact_away(tmp_path, files):
    """Another writer rewrites one file until the data file is compacted into a new one."""
    other = _store(tmp_path)
    first = other.data_name
    for seed in range(300, 306):
        write_image(files[0], seed=seed, size=(300, 300))
        other.update(files, _pixels)
    assert other.data_name != first
    return other


def test_a_reader_keeps_its_data_file_across_a_compaction(tmp_path):
    files = _files(tmp_path, 4)
    store = _store(tmp_path)
    store.update(files, _pixels)
    expected = {p: np.asarray(Image.open(p)) for p in files[1:]}
    arrays = store.arrays(files[1:])  # a run opened the cache; its loader workers start later
    old = store.data_path
    _compact_away(tmp_path, files)
    copy = pickle.loads(pickle.dumps(arrays))  # a spawned worker: opens the file by name
    loader = DataLoader(_Reading(arrays, files[1:]), batch_size=None, num_workers=1)
    for reader in (arrays, copy):
        for path, want in expected.items():
            assert np.array_equal(reader[path], want)
    assert [np.asarray(a).tolist() for a in loader] == [v.tolist() for v in expected.values()]
    # Once no reader holds it, the next run that opens the store deletes the old file.
    del arrays, copy, loader, reader
    import gc

    gc.collect()
    assert old.exists()
    assert _store(tmp_path).update(files, _pixels) == 0
    assert not old.exists()


def test_a_reader_that_read_the_index_before_a_compaction_opens_the_new_file(tmp_path):
    files = _files(tmp_path, 4)
    _store(tmp_path).update(files, _pixels)
    reader = _store(tmp_path)  # index read, data file not opened yet
    _compact_away(tmp_path, files)
    arrays = reader.arrays(files[1:])
    assert all(np.array_equal(arrays[p], np.asarray(Image.open(p))) for p in files[1:])


# ---------------------------------------------------------------------------------------------
# Through training and prepare: a damaged cache gives the clean run's results exactly

TINY = dict(
    backbone="mobilenet_v2",
    img_size=32,
    batch_size=8,
    num_workers=0,
    epochs=1,
    precision="32-true",
    augment=False,
    strategy="freeze_last",
)


def _predictions(run_dir):
    return list(csv.DictReader((run_dir / "test_predictions.csv").open()))


@pytest.fixture(scope="module", params=["images", "features"])
def clean(request, module_tmp_factory):
    """A clean run that filled one cache: the image cache, or the feature cache."""
    root = module_tmp_factory.mktemp(request.param)
    make_class_folders(root / "data", {"ant": 6, "bee": 6})
    settings = dict(
        data=str(root / "data"),
        output=str(root / "runs"),
        cache_dir=str(root / "c"),
        feature_cache=request.param == "features",
        **TINY,
    )
    result = train(load_config(None, **settings), progress=False, report=False)
    summary = result.results["speed_paths"]
    key = "image_cache" if request.param == "images" else "feature_cache"
    assert summary[key] == f"on (0 reused, 12 {'prepared' if key == 'image_cache' else 'computed'})"
    return request.param, settings, result


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_cache_gives_the_clean_runs_results(clean, how, caplog, tmp_path):
    kind, settings, first = clean
    cache = tmp_path / "c"  # a copy of the clean run's cache, damaged
    shutil.copytree(settings["cache_dir"], cache)
    settings = {**settings, "cache_dir": str(cache)}
    (data_file,) = (cache / kind).glob("*/data-*.bin")
    damage(data_file, how)
    with caplog.at_level(logging.WARNING, logger="inat_finetune.speed.caching"):
        again = train(load_config(None, **settings), progress=False, report=False)
    for name in ("test_acc", "test_loss", "best_val_acc", "confusion_matrix"):
        assert again.results[name] == first.results[name], name
    assert _predictions(again.run_dir) == _predictions(first.run_dir)
    key = "image_cache" if kind == "images" else "feature_cache"
    summary = again.results["speed_paths"][key]
    reused, computed, damaged = map(int, re.findall(r"\d+", summary))
    assert reused + computed == 12 and computed == damaged > 0, summary
    warning = next(r.getMessage() for r in caplog.records if "damaged" in r.getMessage())
    assert warning.startswith(f"{data_file}: ")


def test_prepare_recomputes_damaged_images_and_says_so(tmp_path):
    make_class_folders(tmp_path / "data", {"ant": 4, "bee": 4})
    args = ["prepare", "--data", str(tmp_path / "data"), "--size", "32"]
    args += ["--cache-dir", str(tmp_path / "c")]
    runner = CliRunner()
    assert runner.invoke(app, args).exit_code == 0
    (data_file,) = (tmp_path / "c" / "images").glob("*/data-*.bin")
    damage(data_file, "random")
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    line = " ".join(result.output.split())
    assert "8 images: 4 prepared (4 of them damaged in the cache), 4 already there" in line, line
    assert "8 images: 0 prepared, 8 already there" in " ".join(
        runner.invoke(app, args).output.split()
    )


def test_a_compaction_by_another_process_during_training_does_not_stop_it(tmp_path, monkeypatch):
    """Another process touches every photo and prepares them again until the cache is
    compacted into a new file, after this run opened it and before its loader workers start."""
    from inat_finetune.speed import prepared
    from inat_finetune.training import run as training

    make_class_folders(tmp_path / "data", {"ant": 6, "bee": 6})
    settings = dict(
        data=str(tmp_path / "data"),
        output=str(tmp_path / "runs"),
        cache_dir=str(tmp_path / "c"),
        feature_cache=False,
        **{**TINY, "num_workers": 1},
    )
    opened = []

    def then_compacted(split, preprocessing, *args, **kwargs):
        images, summary = prepared.prepared_images_for(split, preprocessing, *args, **kwargs)
        opened.append(images.arrays.data_path)
        paths = prepared.split_paths(split)
        other = prepared.image_store(split.root, preprocessing.resize_size, cache_dir=args[1])
        for stamp in range(1, 100):
            for path in paths:
                os.utime(path, ns=(stamp * 10**9, stamp * 10**9))
            prepared.build(other, paths)
            if other.data_path != opened[0]:
                return images, summary
        raise AssertionError("never compacted")

    monkeypatch.setattr(training, "prepared_images_for", then_compacted)
    result = train(load_config(None, **settings), progress=False, report=False)
    assert opened and result.results["speed_paths"]["workers"] == 1
    assert len(_predictions(result.run_dir)) == result.results["num_images"]["test"] > 0
