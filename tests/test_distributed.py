"""DDP on CPU (gloo): two processes must give what one process gives, with one set of outputs.

The end-to-end test trains the same tiny network twice: two processes with 8 images each per
step (Lightning's launcher, and again under torchrun), and one process with 16. Frozen backbone,
eval-mode BatchNorm, no dropout, no augmentation and one full batch per epoch make the two
mathematically identical (DDP averages the two 8-image gradients into the 16-image one), so the
metrics must agree to float precision, not merely look similar.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch.multiprocessing as mp
from conftest import ROOT, make_class_folders
from dist_worker import collectives, free_port

from inat_finetune.errors import UserError
from inat_finetune.runtime import distributed
from inat_finetune.runtime.distributed import ShardSampler, plan_world, scaled_lr, shared_directory
from inat_finetune.training.config import load_config
from inat_finetune.training.run import train

PROBE = Path(__file__).with_name("ddp_probe.py")
# resnet18 without weights: no dropout (unlike mobilenet_v2), so training is deterministic.
TINY = dict(
    backbone="resnet18",
    weights="none",
    img_size=32,
    num_workers=0,
    epochs=2,
    strategy="freeze_last",
    augment=False,
    accelerator="cpu",
    precision="32-true",
    seed=3,
)
TINY_ARGS = [
    arg
    for key, value in TINY.items()
    for arg in (
        [f"--{key.replace('_', '-')}", str(value)] if key != "augment" else ["--no-augment"]
    )
]
LAUNCH_TIMEOUT_S = 240


# ---------------------------------------------------------------------------------------------
# Pieces


@pytest.mark.parametrize(("size", "world"), [(9, 2), (9, 4), (10, 3), (4, 4)])
def test_shard_sampler_covers_every_item_once(size, world):
    shards = [list(ShardSampler(range(size), world, rank)) for rank in range(world)]
    flat = [i for shard in shards for i in shard]
    assert sorted(flat) == list(range(size))  # disjoint, complete, nothing repeated or padded
    assert [len(ShardSampler(range(size), world, r)) for r in range(world)] == list(
        map(len, shards)
    )


def test_scaled_lr_rules():
    assert scaled_lr(1e-3, 128, "linear") == pytest.approx(4e-3)
    assert scaled_lr(1e-3, 128, "sqrt") == pytest.approx(2e-3)
    assert scaled_lr(1e-3, 128, "none") == 1e-3


def _clear_launcher_env(monkeypatch):
    for name in ("TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "SLURM_JOB_NAME", "LOCAL_RANK", "RANK"):
        monkeypatch.delenv(name, raising=False)


def test_plan_world_without_a_launcher(monkeypatch):
    _clear_launcher_env(monkeypatch)
    world = plan_world("2", 1, "cpu")
    assert (world.devices, world.processes, world.strategy) == (2, 2, "ddp")
    assert plan_world("auto", 1, "cpu").strategy == "auto"
    assert plan_world("0,1", 1, "cuda").processes == 2
    with pytest.raises(UserError, match="torchrun or srun"):
        plan_world("2", 2, "cpu")


def test_plan_world_follows_torchrun(monkeypatch):
    _clear_launcher_env(monkeypatch)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    world = plan_world("auto", 1, "cuda")
    assert (world.devices, world.per_node, world.num_nodes) == (4, 4, 2)
    assert plan_world("4", 2, "cuda").processes == 8
    with pytest.raises(UserError, match="launcher started 8 processes"):
        plan_world("2", 1, "cuda")


def test_shared_directory_is_replayed_by_launched_copies(tmp_path, monkeypatch):
    """Rank 0 creates directories before Lightning starts the other processes; each copy it
    starts inherits the environment and must get the same directories, in the same order."""
    _clear_launcher_env(monkeypatch)
    monkeypatch.delenv(distributed.SHARED_DIRS_ENV, raising=False)
    made = [
        shared_directory(lambda n=n: (tmp_path / f"run{n}").resolve(), processes=2)
        for n in range(2)
    ]
    assert shared_directory(lambda: tmp_path / "solo", processes=1) == tmp_path / "solo"
    inherited = os.environ[distributed.SHARED_DIRS_ENV]
    assert json.loads(inherited) == [str(p) for p in made]  # single-process dirs not recorded

    monkeypatch.setenv("LOCAL_RANK", "1")  # now act as the copy Lightning started
    monkeypatch.setattr(distributed, "_replayed", 0)
    never = tmp_path / "never"
    replayed = [shared_directory(lambda: never, processes=2) for _ in range(2)]
    assert replayed == made and not never.exists()
    with pytest.raises(RuntimeError, match="different command lines"):
        shared_directory(lambda: never, processes=2)


def test_devices_as_a_yaml_number_and_num_nodes_refused_without_launcher(tmp_path, monkeypatch):
    _clear_launcher_env(monkeypatch)
    config_file = tmp_path / "c.yaml"
    config_file.write_text("devices: 2\nnum_nodes: 2\nscale_lr: linear\n")
    config = load_config(config_file, data=str(tmp_path))
    assert (config.devices, config.num_nodes, config.scale_lr) == ("2", 2, "linear")
    with pytest.raises(UserError, match="--num-nodes 2"):
        train(config)


def test_helpers_in_a_real_process_group(tmp_path):
    """rank_zero_first, shared_directory, gather_shards and broadcast_from_zero on 2 ranks."""
    world = 2
    mp.spawn(collectives, args=(world, free_port(), str(tmp_path)), nprocs=world)
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    assert all(r["cache"] for r in records)  # rank 1 ran its block after rank 0's
    assert len({r["dir"] for r in records}) == 1  # one directory, made once
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 1
    assert all(r["merged"] == [float(i) for i in range(9)] for r in records)
    assert all(r["error"] == "bad data" for r in records)  # rank 0's error reaches every rank


# ---------------------------------------------------------------------------------------------
# Two processes against one


@pytest.fixture(scope="module")
def dataset(module_tmp_factory) -> Path:
    # 20 training images -> 16 train + 4 val (2 per class); 9 test images: odd on purpose, so
    # the two ranks test 5 and 4 images and the reductions must weight them correctly.
    root = module_tmp_factory.mktemp("ddp") / "data"
    make_class_folders(root / "train", {"cat": 10, "dog": 10}, seed=1)
    make_class_folders(root / "val", {"cat": 5, "dog": 4}, seed=2)
    return root


@pytest.fixture(scope="module")
def single_process(dataset, module_tmp_factory):
    out = module_tmp_factory.mktemp("one")
    config = load_config(
        None, **TINY, data=str(dataset), batch_size=16, devices="1", output=str(out)
    )
    return train(config, progress=False, report=False)


def _launch(command: list[str], probe_dir: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
        "DDP_PROBE_DIR": str(probe_dir),
    }
    env.pop(distributed.SHARED_DIRS_ENV, None)
    # Own process group: on a timeout the launcher *and* the ranks it started are killed.
    proc = subprocess.Popen(
        command,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"DDP run timed out after {LAUNCH_TIMEOUT_S} s:\n{output[-3000:]}")
    assert proc.returncode == 0, output[-4000:]
    return subprocess.CompletedProcess(command, proc.returncode, output)


def _metrics(run_dir: Path) -> dict[str, list[float]]:
    columns: dict[str, list[float]] = {}
    for row in csv.DictReader((run_dir / "metrics.csv").open()):
        for key, value in row.items():
            if value and key not in ("epoch", "step"):
                columns.setdefault(key, []).append(float(value))
    return columns


LAUNCHERS = {
    "lightning": lambda: [sys.executable, str(PROBE), "train", "--devices", "2"],
    "torchrun": lambda: [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(PROBE),
        "train",
    ],  # fmt: skip
}


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_two_processes_match_one_with_one_set_of_outputs(
    launcher, dataset, single_process, tmp_path
):
    output = tmp_path / "runs"
    probe_dir = tmp_path / "probe"
    command = [*LAUNCHERS[launcher](), "--data", str(dataset), *TINY_ARGS, "--batch-size", "8"]
    # A relative --output on purpose: every rank must agree on one directory anyway.
    # A cache of its own, so that the features are computed here and not reused from the
    # single-process run.
    command += ["--cache-dir", str(tmp_path / "cache")]
    done = _launch([*command, "--output", "runs"], probe_dir, cwd=tmp_path)

    # Exactly one set of outputs: one run directory, one results.json, one report, one table.
    runs = [p for p in output.iterdir()]
    assert len(runs) == 1, runs
    run = runs[0]
    assert len(list(output.rglob("results.json"))) == 1
    assert len(list(output.rglob("report.html"))) == 1
    assert (run / "checkpoints" / "best.ckpt").is_file()
    assert done.stdout.count("run directory:") == 1
    results = json.loads((run / "results.json").read_text())
    assert (results["processes"], results["global_batch_size"]) == (2, 16)

    # Both ranks ran DDP and saw disjoint shards that together are the whole of each split.
    records = [json.loads((probe_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 and r["strategy"] == "DDPStrategy" for r in records)
    sizes = results["num_images"]
    for split in ("train", "val", "test"):
        for epoch in range(len(records[0]["indices"][split])):
            shards = [set(r["indices"][split][epoch]) for r in records]
            assert not shards[0] & shards[1], (split, epoch)
            assert shards[0] | shards[1] == set(range(sizes[split])), (split, epoch)
    assert [r["images"]["train"] for r in records] == [16, 16]  # 8 per epoch each, 2 epochs
    # The frozen backbone ran once per image, on rank 0; rank 1 read the shared feature cache
    # and both trained the head on stored features, each on its own shard (checked above).
    total = sum(sizes.values())
    assert [r["features_computed"] for r in records] == [[total], [0]]
    assert [r["datamodule"] for r in records] == ["FeatureDataModule"] * 2
    assert results["speed_paths"]["feature_cache"] == f"on (0 reused, {total} computed)"
    assert sorted(r["images"]["test"] for r in records) == [4, 5]

    # The same numbers as one process with the same global batch.
    one, two = _metrics(single_process.run_dir), _metrics(run)
    assert one.keys() == two.keys()
    for key in one:
        assert two[key] == pytest.approx(one[key], abs=1e-5), key
    assert results["test_acc"] == pytest.approx(single_process.results["test_acc"], abs=1e-6)
    assert results["confusion_matrix"] == single_process.results["confusion_matrix"]
    # Test predictions gathered from both ranks, back in the order of the test split.
    rows_one = list(csv.reader((single_process.run_dir / "test_predictions.csv").open()))
    rows_two = list(csv.reader((run / "test_predictions.csv").open()))
    assert [r[:3] for r in rows_two] == [r[:3] for r in rows_one]
    for a, b in zip(rows_one[1:], rows_two[1:], strict=True):
        assert [float(x) for x in b[3:]] == pytest.approx([float(x) for x in a[3:]], abs=1e-5)
