"""Checkpoints: atomic writes under injected failures, safe reads, NaN stops, resumable loading."""

from __future__ import annotations

import errno
import io
import os
import random
import re
import warnings

import numpy as np
import pytest
import torch
from conftest import TINY_TRAIN, make_class_folders
from torch.utils.data import Dataset
from typer.testing import CliRunner

from inat_finetune.cli.main import app
from inat_finetune.data.sampling import ResumableLoader
from inat_finetune.errors import UserError
from inat_finetune.models.checkpoints import read_checkpoint
from inat_finetune.training.checkpointing import (
    AtomicCheckpointIO,
    BestAndLastCheckpoint,
    RunCSVLogger,
    capture_rng,
    keep_metrics_rows,
    restore_rng,
)
from inat_finetune.training.config import load_config
from inat_finetune.training.run import train
from inat_finetune.training.runlock import run_lock

TINY = {**TINY_TRAIN, "epochs": 2, "checkpoint_steps": 1}
real_save = torch.save


def _half_then_disk_full(obj, handle, *args, **kwargs):
    """torch.save that writes half of the file, then fails as a full disk would."""
    buffer = io.BytesIO()
    real_save(obj, buffer)
    handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    raise OSError(errno.ENOSPC, "No space left on device")


def test_failed_checkpoint_write_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    plugin = AtomicCheckpointIO()
    plugin.save_checkpoint({"step": 1, "w": torch.ones(1000)}, path)
    monkeypatch.setattr(torch, "save", _half_then_disk_full)
    with pytest.raises(UserError, match=r"last.ckpt: could not write .* previous one is intact"):
        plugin.save_checkpoint({"step": 2, "w": torch.zeros(1000)}, path)
    monkeypatch.undo()
    kept = read_checkpoint(path)
    assert kept["step"] == 1 and torch.equal(kept["w"], torch.ones(1000))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary left behind


def test_training_uses_atomic_checkpoints(tmp_path, monkeypatch):
    """The disk fills up at the 4th checkpoint: the run stops, last.ckpt is the 3rd, whole."""
    make_class_folders(tmp_path / "data", {"a": 8, "b": 8})
    calls = []

    def flaky_save(obj, handle, *args, **kwargs):
        calls.append(obj.get("global_step"))
        if len(calls) == 4:
            _half_then_disk_full(obj, handle)
        real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(torch, "save", flaky_save)
    cfg = load_config(None, data=str(tmp_path / "data"), output=str(tmp_path / "runs"), **TINY)
    with pytest.raises(UserError, match="No space left on device"):
        train(cfg, progress=False, report=False)
    monkeypatch.undo()
    (run,) = (tmp_path / "runs").iterdir()
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == calls[2]
    assert not list(run.rglob("*.tmp")) and not (run / "results.json").exists()


class _Pickled:
    """Not a tensor or plain value: weights-only loading must refuse it."""


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "not a readable checkpoint"),
        (b"\x00" * 100, "not a readable checkpoint (truncated or corrupt?)"),
        ("truncated", "not a readable checkpoint (truncated or corrupt?)"),
        ([1, 2, 3], "not a Lightning checkpoint (holds a list)"),
        (_Pickled(), "refused as unsafe; it holds Python objects (test_checkpointing._Pickled)"),
    ],
)
def test_bad_checkpoint_files_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "bad.ckpt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "truncated":
        torch.save({"w": torch.randn(10_000)}, path)
        path.write_bytes(path.read_bytes()[:20_000])
    else:
        torch.save(content, path)
    with pytest.raises(UserError, match=re.escape(message)) as info:
        read_checkpoint(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    make_class_folders(tmp_path / "data", {"a": 8, "b": 8})
    cross_entropy = torch.nn.functional.cross_entropy
    training_calls = []

    def diverging(logits, labels, *args, **kwargs):
        loss = cross_entropy(logits, labels, *args, **kwargs)
        if torch.is_grad_enabled():  # training steps only
            training_calls.append(1)
            if len(training_calls) == 3:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", diverging)
    args = ["train", "--data", str(tmp_path / "data"), "--output", str(tmp_path / "runs")]
    for name, value in TINY.items():
        args += ["--" + name.replace("_", "-"), str(value)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert "error: training loss became nan at epoch 0, step 2; the run stopped and" in message
    assert "last.ckpt (the last good state) is kept. Lower --lr (now 0.001)" in message
    assert "--resume" not in message and "Traceback" not in result.output
    (run,) = (tmp_path / "runs").iterdir()
    last = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 2  # the two good steps; the NaN never reached the weights
    assert all(
        torch.isfinite(t).all() for t in last["state_dict"].values() if t.is_floating_point()
    )
    assert not (run / "results.json").exists()


def test_rng_states_survive_a_weights_only_round_trip(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    state = capture_rng()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.save({"rng": state}, tmp_path / "rng.ckpt")
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    restore_rng(read_checkpoint(tmp_path / "rng.ckpt")["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1])
    assert expected[2] == again[2]


def test_metrics_csv_is_cut_back_then_appended_to(tmp_path):
    metrics = tmp_path / "metrics.csv"
    metrics.write_text("epoch,step,val/acc\n0,4,0.5\n1,9,0.6\n2,14,0.7\n")
    keep_metrics_rows(metrics, 2)  # the checkpoint knew of two rows; the third is redone
    logger = RunCSVLogger(save_dir=tmp_path, name="", version="")
    logger.log_metrics({"val/acc": 0.75, "epoch": 2}, step=14)
    logger.save()
    assert metrics.read_text().splitlines() == [
        "epoch,step,val/acc",
        "0,4,0.5",
        "1,9,0.6",
        "2,14,0.75",
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]


def test_logger_keeps_only_the_rows_its_checkpoint_knew_of(tmp_path):
    metrics = tmp_path / "metrics.csv"
    metrics.write_text("epoch,step,val/acc\n0,4,0.5\n1,9,0.6\n")
    writer = RunCSVLogger(save_dir=tmp_path, name="", version="").experiment
    writer.keep_rows(2)  # nothing after the checkpoint: the file is left alone
    assert metrics.read_text() == "epoch,step,val/acc\n0,4,0.5\n1,9,0.6\n"
    writer.keep_rows(1)
    assert writer.row_count == 1 and metrics.read_text().splitlines()[1:] == ["0,4,0.5"]


def test_checkpoint_state_follows_a_moved_run_directory(tmp_path):
    old, new = tmp_path / "old" / "checkpoints", tmp_path / "new" / "checkpoints"
    saved = BestAndLastCheckpoint(dirpath=old, monitor="val/acc", mode="max", save_last=True)
    saved.best_model_score = torch.tensor(0.5)
    saved.best_model_path = saved.kth_best_model_path = str(old / "best.ckpt")
    saved.best_k_models = {str(old / "best.ckpt"): torch.tensor(0.5)}
    saved.last_model_path = str(old / "last.ckpt")
    moved = BestAndLastCheckpoint(dirpath=new, monitor="val/acc", mode="max", save_last=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Lightning warns when it drops the state
        moved.load_state_dict(saved.state_dict())
    assert moved.best_model_score == torch.tensor(0.5)
    assert moved.best_model_path == moved.kth_best_model_path == str(new / "best.ckpt")
    assert moved.best_k_models == {str(new / "best.ckpt"): torch.tensor(0.5)}
    assert moved.last_model_path == str(new / "last.ckpt")


def test_run_lock_is_reentrant_in_a_process_and_removed_on_release(tmp_path):
    with run_lock(tmp_path):
        assert (tmp_path / "run.lock").read_text() == f"{os.getpid()}\n"
        with run_lock(tmp_path):  # resume_run holds it and calls train, which asks again
            pass
        assert (tmp_path / "run.lock").is_file()
    assert not (tmp_path / "run.lock").exists()


class _Draws(Dataset):
    """Item i is (i, random draws): shows the order and the seeds each sample was given, of
    torch's generator (torchvision's), Python's and NumPy's (other augmentation libraries')."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, index: int) -> tuple[int, float]:
        return index, float(torch.rand(())) + 10 * random.random() + 100 * np.random.rand()


def _batches(loader, limit=None):
    out = []
    for batch in loader:
        out.append((batch[0].tolist(), batch[1].tolist()))
        if limit and len(out) == limit:
            break
    return out


def test_resumable_loader_continues_mid_epoch_with_the_same_samples_and_draws():
    loader = ResumableLoader(_Draws(), batch_size=4, seed=5)
    loader.sampler.set_epoch(1)
    whole = _batches(loader)
    assert sorted(i for b in whole for i in b[0]) == list(range(10))  # batches of 4, 4, 2
    torch.manual_seed(123)  # the global RNG must not matter
    part = ResumableLoader(_Draws(), batch_size=4, seed=5)
    part.sampler.set_epoch(1)
    assert _batches(part, limit=2) == whole[:2]
    state = part.state_dict()
    assert state == {"epoch": 1, "batches_done": 2}
    resumed = ResumableLoader(_Draws(), batch_size=4, seed=5)
    resumed.load_state_dict(state)
    assert _batches(resumed) == whole[2:]
    assert resumed.state_dict() == {"epoch": 1, "batches_done": 3}
    resumed.sampler.set_epoch(2)  # the next epoch is whole, and in another order
    assert len(_batches(resumed)) == 3 and _batches(resumed) != whole


def test_augmentation_does_not_depend_on_worker_count():
    serial = ResumableLoader(_Draws(), batch_size=4, seed=5)
    parallel = ResumableLoader(_Draws(), batch_size=4, seed=5, num_workers=2)
    assert _batches(serial) == _batches(parallel)


def test_seeded_samples_leave_the_main_process_generators_as_they_were():
    def draws() -> tuple[float, float, float]:
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    def seed_all() -> None:
        random.seed(1)
        np.random.seed(1)
        torch.manual_seed(1)

    seed_all()
    expected = draws()
    seed_all()
    _batches(ResumableLoader(_Draws(), batch_size=4, seed=5))
    assert draws() == expected


def test_a_last_batch_of_one_is_dropped_for_batchnorm():
    class Nine(_Draws):
        def __len__(self) -> int:
            return 9

    assert len(ResumableLoader(Nine(), batch_size=4, seed=0)) == 2  # 4 + 4, not 4 + 4 + 1
    assert len(ResumableLoader(Nine(), batch_size=3, seed=0)) == 3
