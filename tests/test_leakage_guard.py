"""The leakage guard as train, compare and sweep use it.

A test set on disk holding a copy of a training image is refused before any run directory is
made; a test set carved out of one folder loses its copies, and the runs count them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import make_class_folders
from typer.testing import CliRunner

from inat_finetune.cli.main import app
from inat_finetune.data.folders import make_split

TINY_ARGS = [
    "--backbone", "mobilenet_v2", "--img-size", "32", "--batch-size", "4",
    "--num-workers", "0", "--epochs", "1", "--precision", "32-true", "--seed", "5",
]  # fmt: skip
TINY = {
    "backbone": "mobilenet_v2",
    "strategy": "freeze_last",
    "img_size": 32,
    "batch_size": 4,
    "num_workers": 0,
    "epochs": 1,
    "precision": "32-true",
    "checkpoint_minutes": 0,
    "seed": 5,
}


@pytest.fixture
def folder_test_set_with_a_copy(tmp_path) -> Path:
    """train/ val/ test/, and one test image copied into train/a under another name."""
    data = tmp_path / "data"
    make_class_folders(data / "train", {"a": 4, "b": 4}, seed=1)
    make_class_folders(data / "val", {"a": 2, "b": 2}, seed=2)
    make_class_folders(data / "test", {"a": 2, "b": 2}, seed=3)
    shutil.copyfile(data / "test" / "a" / "a_0.jpg", data / "train" / "a" / "renamed.jpg")
    return data


def _sweep_spec(path: Path, data: Path, output: Path, trials_search: dict | None = None) -> Path:
    base = {**TINY, "data": str(data), "output": str(output)}
    spec = {"base": base, "search": trials_search or {"lr": {"choices": [0.001]}}}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.mark.parametrize("command", ["train", "compare", "sweep"])
def test_a_folder_test_set_with_copies_of_training_images_is_refused(
    folder_test_set_with_a_copy, tmp_path, command
):
    data, out = folder_test_set_with_a_copy, tmp_path / "out"
    args = {
        "train": ["train", "--data", str(data), "--output", str(out), *TINY_ARGS],
        "compare": ["compare", "--data", str(data), "--output", str(out),
                    "--strategies", "freeze_last", *TINY_ARGS],
        "sweep": ["sweep", "--config", str(_sweep_spec(tmp_path / "s.yaml", data, out)),
                  "--trials", "1", "--no-trial-reports"],
    }[command]  # fmt: skip
    result = CliRunner().invoke(app, args)
    text = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "1 test images are identical to training/validation images" in text
    assert "test/a/a_0.jpg == train/a/renamed.jpg" in text
    assert not list(out.rglob("results.json"))  # nothing trained


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def carved_with_copies(tmp_path) -> tuple[Path, int, int]:
    """One folder per class, half of its images there twice: the carved test set gets copies.

    Returns the data root, the test images a plain split holds, and how many of them have a
    byte-identical twin in train/val (counted here by hashing, not by the guard).
    """
    data = tmp_path / "data"
    made = make_class_folders(data, {"a": 6, "b": 6}, seed=4)
    for files in made.values():
        for f in files[:3]:
            shutil.copyfile(f, f.with_name(f"copy_of_{f.name}"))
    split = make_split(data, seed=5)
    root = Path(split.root)
    seen = {
        _digest(root / f) for part in (split.train, split.val) for fs in part.values() for f in fs
    }
    test = [root / f for fs in split.test.values() for f in fs]
    leaked = sum(_digest(p) in seen for p in test)
    assert leaked >= 1  # the fixture must produce copies across the split
    return data, len(test), leaked


def _check_run_dropped(run: Path, total_test: int, leaked: int) -> None:
    results = json.loads((run / "results.json").read_text())
    dataset = json.loads((run / "dataset.json").read_text())
    assert results["num_images"]["test"] == total_test - leaked
    assert results["skipped_files"] == leaked
    reasons = [s["reason"] for s in dataset["skipped"]]
    assert sum(r.startswith("duplicate of a training image") for r in reasons) == leaked


@pytest.mark.parametrize("command", ["train", "compare", "sweep"])
def test_copies_in_a_carved_test_set_are_dropped_and_counted(carved_with_copies, tmp_path, command):
    data, total_test, leaked = carved_with_copies
    out = tmp_path / "out"
    args = {
        "train": ["train", "--data", str(data), "--output", str(out), "--strategy", "freeze_last",
                  *TINY_ARGS],
        "compare": ["compare", "--data", str(data), "--output", str(out),
                    "--strategies", "freeze_last", *TINY_ARGS],
        "sweep": ["sweep", "--config", str(_sweep_spec(tmp_path / "s.yaml", data, out)),
                  "--trials", "1", "--no-trial-reports"],
    }[command]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    runs = [p.parent for p in out.rglob("results.json")]
    assert runs
    for run in runs:
        _check_run_dropped(run, total_test, leaked)


def test_a_carved_test_set_made_only_of_copies_is_refused(tmp_path):
    """Two images a class, five copies each: every test image has a twin in train/val, and
    dropping them empties the test set; refused, not a crash (it was an IndexError)."""
    data = tmp_path / "data"
    for files in make_class_folders(data, {"a": 2, "b": 2}, seed=6).values():
        for f in files:
            for i in range(4):
                shutil.copyfile(f, f.with_name(f"copy{i}_of_{f.name}"))
    out = tmp_path / "out"
    args = ["train", "--data", str(data), "--output", str(out), "--strategy", "freeze_last",
            *TINY_ARGS]  # fmt: skip
    result = CliRunner().invoke(app, args)
    text = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "every image of the carved test set is a copy of a training or validation image" in text
    assert not out.exists()
