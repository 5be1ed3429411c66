"""Test accuracy with the training augmentation: the naive loop against both augmentation paths.

    PYTHONPATH=src python benchmarks/augment_accuracy.py --seeds 0,1,2   # about 40 min, 2 cores

Issue 20 asks the augmented comparison's ``freeze_last`` and ``freeze_except_bn_and_fc`` to be
within 2 points of the naive loop's test accuracy, and ``freeze_k_percent`` judged on the mean
of three seeds. One seed moves these figures by several points (the seed picks the split as
well as the initialisation and the augmentation), so this runs, for every seed, the naive loop
(``naive_loop.py``: per-image torchvision v1 augmentation in 2 workers) and ``inat-finetune
compare`` once with each ``--augment-on`` (``device``: the batch path, the default; ``cpu``:
the per-image path), and prints each run's test accuracy and the means. Only accuracy is
reported: timings are ``run_speed.py --augment``'s job, in a quiet window.
"""

from __future__ import annotations

import inat_finetune  # noqa: F401 - first: sets OpenMP's wait policy before torch loads

# isort: split
import argparse
import logging
import statistics
import sys
import tempfile
from datetime import datetime
from pathlib import Path

from naive_loop import run_naive

from inat_finetune.data.folders import make_split
from inat_finetune.experiments.comparison import SEED_STRATEGIES, compare
from inat_finetune.training.config import load_config

REPO = Path(__file__).resolve().parents[1]
SIDES = ("naive", "device", "cpu")
# The naive loop cropping from the photo resized to the project's stored size (256 px), and
# the project keeping its frozen BatchNorm layers in training mode as the naive loop does.
STORED, BN_TRAIN = "naive-from-256", "device-bn-train"


def project_accuracy(
    data: str, args: argparse.Namespace, seed: int, augment_on: str, frozen_bn: str = "eval"
) -> dict:
    """``compare`` on the seed's split, fresh caches; test accuracy per strategy."""
    with tempfile.TemporaryDirectory(prefix="inat-augacc-") as tmp:
        config = load_config(
            None,
            data=data,
            backbone=args.backbone,
            epochs=args.epochs,
            batch_size=args.batch_size,
            seed=seed,
            augment=True,
            augment_on=augment_on,
            frozen_bn=frozen_bn,
            output=str(Path(tmp) / "runs"),
            cache_dir=str(Path(tmp) / "cache"),
        )
        result = compare(config, args.strategies, progress=False)
        return {row["strategy"]: row["test_acc"] for row in result.comparison["rows"]}


def naive_accuracy(data: str, args: argparse.Namespace, seed: int, crop_from=None) -> dict:
    split = make_split(data, seed)
    return {
        strategy: run_naive(
            split,
            strategy,
            args.backbone,
            args.epochs,
            args.batch_size,
            augment=True,
            seed=seed,
            crop_from=crop_from,
        ).test_acc
        for strategy in args.strategies
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "datasets" / "hymenoptera"))
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument(
        "--sides", default=",".join(SIDES), help=f"any of {','.join(SIDES)},{STORED},{BN_TRAIN}"
    )
    parser.add_argument("--strategies", default=",".join(SEED_STRATEGIES))
    args = parser.parse_args()
    args.strategies = args.strategies.split(",")
    logging.basicConfig(level=logging.WARNING)
    seeds = [int(s) for s in args.seeds.split(",")]
    sides = args.sides.split(",")
    acc: dict[str, dict[str, list[float]]] = {s: {k: [] for k in args.strategies} for s in sides}
    print(f"- {datetime.now().isoformat(timespec='minutes')}: python {' '.join(sys.argv)}")
    for seed in seeds:
        for side in sides:
            if side == "naive":
                row = naive_accuracy(args.data, args, seed)
            elif side == STORED:
                row = naive_accuracy(args.data, args, seed, crop_from=256)
            elif side == BN_TRAIN:
                row = project_accuracy(args.data, args, seed, "device", frozen_bn="train")
            else:
                row = project_accuracy(args.data, args, seed, side)
            for strategy, value in row.items():
                acc[side][strategy].append(100 * value)
            print(
                f"seed {seed} {side}: " + ", ".join(f"{s} {100 * v:.1f}%" for s, v in row.items()),
                flush=True,
            )
    print("\n| strategy | " + " | ".join(sides) + " |")
    print("|---|" + "---:|" * len(sides))
    for strategy in args.strategies:
        cells = [
            f"{statistics.mean(acc[s][strategy]):.1f} ("
            + ", ".join(f"{v:.1f}" for v in acc[s][strategy])
            + ")"
            for s in sides
        ]
        print(f"| {strategy} | " + " | ".join(cells) + " |")
    print(f"\nmean test accuracy over seeds {args.seeds} (each seed's value in brackets)")


if __name__ == "__main__":
    main()
