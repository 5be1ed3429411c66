"""Every failure is one line with exit status 2, naming the file or option, and loses nothing.

Out of disk (a real full tmpfs, and writes made to fail half-way), numbers out of range, output
options naming a folder (refused before the work), a malicious checkpoint (refused as unsafe,
nothing runs), and a class with no test images (n/a, not 0%).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import TINY_TRAIN, make_class_folders, write_image
from typer.testing import CliRunner

from inat_finetune import runfiles
from inat_finetune.cli.main import app
from inat_finetune.errors import UserError
from inat_finetune.models.checkpoints import read_checkpoint
from inat_finetune.runfiles import write_json_atomic
from inat_finetune.training.checkpointing import RunCSVLogger
from inat_finetune.training.config import load_config
from inat_finetune.training.run import train

TINY = {**TINY_TRAIN, "checkpoint_minutes": 0}
TINY_ARGS = [
    "--backbone", "mobilenet_v2", "--strategy", "freeze_last", "--img-size", "32",
    "--batch-size", "4", "--num-workers", "0", "--epochs", "1", "--precision", "32-true",
    "--checkpoint-minutes", "0",
]  # fmt: skip


def _text(result) -> str:
    return " ".join(result.output.split())


def _one_line_error(result) -> str:
    """The error line of a CLI result, which must be the only error and be one line."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "unexpected" not in result.output
    return _text(result)


# ---------------------------------------------------------------------------------------------
# Out of disk


@pytest.fixture
def small_disk(tmp_path):
    """A real 24 MB tmpfs: room for a tiny run, until it is filled on purpose."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(disk: Path, leave: int = 0) -> None:
    """Fill ``disk`` until the system refuses more, then free ``leave`` bytes again."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as handle:  # unbuffered: nothing left to flush
        block = b"\xff" * (1 << 16)
        try:
            while True:
                handle.write(block)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    if leave:
        os.truncate(filler, max(0, filler.stat().st_size - leave))


def _snapshot(run: Path) -> dict[str, bytes]:
    return {
        p.relative_to(run).as_posix(): p.read_bytes()
        for p in sorted(run.rglob("*"))
        if p.is_file() and p.suffix in (".ckpt", ".json")
    }


def test_full_disk_while_saving_a_checkpoint_is_one_line_and_keeps_the_previous(
    tmp_path, small_disk
):
    """The run lives on a real tmpfs; the disk fills up; resuming it must write a checkpoint:
    exit 2, one line naming the checkpoint and the fix, and the previous checkpoints and
    results.json byte-identical, no temporary file left."""
    make_class_folders(tmp_path / "data", {"a": 6, "b": 6})
    runner = CliRunner()
    args = ["train", "--data", str(tmp_path / "data"), "--output", str(small_disk), *TINY_ARGS]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    (run,) = [p for p in small_disk.iterdir() if p.is_dir()]
    before = _snapshot(run)
    assert {"checkpoints/best.ckpt", "checkpoints/last.ckpt", "results.json"} <= set(before)
    # A few hundred kB stay free: the small run files fit, a checkpoint (megabytes) does not.
    _fill(small_disk, leave=300_000)
    resumed = runner.invoke(app, ["train", "--resume", str(run), "--epochs", "3"])
    line = _one_line_error(resumed)
    assert "error: " in line and ".ckpt: could not write the checkpoint (No space left" in line
    assert "the previous one is intact; free some space or choose another --output" in line
    assert _snapshot(run) == before
    assert not list(run.rglob("*.tmp"))
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["epoch"] == 0


def test_full_disk_for_a_run_file_names_it(tmp_path, small_disk):
    """results.json on a full disk: a WriteFailedError naming it; the old one intact."""
    target = small_disk / "results.json"
    write_json_atomic(target, {"old": True})
    _fill(small_disk)
    with pytest.raises(UserError) as info:
        write_json_atomic(target, {"new": "x" * 100_000})
    message = str(info.value)
    assert message.startswith(f"{target}: could not write it (No space left on device)")
    assert "the previous version is intact; free some space or choose another --output" in message
    assert json.loads(target.read_text()) == {"old": True}
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "results.json"]


class _HalfThenFull:
    """A file handle that takes half of the bytes written to it, then fails as a full disk."""

    def __init__(self, handle):
        self._handle = handle

    def write(self, data) -> int:
        self._handle.write(bytes(data)[: max(1, len(data) // 2)])
        self._handle.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()


def _write_results(run: Path) -> None:
    write_json_atomic(
        run / "results.json",
        {"test_acc": 0.25, "per_class_test_acc": {"a": 0.5, "b": 0.0}},
    )


def _write_metrics(run: Path) -> None:
    logger = RunCSVLogger(save_dir=run, name="", version="")
    logger.log_metrics({"val/acc": 0.75}, step=3)
    logger.save()


def _write_figure(run: Path) -> None:
    from inat_finetune.reporting.plots import plot_per_class_accuracy

    plot_per_class_accuracy(run)


@pytest.mark.parametrize(
    ("name", "write"),
    [
        ("results.json", _write_results),
        ("metrics.csv", _write_metrics),
        ("figures/per_class_accuracy.png", _write_figure),
    ],
)
def test_run_file_write_failing_half_way_keeps_the_old_file(tmp_path, monkeypatch, name, write):
    """Each run file is written once, then rewritten with a handle that fails after taking
    half of the bytes: one WriteFailedError naming the file; the old bytes stay, no temp file."""
    run = tmp_path / "run"
    write_json_atomic(
        run / "results.json",
        {
            "test_acc": 0.5,
            "per_class_test_acc": {"a": 1.0, "b": 0.0},
            "confusion_matrix": [[2, 0], [2, 0]],
            "class_names": ["a", "b"],
        },
    )
    write(run)
    target = run / name
    old = target.read_bytes()
    real_fdopen = os.fdopen
    monkeypatch.setattr(
        runfiles.os, "fdopen", lambda fd, *a, **k: _HalfThenFull(real_fdopen(fd, *a, **k))
    )
    with pytest.raises(UserError, match=rf"{name}: could not write it \(No space left"):
        write(run)
    monkeypatch.undo()
    assert target.read_bytes() == old
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------------------------
# Numbers out of range


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seed", "-1"], "seed=-1: Input should be greater than or equal to 0"),
        (["--seed", str(2**32)], "seed=4294967296: Input should be less than or equal to"),
        (["--checkpoint-minutes", "1e300"], "checkpoint_minutes=1e+300: Input should be less"),
        (["--checkpoint-minutes", "nan"], "checkpoint_minutes=nan: Input should be a finite"),
        (["--lr", "1e300"], "lr=1e+300: Input should be less than or equal to 100"),
        (["--weight-decay", "1e300"], "weight_decay=1e+300: Input should be less than"),
        (["--img-size", "1000000000"], "img_size=1000000000: Input should be less than"),
        (["--num-workers", "1000000000"], "num_workers=1000000000: Input should be less"),
    ],
    ids=["seed-negative", "seed-2**32", "minutes-1e300", "minutes-nan", "lr-1e300", "wd-1e300",
         "img-size-1e9", "workers-1e9"],
)  # fmt: skip
def test_numbers_out_of_range_are_one_line_errors_naming_the_option(tmp_path, args, message):
    make_class_folders(tmp_path / "data", {"a": 4, "b": 4})
    base = ["train", "--data", str(tmp_path / "data"), "--output", str(tmp_path / "runs")]
    result = CliRunner().invoke(app, [*base, *TINY_ARGS, *args])
    assert message in _one_line_error(result)
    assert not (tmp_path / "runs").exists()  # refused before any run directory is made


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["evaluate", "RUN", "--batch-size", "0"], "Invalid value for '--batch-size'"),
        (["evaluate", "RUN", "--num-workers", "-1"], "Invalid value for '--num-workers'"),
        (["show", "--data", "DATA", "-n", "-2"], "Invalid value for '-n'"),
        (["sweep", "--config", "x.yaml", "--trials", "-1"], "Invalid value for '--trials'"),
    ],
)
def test_command_numbers_out_of_range_are_usage_errors(tmp_path, args, message):
    args = [a.replace("RUN", str(tmp_path)).replace("DATA", str(tmp_path)) for a in args]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and message in _text(result)


# ---------------------------------------------------------------------------------------------
# Output options that name a folder (or a file where a folder is wanted): refused first


@pytest.fixture(scope="module")
def tiny_run(module_tmp_factory) -> Path:
    """A 1-epoch run on train/val/test folders whose class c has no test image."""
    base = module_tmp_factory.mktemp("tinyrun")
    data = base / "data"
    make_class_folders(data / "train", {"a": 6, "b": 6, "c": 6}, seed=1)
    make_class_folders(data / "val", {"a": 2, "b": 2}, seed=2)  # c: no validation image
    make_class_folders(data / "test", {"a": 2, "b": 2}, seed=3)  # c: no test image
    cfg = load_config(None, data=str(data), output=str(base / "runs"), **TINY)
    return train(cfg, progress=False, report=False).run_dir


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (["predict", "RUN", "IMAGE", "--json", "DIR"], "--json DIR: is a directory, not a file"),
        (["predict", "RUN", "IMAGE", "--csv", "DIR"], "--csv DIR: is a directory, not a file"),
        (["evaluate", "RUN", "--save", "DIR"], "--save DIR: is a directory, not a file"),
        (["show", "--data", "RUN", "--output", "DIR"], "--output DIR: is a directory, not a"),
        (["export", "RUN", "--output", "FILE"], "--output FILE: is a file, not a folder"),
        (["train", "--data", "DATA", "--output", "FILE"], "--output FILE: is a file, not a folder"),
        (["compare", "--data", "DATA", "--output", "FILE/x"], "FILE is a file, not a folder"),
    ],
)
def test_output_options_that_cannot_be_written_are_refused_before_the_work(
    tiny_run, tmp_path, command, message
):
    folder = tmp_path / "out.json"  # a folder with a file's name: the usual slip
    folder.mkdir()
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    image = tmp_path / "photo.jpg"
    write_image(image, seed=5)
    names = {
        "RUN": str(tiny_run),
        "IMAGE": str(image),
        "DIR": str(folder),
        "FILE": str(a_file),
        "DATA": json.loads((tiny_run / "split.json").read_text())["root"],
        "FILE/x": str(a_file / "x"),
    }
    args = [names.get(a, a) for a in command]
    result = CliRunner().invoke(app, args)
    text = _one_line_error(result)
    expected = message.replace("DIR", str(folder)).replace("FILE", str(a_file))
    assert expected in text
    assert "Predictions (" not in text and "test accuracy" not in text  # no work was done
    assert list(folder.iterdir()) == [] and a_file.read_text() == "keep me"


# ---------------------------------------------------------------------------------------------
# A malicious checkpoint


class _RunsCode:
    """Unpickling this runs a shell command: what a malicious checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("command", ["evaluate", "predict", "export", "weights"])
def test_malicious_checkpoint_is_refused_as_unsafe_and_nothing_runs(tmp_path, command):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "extra": _RunsCode(marker)}, evil)
    image = write_image(tmp_path / "photo.jpg", seed=1)
    make_class_folders(tmp_path / "data", {"a": 4, "b": 4})
    args = {
        "evaluate": ["evaluate", str(evil)],
        "predict": ["predict", str(evil), str(image)],
        "export": ["export", str(evil)],
        "weights": ["train", "--data", str(tmp_path / "data"), "--output", str(tmp_path / "r"),
                    *TINY_ARGS, "--weights", str(evil)],
    }[command]  # fmt: skip
    text = _one_line_error(CliRunner().invoke(app, args))
    assert f"{evil}: refused as unsafe; it holds Python objects (posix.system)" in text
    assert "could run code" in text and "truncated or corrupt" not in text
    assert not marker.exists()
    with pytest.raises(UserError, match="refused as unsafe"):
        read_checkpoint(evil)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# A class with no validation or test images


def test_a_class_with_no_test_images_is_warned_about_and_reported_as_na(tiny_run, tmp_path):
    results = json.loads((tiny_run / "results.json").read_text())
    per_class = results["per_class_test_acc"]
    assert per_class["c"] is None  # null: not measured, not 0%
    assert per_class["a"] is not None and per_class["b"] is not None
    # The other classes' accuracies are what the confusion matrix says.
    matrix = results["confusion_matrix"]
    for i, name in enumerate(results["class_names"][:2]):
        assert per_class[name] == pytest.approx(matrix[i][i] / sum(matrix[i]))

    shown = CliRunner().invoke(app, ["evaluate", str(tiny_run)])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output[shown.output.index("{") :])["c"] is None
    assert "1 class(es) have no test images here: c; their accuracy is n/a" in _text(shown)

    from inat_finetune.reporting.plots import plot_per_class_accuracy

    assert plot_per_class_accuracy(tiny_run, tmp_path / "per_class.png").stat().st_size > 0


def test_the_summary_says_na_and_the_scan_warns(tmp_path):
    data = tmp_path / "data"
    make_class_folders(data / "train", {"a": 4, "b": 4, "c": 4}, seed=1)
    make_class_folders(data / "val", {"a": 2, "b": 2}, seed=2)
    make_class_folders(data / "test", {"a": 2, "b": 2}, seed=3)
    args = ["train", "--data", str(data), "--output", str(tmp_path / "runs"), *TINY_ARGS]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    text = _text(result)
    assert "1 class(es) have no validation images: c" in text
    assert "1 class(es) have no test images: c" in text
    assert "c n/a" in text and "c 0.0%" not in text


def test_a_full_disk_anywhere_else_is_one_line_naming_the_file(tmp_path, monkeypatch):
    """A write outside the atomic writer (a cache store, a library) that finds the disk full:
    one line naming the file, exit 2, not `unexpected OSError: [Errno 28]`."""
    from inat_finetune.training import run as training

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "/cache/images/data-0.bin")

    monkeypatch.setattr(training, "train", full)
    result = CliRunner().invoke(app, ["train", "--data", str(tmp_path), "--recipe", "bn_head"])
    text = _one_line_error(result)
    assert "error: /cache/images/data-0.bin: could not write it (No space left on device); " in text
    assert "free some space or choose another --output" in text
