"""Resume: a run killed mid-epoch (SIGKILL, SIGTERM) ends exactly like one that never stopped."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, make_class_folders
from lightning.pytorch.callbacks import Callback
from typer.testing import CliRunner

from inat_finetune.cli.main import app
from inat_finetune.errors import UserError
from inat_finetune.inference.evaluation import evaluate
from inat_finetune.models.checkpoints import CARD_KEY, read_checkpoint
from inat_finetune.training import run as training
from inat_finetune.training.config import load_config
from inat_finetune.training.loggers import resumed_wandb_run
from inat_finetune.training.resume import resume_config, resume_run
from inat_finetune.training.run import train

# 10 images a class, flat layout: 6 train / 2 val / 2 test each, so 18 training images in
# batches of 4 = 5 steps an epoch. fp32 on CPU: the same seed gives the same numbers.
OPTIONS = dict(
    backbone="mobilenet_v2",  # its classifier has dropout: the RNG state matters
    strategy="freeze_last",
    img_size=32,
    batch_size=4,
    num_workers=0,
    epochs=2,
    precision="32-true",
    seed=7,
    checkpoint_steps=2,
)
# Everything a recipe can hold that has state or draws random numbers: a stage unfrozen at
# epoch 1, a per-step cosine schedule with warmup, EMA weights, MixUp (drawn per batch, from
# the global RNG), TrivialAugment and random erasing (per sample), label smoothing.
RECIPE = dict(
    OPTIONS,
    strategy="staged",
    lp_epochs=1,
    lr_schedule="cosine",
    warmup_epochs=1.0,
    ema_decay=0.9,
    mixup_alpha=0.2,
    label_smoothing=0.1,
    augmentation="trivialaugment",
    random_erasing=0.25,
)
# No augmentation and a frozen backbone: the head trains on stored features (features.py),
# through another data module.
FEATURES = dict(OPTIONS, augment=False)
# The same with the later blocks training on the stored output of the frozen first ones, with
# the faster depthwise backward.
PREFIX = dict(FEATURES, strategy="freeze_k_percent")
# The seed's augmentation (crop, flip, colour jitter, rotation) on the device in batches
# (data/batch_augment.py, the default --augment-on): each sample's parameters come from its
# own seed, so the resumed epoch augments as the uninterrupted one did. (RECIPE's policies
# take that path too.)
AUGMENTED = dict(OPTIONS, augment_on="device")
VARIANTS = {"recipe": RECIPE, "features": FEATURES, "prefix": PREFIX, "augmented": AUGMENTED}
STEPS_PER_EPOCH = 5
# How long, and which caches were built or reused: these describe the process, not the run.
TIMINGS = ("train_time_s", "test_time_s", "speed_paths")


def _cli_args(data: Path, output: Path, options: dict) -> list[str]:
    args = ["train", "--data", str(data), "--output", str(output), "--run-name", "r"]
    for name, value in options.items():
        args += ["--" + name.replace("_", "-"), str(value)]
    return args


def _same_run(a: Path, b: Path) -> None:
    """Results, per-epoch metrics, predictions and final weights are all identical."""
    ra, rb = (json.loads((r / "results.json").read_text()) for r in (a, b))
    assert {k: v for k, v in ra.items() if k not in TIMINGS} == {
        k: v for k, v in rb.items() if k not in TIMINGS
    }
    for name in ("metrics.csv", "test_predictions.csv"):
        assert (a / name).read_text() == (b / name).read_text(), name
    for name in ("last.ckpt", "best.ckpt"):
        wa, wb = (_weights(r / "checkpoints" / name) for r in (a, b))
        assert wa.keys() == wb.keys()
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The state dict less the training metrics' running sums: a last.ckpt written when training
    ends holds them reset, one written after the last validation not yet."""
    state = read_checkpoint(checkpoint)["state_dict"]
    return {k: v for k, v in state.items() if not k.startswith(("train_acc.", "train_loss."))}


@pytest.fixture(scope="module")
def data(module_tmp_factory) -> Path:
    root = module_tmp_factory.mktemp("resume") / "data"
    make_class_folders(root, {"ant": 10, "bee": 10, "wasp": 10})
    return root


@pytest.fixture(scope="module")
def uninterrupted(data, module_tmp_factory) -> Path:
    output = module_tmp_factory.mktemp("uninterrupted")
    cfg = load_config(None, data=str(data), output=str(output), run_name="r", **OPTIONS)
    return train(cfg, progress=False, report=False).run_dir


@pytest.fixture(scope="module")
def uninterrupted_variant(data, module_tmp_factory):
    """The uninterrupted run of a VARIANTS entry, trained once per module when first asked."""
    runs: dict[str, Path] = {}

    def run_of(name: str) -> Path:
        if name not in runs:
            output = module_tmp_factory.mktemp(f"uninterrupted_{name}")
            options = VARIANTS[name]
            cfg = load_config(None, data=str(data), output=str(output), run_name="r", **options)
            runs[name] = train(cfg, progress=False, report=False).run_dir
        return runs[name]

    return run_of


def _step_in_second_epoch(checkpoint: Path) -> int | None:
    """The checkpoint's step if it lies inside epoch 1 (after the stage change), else None."""
    try:
        step = int(read_checkpoint(checkpoint)["global_step"])
    except UserError:
        return None
    return step if STEPS_PER_EPOCH < step < 2 * STEPS_PER_EPOCH else None


# `inat-finetune` with every training step 0.2 s longer: tiny steps take milliseconds, and the
# watcher below must see a mid-epoch checkpoint and kill the run before the epoch ends.
SLOW_STEPS_MAIN = """
import time
from inat_finetune.tasks import FineTuneModule
step = FineTuneModule.training_step
def slow_step(self, batch, batch_idx):
    time.sleep(0.2)
    return step(self, batch, batch_idx)
FineTuneModule.training_step = slow_step
from inat_finetune.cli import app
app(prog_name="inat-finetune")
"""


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(
    data, uninterrupted_variant, tmp_path
):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    output = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_STEPS_MAIN, *_cli_args(data, output, RECIPE)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    killed_at, seen = None, None
    deadline = time.monotonic() + 240
    while process.poll() is None and time.monotonic() < deadline:
        for last in output.glob("*/checkpoints/last.ckpt"):
            # Every save is a new file renamed into place: a new inode means a new checkpoint.
            if (identity := last.stat().st_ino) != seen:
                seen, killed_at = identity, _step_in_second_epoch(last)
        if killed_at:
            os.kill(process.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    process.wait()
    assert killed_at, "the run finished before a mid-epoch checkpoint could be caught"
    assert process.returncode == -signal.SIGKILL
    (run,) = output.iterdir()
    assert not (run / "results.json").exists()
    # It may have written one more checkpoint before the signal landed; still mid-epoch 1.
    assert _step_in_second_epoch(run / "checkpoints" / "last.ckpt")

    result = CliRunner().invoke(app, ["train", "--resume", str(run)])
    assert result.exit_code == 0, result.output
    _same_run(run, uninterrupted_variant("recipe"))
    assert not list(run.rglob("*.tmp"))


@pytest.mark.parametrize(
    ("variant", "cache_summary"),
    [("features", "on ("), ("prefix", "on after"), ("augmented", "off (augmentation on")],
)
def test_sigterm_saves_the_current_step_and_resume_matches(
    variant, cache_summary, data, uninterrupted_variant, tmp_path, monkeypatch
):
    """A pre-empted machine gets SIGTERM: the run saves the step it is on and exits 143.

    On the feature-cache paths and the seed's augmentation on the device (the SIGKILL test
    covers the image path with a recipe)."""
    step = training.FineTuneModule.training_step

    def signalled(self, batch, batch_idx):
        if self.global_step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # Lightning's handler notes it; we go on
        return step(self, batch, batch_idx)

    monkeypatch.setattr(training.FineTuneModule, "training_step", signalled)
    no_periodic = {**VARIANTS[variant], "checkpoint_steps": None, "checkpoint_minutes": 0}
    cfg = load_config(None, data=str(data), output=str(tmp_path), run_name="r", **no_periodic)
    with pytest.raises(SystemExit) as info:
        train(cfg, progress=False, report=False)
    assert info.value.code == 128 + signal.SIGTERM
    (run,) = tmp_path.iterdir()
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 4
    monkeypatch.undo()
    resume_run(run, {}, progress=False)
    uninterrupted = uninterrupted_variant(variant)
    _same_run(run, uninterrupted)
    cache = json.loads((uninterrupted / "results.json").read_text())["speed_paths"]
    assert cache["feature_cache"].startswith(cache_summary)
    if variant == "augmented":
        assert cache["augmentation"].startswith("on the device, per batch (crops ")


# With checkpoint_steps, and now with the default checkpointing (every 10 minutes) too, a short
# run's last.ckpt is the one written after the last validation, with Lightning's epoch counter
# at N - 1 (runs before PeriodicLastCheckpoint wrote it again when training ended, at N; both
# extend alike: epochs_started). --epochs is the total either way.
@pytest.mark.parametrize(
    "checkpoint_steps", [2, None], ids=["periodic-fired", "default-checkpointing"]
)
def test_extending_a_finished_run_equals_training_longer(
    checkpoint_steps, data, uninterrupted, tmp_path
):
    one_epoch = {**OPTIONS, "epochs": 1, "checkpoint_steps": checkpoint_steps}
    cfg = load_config(None, data=str(data), output=str(tmp_path), run_name="r", **one_epoch)
    run = train(cfg, progress=False, report=False).run_dir
    for options in ({}, {"epochs": 1}):
        with pytest.raises(
            UserError, match=r"already finished after 1 epoch\(s\); --epochs is the total"
        ):
            resume_run(run, options, progress=False)
    (run / "run.lock").write_text("999999999\n")  # left by a process that died: no obstacle
    resume_run(run, {"epochs": 2}, progress=False)
    _same_run(run, uninterrupted)
    assert not (run / "run.lock").exists()
    with pytest.raises(UserError, match=r"after 2 epoch\(s\); .* --epochs N with N > 2 to train"):
        resume_run(run, {"epochs": 2}, progress=False)


def test_resume_before_the_first_checkpoint_starts_over(uninterrupted, tmp_path):
    """Killed before its first checkpoint: resumed for real, it is the uninterrupted run."""
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.yaml", "split.json"):
        shutil.copy(uninterrupted / name, run / name)
    (run / "metrics.csv").write_text("epoch,step\n0,1\n")  # a row from the lost attempt
    (run / ".results.json.x1y2.tmp").write_text("{")  # a write the kill cut short
    resume_run(run, {}, progress=False)
    # The same config and split into the same directory, from the start: a fixed seed makes
    # that the uninterrupted run, to the last row of metrics.csv and the last weight.
    _same_run(run, uninterrupted)
    assert not list(run.glob(".*.tmp"))


# A learning rate this high makes the later epochs worse on this data: the best epoch (0) is not
# the last one, so best.ckpt, best_epoch and best_val_acc must come from the run's records, not
# from whichever epoch came last. Default checkpointing: last.ckpt is written when training ends.
HIGH_LR = dict(OPTIONS, lr=0.05, epochs=3, checkpoint_steps=None)


@pytest.fixture(scope="module")
def high_lr_uninterrupted(data, module_tmp_factory) -> Path:
    output = module_tmp_factory.mktemp("high_lr")
    cfg = load_config(None, data=str(data), output=str(output), run_name="r", **HIGH_LR)
    return train(cfg, progress=False, report=False).run_dir


def _val_accuracies(run: Path) -> dict[int, float]:
    with (run / "metrics.csv").open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("val/acc")]
    return {int(row["epoch"]): float(row["val/acc"]) for row in rows}


def _assert_results_agree_with_best_ckpt(run: Path) -> None:
    """results.json, metrics.csv and best.ckpt describe the same epoch and the same model."""
    results = json.loads((run / "results.json").read_text())
    val = _val_accuracies(run)
    best_epoch = results["best_epoch"]
    assert results["best_val_acc"] == max(val.values()) == val[best_epoch]
    assert min(e for e, acc in val.items() if acc == max(val.values())) == best_epoch
    assert read_checkpoint(run / "checkpoints" / "best.ckpt")["epoch"] == best_epoch
    assert results["checkpoint"] == "checkpoints/best.ckpt"
    rescored = evaluate(run, num_workers=0, device="cpu", precision="32-true", progress=False)
    assert rescored["test_acc"] == results["test_acc"]
    assert rescored["test_loss"] == pytest.approx(results["test_loss"], rel=1e-5)


def test_results_agree_with_best_ckpt_when_the_best_epoch_is_not_the_last(
    high_lr_uninterrupted,
):
    results = json.loads((high_lr_uninterrupted / "results.json").read_text())
    assert results["epochs"] == 3 and results["best_epoch"] != 2  # the precondition
    _assert_results_agree_with_best_ckpt(high_lr_uninterrupted)


def test_a_copied_or_moved_run_resumes_like_the_one_left_in_place(
    data, high_lr_uninterrupted, tmp_path
):
    one_epoch = {**HIGH_LR, "epochs": 1}
    cfg = load_config(
        None, data=str(data), output=str(tmp_path / "runs"), run_name="r", **one_epoch
    )
    in_place = train(cfg, progress=False, report=False).run_dir
    copied = tmp_path / "elsewhere" / "copied"
    shutil.copytree(in_place, copied)
    shutil.copytree(in_place, tmp_path / "before-the-move")
    moved = (tmp_path / "before-the-move").rename(tmp_path / "moved")
    # The copies first, while the original still holds the best.ckpt their state names.
    for run in (copied, moved, in_place):
        result = CliRunner().invoke(app, ["train", "--resume", str(run), "--epochs", "3"])
        assert result.exit_code == 0, result.output
        _same_run(run, high_lr_uninterrupted)
        _assert_results_agree_with_best_ckpt(run)


def _snapshot(run: Path) -> dict[str, bytes]:
    return {
        p.relative_to(run).as_posix(): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()
    }


def test_a_resume_that_fails_its_checks_leaves_the_run_as_it_was(image_folder, tmp_path):
    data = image_folder({"ant": 6, "bee": 6})
    cfg = load_config(
        None, data=str(data), output=str(tmp_path / "runs"), **{**OPTIONS, "epochs": 1}
    )
    run = train(cfg, progress=False, report=False).run_dir
    before = _snapshot(run)
    split = json.loads((run / "split.json").read_text())
    image = data / next(iter(split["train"].values()))[0]
    image.write_bytes(image.read_bytes()[:300])  # replaced by a truncated JPEG
    result = CliRunner().invoke(app, ["train", "--resume", str(run), "--epochs", "2"])
    assert result.exit_code == 2, result.output
    assert _snapshot(run) == before  # config.yaml, metrics.csv, results.json, checkpoints, ...
    line = " ".join(result.output.split())
    assert f"{image}: does not decode" in line and "put the original file back" in line
    assert "Traceback" not in result.output


# A second process holding a run's lock the way runlock does: flock on run.lock, its pid inside.
HOLD_LOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, str(os.getpid()).encode())
print("held", flush=True)
sys.stdin.read()
"""
# Exit status 1 if another process holds the lock, else 0.
PROBE_LOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
except BlockingIOError:
    sys.exit(1)
"""


def test_a_run_in_use_by_another_process_is_refused(copied_run):
    before = _snapshot(copied_run)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(copied_run / "run.lock")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "held\n"
        result = CliRunner().invoke(app, ["train", "--resume", str(copied_run)])
        assert result.exit_code == 2, result.output
        line = " ".join(result.output.split())
        assert f"{copied_run}: in use by process {holder.pid} (it holds run.lock)" in line
        assert {k: v for k, v in _snapshot(copied_run).items() if k != "run.lock"} == before
    finally:
        holder.communicate("")  # the holder exits: the kernel drops its lock
    resume_run(copied_run, {}, progress=False)  # its run.lock, left behind, is no obstacle
    assert (copied_run / "results.json").is_file() and not (copied_run / "run.lock").exists()


class _ProbeLock(Callback):
    """Checks from another process, while the run trains, that its lock is held and by whom."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, str]] = []

    def on_train_start(self, trainer, pl_module) -> None:
        lock = Path(trainer.default_root_dir) / "run.lock"
        probe = subprocess.run([sys.executable, "-c", PROBE_LOCK, str(lock)], check=False)
        self.seen.append((probe.returncode, lock.read_text().strip()))


def test_a_training_run_holds_its_lock_while_it_runs(image_folder, tmp_path):
    data = image_folder({"ant": 6, "bee": 6})
    cfg = load_config(
        None, data=str(data), output=str(tmp_path / "runs"), **{**OPTIONS, "epochs": 1}
    )
    probe = _ProbeLock()
    run = training.train(cfg, progress=False, report=False, callbacks=[probe]).run_dir
    assert probe.seen == [(1, str(os.getpid()))]
    assert not (run / "run.lock").exists()


@pytest.fixture
def copied_run(uninterrupted, tmp_path) -> Path:
    run = tmp_path / "copy"
    shutil.copytree(uninterrupted, run)
    (run / "results.json").unlink()  # as if killed at the very end
    return run


def test_only_how_and_where_options_may_change(copied_run):
    changed = resume_config(copied_run, {"epochs": 5, "num_workers": 2, "cache_dir": "/c"})
    assert (changed.epochs, changed.num_workers, changed.cache_dir) == (5, 2, "/c")
    assert resume_config(copied_run, {"lr": 1e-3, "backbone": "mobilenet_v2"}).lr == 1e-3
    with pytest.raises(UserError, match=r"--lr 0.5 differs from the run's lr=0.001; only"):
        resume_config(copied_run, {"lr": 0.5})
    with pytest.raises(UserError, match="uses its own config.yaml; drop --config"):
        resume_config(copied_run, {"config": "other.yaml"})
    result = CliRunner().invoke(app, ["train", "--resume", str(copied_run), "--seed", "1"])
    assert result.exit_code == 2
    assert "--seed 1 differs from the run's seed=7" in " ".join(result.output.split())
    result = CliRunner().invoke(app, ["train", "--resume", str(copied_run.parent)])
    assert result.exit_code == 2 and "not a run directory" in result.output


def test_epochs_below_those_a_stopped_run_reached_are_refused(copied_run):
    """A run stopped after 2 of its 2 epochs (results.json not yet written): --epochs 1 would
    describe a run that never existed."""
    before = _snapshot(copied_run)
    with pytest.raises(UserError, match=r"--epochs 1: the run is already in epoch 2; pass"):
        resume_run(copied_run, {"epochs": 1}, progress=False)
    assert _snapshot(copied_run) == before


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"backbone": "resnet18"}, "trained with backbone='resnet18', but config.yaml says"),
        ({"strategy": "none"}, "trained with strategy='none'"),
        ({"class_names": ["ant", "bee", "moth"]}, "knows classes .* but split.json has"),
    ],
)
def test_checkpoint_from_another_model_or_class_set_is_refused(copied_run, change, message):
    last = copied_run / "checkpoints" / "last.ckpt"
    checkpoint = read_checkpoint(last)
    checkpoint[CARD_KEY].update(change)
    torch.save(checkpoint, last)
    with pytest.raises(UserError, match=message) as info:
        resume_run(copied_run, {}, progress=False)
    assert "\n" not in str(info.value)


def test_truncated_or_missing_images_are_clear_errors(copied_run):
    last = copied_run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:5000])
    result = CliRunner().invoke(app, ["train", "--resume", str(copied_run)])
    assert result.exit_code == 2
    assert "last.ckpt: not a readable checkpoint (truncated or corrupt?)" in " ".join(
        result.output.split()
    )
    assert "Traceback" not in result.output
    data_root = Path(json.loads((copied_run / "split.json").read_text())["root"])
    moved = data_root.with_name("moved")
    data_root.rename(moved)
    try:
        with pytest.raises(UserError, match=r"image\(s\) listed in split.json are missing"):
            resume_run(copied_run, {}, progress=False)
    finally:
        moved.rename(data_root)


def test_wandb_run_is_continued_by_id(tmp_path):
    assert resumed_wandb_run(tmp_path) == {}
    (tmp_path / "wandb" / "offline-run-20250101_120000-abc123xy").mkdir(parents=True)
    assert resumed_wandb_run(tmp_path) == {"id": "abc123xy", "resume": "allow"}
