"""One command: the naive loop against ``inat-finetune compare``, same process, same data.

    PYTHONPATH=src python benchmarks/run_speed.py            # hymenoptera, mobilenet_v2, 5 epochs
    PYTHONPATH=src python benchmarks/run_speed.py --out benchmarks/last_speed.md

Runs, in this one process, on one split of the same images:

* the naive loop (``naive_loop.py``) for the three strategies of the original write-up;
* the limit, right before the project's side: one bf16 (where supported) channels-last
  inference pass over every image, decoded from the original files by a 2-worker DataLoader,
  of the network as it is (the project's own feature pass folds BatchNorm into the
  convolutions and can beat it);
* the project's ``compare`` for the same strategies, with empty caches in a fresh folder, so
  each strategy pays for preparing the images or computing the features it uses;
* ``freeze_last`` alone without figures and report (the linear probe itself), once with empty
  caches and once with the comparison's filled caches, as a later run would.

It prints per-strategy wall time and test accuracy of both, the speed-ups, and ``freeze_last``
against the limit. The machine may be shared, so everything is repeated (``--repeats``,
default 2, alternating which side goes first) and the fastest time of each is kept; every
repeat's figures and the load average are printed too.
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
from typing import Any

import torch
from naive_loop import run_naive
from torch.utils.data import DataLoader

from inat_finetune.data.datamodule import ImageListDataset, build_eval_transform
from inat_finetune.data.folders import make_split
from inat_finetune.experiments.comparison import SEED_STRATEGIES, compare
from inat_finetune.models.backbones import get_model
from inat_finetune.runtime.hardware import cpu_supports_bf16
from inat_finetune.training.config import load_config
from inat_finetune.training.run import train

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


def naive_side(split: Any, args: argparse.Namespace) -> dict[str, Any]:
    results = {}
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
        results[strategy] = result
        print(f"naive {strategy}: {result.wall_s:.1f} s, test {100 * result.test_acc:.1f}%")
    return results


def project_side(split: Any, args: argparse.Namespace) -> dict[str, Any]:
    limit_s, kind = inference_limit(split, args.backbone, args.batch_size, args.workers)
    print(f"limit: one {kind} inference pass: {limit_s:.1f} s", flush=True)
    with tempfile.TemporaryDirectory(prefix="inat-speed-") as tmp:
        config = load_config(
            None,
            data=args.data,
            backbone=args.backbone,
            epochs=args.epochs,
            batch_size=args.batch_size,
            seed=args.seed,
            augment=args.augment,
            # The project sizes its own DataLoader workers unless --project-workers is given.
            num_workers=args.project_workers,
            output=str(Path(tmp) / "runs"),
            cache_dir=str(Path(tmp) / "cache"),
        )
        started = time.perf_counter()
        result = compare(config, SEED_STRATEGIES, progress=False)
        compare_s = time.perf_counter() - started
        rows = {row["strategy"]: row for row in result.comparison["rows"]}
        for strategy, row in rows.items():
            row["results"] = json.loads(
                (result.comparison_dir / row["run_dir"] / "results.json").read_text()
            )
            print(f"project {strategy}: {row['wall_time_s']:.1f} s, test {row['test_acc']:.3f}")
        # The linear probe alone, without figures and report: empty caches, then filled ones.
        alone = {}
        for name, cache in (("cold", "cache-probe"), ("warm", "cache")):
            probe_config = config.model_copy(
                update={"strategy": "freeze_last", "cache_dir": str(Path(tmp) / cache)}
            )
            started = time.perf_counter()
            train(probe_config, split, progress=False, report=False)
            alone[name] = time.perf_counter() - started
            print(f"freeze_last alone, {name} caches: {alone[name]:.1f} s", flush=True)
    return {"limit_s": limit_s, "kind": kind, "rows": rows, "total_s": compare_s, "alone": alone}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "datasets" / "hymenoptera"))
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--workers", type=int, default=2, help="the naive loop's and the limit's")
    parser.add_argument(
        "--project-workers", type=int, default=None, help="default: the project's own choice"
    )
    parser.add_argument("--repeats", type=int, default=2, help="best of N, sides alternating")
    parser.add_argument(
        "--augment",
        action="store_true",
        help="augment the training images in both loops (then freeze_last cannot be cached)",
    )
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
        f"augmentation {'on' if args.augment else 'off'}, {args.workers} DataLoader workers for "
        "the naive loop and the limit, "
        + (f"{args.project_workers}" if args.project_workers is not None else "the default")
        + " for the project, "
        f"best of {args.repeats} repeats",
    ]
    split = make_split(args.data, args.seed)
    n_images = sum(len(split.samples(name)) for name in ("train", "val", "test"))
    naive_runs, project_runs, raw = [], [], []
    for repeat in range(args.repeats):
        at_start = load()
        sides = [("naive", naive_side), ("project", project_side)]
        for name, side in sides if repeat % 2 == 0 else sides[::-1]:
            (naive_runs if name == "naive" else project_runs).append(side(split, args))
        n, p = naive_runs[-1], project_runs[-1]
        raw.append(
            f"- repeat {repeat + 1} ({'naive' if repeat % 2 == 0 else 'project'} first; load "
            f"{at_start} at start, {load()} at end): naive "
            + " / ".join(f"{n[s].wall_s:.1f}" for s in SEED_STRATEGIES)
            + f" = {sum(r.wall_s for r in n.values()):.1f} s; project "
            + " / ".join(f"{p['rows'][s]['wall_time_s']:.1f}" for s in SEED_STRATEGIES)
            + f" (whole comparison {p['total_s']:.1f} s); limit {p['limit_s']:.1f} s; "
            f"freeze_last alone {p['alone']['cold']:.1f} s with empty caches "
            f"({p['alone']['cold'] / p['limit_s']:.2f}x the limit), "
            f"{p['alone']['warm']:.1f} s with filled ones"
        )
        print(raw[-1], flush=True)

    def best_naive(strategy: str) -> Any:
        return min((run[strategy] for run in naive_runs), key=lambda r: r.wall_s)

    def best_row(strategy: str) -> dict[str, Any]:
        return min((run["rows"][strategy] for run in project_runs), key=lambda r: r["wall_time_s"])

    naive_total = min(sum(r.wall_s for r in run.values()) for run in naive_runs)
    project_total = min(run["total_s"] for run in project_runs)
    lines += [
        "",
        "| strategy | naive (s) | project (s) | speed-up | naive test acc | project test acc "
        "| project speed paths |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for strategy in SEED_STRATEGIES:
        old, row = best_naive(strategy), best_row(strategy)
        paths = row["results"]["speed_paths"]
        lines.append(
            f"| {strategy} | {old.wall_s:.1f} | {row['wall_time_s']:.1f} | "
            f"{old.wall_s / row['wall_time_s']:.1f}x | {100 * old.test_acc:.1f}% | "
            f"{100 * row['test_acc']:.1f}% | images {paths['image_cache']}; "
            f"features {paths['feature_cache']}; {paths.get('workers')} workers |"
        )
    lines.append(
        f"| **whole comparison** | {naive_total:.1f} | {project_total:.1f} | "
        f"{naive_total / project_total:.1f}x | | | |"
    )
    best = min(project_runs, key=lambda run: run["alone"]["cold"] / run["limit_s"])
    first = min(project_runs, key=lambda run: run["rows"]["freeze_last"]["wall_time_s"])
    kind = best["kind"]
    lines += [
        "",
        f"- limit: one {kind} channels-last inference pass over the {n_images} images, decoded "
        "from the files (measured right before each project side): "
        + ", ".join(f"{run['limit_s']:.1f} s" for run in project_runs),
        f"- freeze_last alone (no figures/report), empty caches: {best['alone']['cold']:.1f} s "
        f"= {best['alone']['cold'] / best['limit_s']:.2f}x the limit measured next to it "
        f"({best['limit_s']:.1f} s); with the caches filled (a later run): "
        f"{best['alone']['warm']:.1f} s",
        f"- freeze_last inside the comparison (empty caches, with figures and report): "
        f"{first['rows']['freeze_last']['wall_time_s']:.1f} s",
        "- project wall times include the run directory, checkpoints, figures and report.html; "
        "the whole comparison also scans the data and writes the comparison report. "
        "fit (training + validation) / test / everything else, fastest repeat: "
        + ", ".join(
            f"{s} {best_row(s)['results']['train_time_s']:.1f} / "
            f"{best_row(s)['results']['test_time_s']:.1f} / "
            f"{best_row(s)['wall_time_s'] - best_row(s)['results']['train_time_s'] - best_row(s)['results']['test_time_s']:.1f} s"
            for s in SEED_STRATEGIES
        ),
        "",
        *raw,
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.write_text(report)


if __name__ == "__main__":
    main()
