"""Resume: a run killed mid-epoch (SIGKILL, SIGTERM) ends exactly like one that never stopped."""

from __future__ import annotations

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
from typer.testing import CliRunner

from inat_finetune import training
from inat_finetune.checkpointing import read_checkpoint
from inat_finetune.cli import app
from inat_finetune.config import load_config
from inat_finetune.errors import UserError
from inat_finetune.resume import resume_config, resume_run, resumed_wandb_run
from inat_finetune.training import CARD_KEY, train

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
VARIANTS = {"recipe": RECIPE, "features": FEATURES, "prefix": PREFIX}
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
    wa, wb = (read_checkpoint(r / "checkpoints" / "last.ckpt")["state_dict"] for r in (a, b))
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume") / "data"
    make_class_folders(root, {"ant": 10, "bee": 10, "wasp": 10})
    return root


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("uninterrupted")
    cfg = load_config(None, data=str(data), output=str(output), run_name="r", **OPTIONS)
    return train(cfg, progress=False, report=False).run_dir


@pytest.fixture(scope="module")
def uninterrupted_variant(data, tmp_path_factory):
    """The uninterrupted run of a VARIANTS entry, trained once per module when first asked."""
    runs: dict[str, Path] = {}

    def run_of(name: str) -> Path:
        if name not in runs:
            output = tmp_path_factory.mktemp(f"uninterrupted_{name}")
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
from inat_finetune import training
step = training.FineTuneModule.training_step
def slow_step(self, batch, batch_idx):
    time.sleep(0.2)
    return step(self, batch, batch_idx)
training.FineTuneModule.training_step = slow_step
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
    ("variant", "cache_summary"), [("features", "on ("), ("prefix", "on after")]
)
def test_sigterm_saves_the_current_step_and_resume_matches(
    variant, cache_summary, data, uninterrupted_variant, tmp_path, monkeypatch
):
    """A pre-empted machine gets SIGTERM: the run saves the step it is on and exits 143.

    On the feature-cache paths (the SIGKILL test covers the image path, with a recipe)."""
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


def test_extending_a_finished_run_equals_training_longer(data, uninterrupted, tmp_path):
    cfg = load_config(
        None, data=str(data), output=str(tmp_path), run_name="r", **{**OPTIONS, "epochs": 1}
    )
    run = train(cfg, progress=False, report=False).run_dir
    with pytest.raises(UserError, match=r"already finished its 1 epochs; pass --epochs N"):
        resume_run(run, {}, progress=False)
    resume_run(run, {"epochs": 2}, progress=False)
    _same_run(run, uninterrupted)


def test_resume_before_the_first_checkpoint_starts_over(uninterrupted, tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.yaml", "split.json"):
        shutil.copy(uninterrupted / name, run / name)
    (run / "metrics.csv").write_text("epoch,step\n0,1\n")  # a row from the lost attempt
    (run / ".results.json.x1y2.tmp").write_text("{")  # a write the kill cut short
    calls = []
    monkeypatch.setattr(training, "train", lambda *args, **kwargs: calls.append(kwargs))
    resume_run(run, {}, progress=False)
    # The same config and split into the same directory, from the start (a fixed seed makes
    # that the uninterrupted run: test_training.test_same_seed_gives_same_results).
    (call,) = calls
    assert call["run_dir"] == run and call["ckpt_path"] is None
    assert call["split"].train == json.loads((run / "split.json").read_text())["train"]
    assert not (run / "metrics.csv").exists() and not list(run.glob("*.tmp"))


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
