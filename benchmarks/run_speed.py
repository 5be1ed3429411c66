"""One command: the naive loop against ``inat-finetune compare``, same process, same data.

    PYTHONPATH=src python benchmarks/run_speed.py            # hymenoptera, mobilenet_v2, 5 epochs
    PYTHONPATH=src python benchmarks/run_speed.py --out benchmarks/last_speed.md

Runs, in this order and in this one process, on one split of the same images:

1. the limit: one bf16 (where supported) channels-last inference pass over every image, decoded
   from the original files by a 2-worker DataLoader: anything that looks at every image once
   costs at least this much;
2. the naive loop (``naive_loop.py``) for the three strategies of the original write-up;
3. the project's ``compare`` for the same strategies, with empty caches in a fresh folder, so
   the first strategy pays for preparing the images and computing the features;
4. ``freeze_last`` alone without figures and report (the linear probe itself), once with
   empty caches and once with the comparison's filled caches, as a later run would.

It prints per-strategy wall time and test accuracy of both, the speed-ups, and ``freeze_last``
against the limit. Timings on a shared machine are noisy: the load average before and after is
printed with them.
"""

from __future__ import annotations

import inat_finetune  # noqa: F401 - first: sets OpenMP's wait policy before torch loads

# isort: split
import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import torch
from naive_loop import run_naive
from torch.utils.data import DataLoader

from inat_finetune.comparison import SEED_STRATEGIES, compare
from inat_finetune.config import load_config
from inat_finetune.data import ImageListDataset, build_eval_transform, make_split
from inat_finetune.models import get_model
from inat_finetune.training import cpu_supports_bf16, train

REPO = Path(__file__).resolve().parents[1]


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{model}, {cores} cores, {gpu}; torch {torch.__version__}, {platform.python_version()}"


def load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def inference_limit(split, backbone: str, batch_size: int, workers: int) -> tuple[float, str]:
    """Seconds of one inference pass over every image of ``split``, from the original files."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_supports_bf16()
    built = get_model(backbone, num_classes=len(split.classes))
    model = built.model.eval().to(device, memory_format=torch.channels_last)
    pre = built.preprocessing
    samples = [s for name in ("train", "val", "test") for s in split.samples(name)]
    dataset = ImageListDataset(samples, build_eval_transform(pre), draft_size=pre.resize_size)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    with torch.inference_mode(), autocast:
        # Warm-up on a dummy batch (kernel selection), so the limit is as low as it can be.
        model(torch.zeros(batch_size, 3, pre.crop_size, pre.crop_size, device=device))
        started = time.perf_counter()
        for images, _ in loader:
            model(images.to(device).contiguous(memory_format=torch.channels_last))
        if device.type == "cuda":
            torch.cuda.synchronize()
    return time.perf_counter() - started, "bf16" if bf16 else "fp32"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "datasets" / "hymenoptera"))
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--augment",
        action="store_true",
        help="augment the training images in both loops (then freeze_last cannot be cached)",
    )
    parser.add_argument("--skip-naive", action="store_true", help="only the project's side")
    parser.add_argument("--out", type=Path, help="also write the markdown report here")
    args = parser.parse_args()

    logging.basicConfig(level=logging.WARNING)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    lines = [
        f"- date: {datetime.now().isoformat(timespec='minutes')}",
        f"- machine: {machine()}",
        f"- command: `{' '.join(['python', *sys.argv])}`",
        f"- data: {args.data}, {args.backbone}, {args.epochs} epochs, batch {args.batch_size}, "
        f"augmentation {'on' if args.augment else 'off'}, {args.workers} DataLoader workers",
        f"- load average (1/5/15 min) at start: {load()}",
    ]
    split = make_split(args.data, args.seed)
    n_images = sum(len(split.samples(name)) for name in ("train", "val", "test"))
    limit_s, limit_kind = inference_limit(split, args.backbone, args.batch_size, args.workers)
    print(f"limit: one {limit_kind} inference pass over {n_images} images: {limit_s:.1f} s")

    naive = {}
    if not args.skip_naive:
        for strategy in SEED_STRATEGIES:
            result = run_naive(
                split,
                strategy,
                args.backbone,
                args.epochs,
                args.batch_size,
                augment=args.augment,
                num_workers=args.workers,
                seed=args.seed,
            )
            naive[strategy] = result
            print(f"naive {strategy}: {result.wall_s:.1f} s, test {100 * result.test_acc:.1f}%")

    with tempfile.TemporaryDirectory(prefix="inat-speed-") as tmp:
        config = load_config(
            None,
            data=args.data,
            backbone=args.backbone,
            epochs=args.epochs,
            batch_size=args.batch_size,
            seed=args.seed,
            augment=args.augment,
            num_workers=args.workers,
            output=str(Path(tmp) / "runs"),
            cache_dir=str(Path(tmp) / "cache"),
        )
        started = time.perf_counter()
        result = compare(config, SEED_STRATEGIES, progress=False)
        compare_s = time.perf_counter() - started
        rows = {row["strategy"]: row for row in result.comparison["rows"]}
        # The linear probe alone, without figures and report: empty caches, then filled ones.
        probe_s = {}
        for name, cache in (("cold", "cache-probe"), ("warm", "cache")):
            probe_config = config.model_copy(
                update={"strategy": "freeze_last", "cache_dir": str(Path(tmp) / cache)}
            )
            started = time.perf_counter()
            probe = train(probe_config, split, progress=False, report=False)
            probe_s[name] = time.perf_counter() - started
            print(f"freeze_last alone, {name} caches: {probe_s[name]:.1f} s", flush=True)
        paths = {
            s: (Path(result.comparison_dir) / rows[s]["run_dir"] / "results.json").read_text()
            for s in rows
        }
    speed_paths = {s: json.loads(text)["speed_paths"] for s, text in paths.items()}

    lines.append(f"- load average at end: {load()}")
    lines += [
        "",
        "| strategy | naive (s) | project (s) | speed-up | naive test acc | project test acc "
        "| project speed paths |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    naive_total = sum(r.wall_s for r in naive.values())
    for strategy in SEED_STRATEGIES:
        row, old = rows[strategy], naive.get(strategy)
        sp = speed_paths[strategy]
        lines.append(
            f"| {strategy} | {old.wall_s:.1f} | {row['wall_time_s']:.1f} | "
            f"{old.wall_s / row['wall_time_s']:.1f}x | {100 * old.test_acc:.1f}% | "
            f"{100 * row['test_acc']:.1f}% | images {sp['image_cache']}; "
            f"features {sp['feature_cache']} |"
            if old
            else f"| {strategy} | - | {row['wall_time_s']:.1f} | - | - | "
            f"{100 * row['test_acc']:.1f}% | images {sp['image_cache']}; "
            f"features {sp['feature_cache']} |"
        )
    lines.append(
        f"| **whole comparison** | {naive_total:.1f} | {compare_s:.1f} | "
        + (f"{naive_total / compare_s:.1f}x" if naive else "-")
        + " | | | |"
    )
    first = rows["freeze_last"]["wall_time_s"]
    lines += [
        "",
        f"- limit: one {limit_kind} channels-last inference pass over the {n_images} images, "
        f"decoded from the files: {limit_s:.1f} s",
        f"- freeze_last in the comparison (empty caches: prepares the images and computes the "
        f"features): {first:.1f} s = {first / limit_s:.2f}x the limit",
        f"- freeze_last alone without figures/report, empty caches: {probe_s['cold']:.1f} s = "
        f"{probe_s['cold'] / limit_s:.2f}x the limit",
        f"- freeze_last alone without figures/report, caches filled (a later run): "
        f"{probe_s['warm']:.1f} s = {probe_s['warm'] / limit_s:.2f}x the limit, "
        f"test acc {100 * probe.results['test_acc']:.1f}%",
        "- project wall times include the run directory, checkpoints, figures and report.html; "
        "the whole comparison also scans the data and writes the comparison report",
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.write_text(report)


if __name__ == "__main__":
    main()
