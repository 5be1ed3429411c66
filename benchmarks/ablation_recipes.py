"""Does ``--recipe strong`` beat ``--recipe seed``? Measured on real photographs.

    PYTHONPATH=src python benchmarks/ablation_recipes.py            # the full table (hours on 2 CPUs)
    PYTHONPATH=src python benchmarks/ablation_recipes.py --seeds 0 --datasets hymenoptera \\
        --backbones mobilenet_v2 --variant lpft1=lp_epochs=1 --recipes strong  # one variant

Data (../shared/datasets, next to the repository; never copied into it):

* ``hymenoptera``: ants vs bees. Its ``val/`` is the test set (153 photos); the validation
  set is 20% of ``train/``, carved out once with seed 0 (about 195 train, 48 val).
* ``flowers``: a stratified subset of tf_flowers (5 classes): per class 60 train, 20 val and
  40 test photos drawn once with seed 0, linked into a train/val/test tree in a temp folder.

Every (dataset, backbone, recipe, seed) run uses the same split, the same epoch budget and
image size (overriding both recipes'), and is scored on the test set once, with the checkpoint
chosen on validation accuracy. Seeds vary initialisation, augmentation and batch order. For
``strong`` the same checkpoint is also scored without test-time augmentation, to show what
TTA adds. ``--variant NAME=key=value[;key=value]`` adds a recipe variant (strong plus
overrides), for ablations and for choosing the recipe on validation accuracy.

Every finished run is appended to the ``--raw`` JSON file at once, with the commit it ran at;
``--reuse FILE`` takes runs already in FILE instead of repeating them (hours on 2 CPUs), and
the table's header says how many were reused and from which commits.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"


def flowers_subset(dest: Path, per_class: tuple[int, int, int], seed: int = 0) -> Path:
    """A train/val/test tree of symlinks: per class ``per_class`` photos, drawn with ``seed``."""
    from inat_finetune.data.folders import scan_class_folders

    source = SHARED / "flowers"
    by_class, _ = scan_class_folders(source, source)
    for name, files in sorted(by_class.items()):
        files = sorted(files)
        random.Random(f"{seed}:{name}").shuffle(files)
        start = 0
        for split, count in zip(("train", "val", "test"), per_class, strict=True):
            for rel in files[start : start + count]:
                link = dest / split / name / Path(rel).name
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(source / rel)
            start += count
    return dest


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    import yaml

    name, _, assignments = text.partition("=")
    overrides = {}
    for item in filter(None, assignments.split(";")):
        key, _, value = item.partition("=")
        overrides[key.strip()] = yaml.safe_load(value)
    return name, overrides


def git_commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()

    dirty = git("status", "--porcelain", "--", "src", "benchmarks")
    return git("rev-parse", "--short", "HEAD") + ("-dirty" if dirty else "")


def mean_spread(values: list[float]) -> str:
    if not values:
        return "-"
    mean = 100 * statistics.mean(values)
    if len(values) == 1:
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}"


def markdown(rows: list[dict[str, Any]], recipes: list[str], header: str) -> str:
    """One line per (dataset, backbone); per recipe mean ± sample std over seeds."""
    lines = [header, ""]
    groups = sorted({(r["dataset"], r["backbone"]) for r in rows})
    columns = []
    for recipe in recipes:
        columns.append((recipe, "test_acc", f"{recipe} test"))
        if recipe != "seed":
            columns.append((recipe, "test_acc_no_tta", f"{recipe} test, no TTA"))
        columns.append((recipe, "val_acc", f"{recipe} val"))
    lines.append("| dataset | backbone | " + " | ".join(c[2] for c in columns) + " |")
    lines.append("|---|---|" + "---:|" * len(columns))
    for dataset, backbone in groups:
        cells = []
        for recipe, key, _ in columns:
            values = [
                r[key]
                for r in rows
                if (r["dataset"], r["backbone"], r["recipe"]) == (dataset, backbone, recipe)
                and r.get(key) is not None
            ]
            cells.append(mean_spread(values))
        lines.append(f"| {dataset} | {backbone} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", default="hymenoptera,flowers")
    parser.add_argument("--backbones", default="mobilenet_v2,tf_efficientnet_lite0")
    parser.add_argument("--recipes", default="seed,strong")
    parser.add_argument("--variant", action="append", default=[], help="NAME=key=value;...")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=160)
    parser.add_argument("--per-class", default="60,20,40", help="flowers train,val,test")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "RESULTS_recipes.md")
    parser.add_argument(
        "--raw",
        type=Path,
        default=ROOT / "benchmarks" / "RESULTS_recipes.json",
        help="runs as JSON",
    )
    parser.add_argument("--reuse", type=Path, default=None, help="runs to take from this JSON")
    args = parser.parse_args()

    from inat_finetune.data.folders import make_split
    from inat_finetune.inference.evaluation import evaluate
    from inat_finetune.runfiles import write_json_atomic, write_text_atomic
    from inat_finetune.training.config import load_config
    from inat_finetune.training.run import train

    variants = dict(parse_variant(v) for v in args.variant)
    recipes = [r for r in args.recipes.split(",") if r] + list(variants)
    seeds = [int(s) for s in args.seeds.split(",")]
    per_class = tuple(int(n) for n in args.per_class.split(","))
    work = Path(tempfile.mkdtemp(prefix="ablation-recipes-"))
    data = {
        "hymenoptera": SHARED / "hymenoptera",
        "flowers": flowers_subset(work / "flowers", per_class),  # type: ignore[arg-type]
    }
    splits = {name: make_split(data[name], seed=0) for name in args.datasets.split(",")}
    rows: list[dict[str, Any]] = []
    reusable = {
        (r["dataset"], r["backbone"], r["recipe"], r["seed"]): r
        for r in (json.loads(args.reuse.read_text()) if args.reuse else [])
    }
    commit = git_commit()
    reused = 0
    started = time.time()
    load_before = os.getloadavg()
    total = len(splits) * len(args.backbones.split(",")) * len(recipes) * len(seeds)
    for dataset, split in splits.items():
        for backbone in args.backbones.split(","):
            for recipe in recipes:
                for seed in seeds:
                    if (dataset, backbone, recipe, seed) in reusable:
                        rows.append(reusable[(dataset, backbone, recipe, seed)])
                        reused += 1
                        continue
                    overrides = dict(variants.get(recipe, {}))
                    config = load_config(
                        None,
                        **{
                            "recipe": "strong" if recipe in variants else recipe,
                            "backbone": backbone,
                            "epochs": args.epochs,
                            "img_size": args.img_size,
                            "seed": seed,
                            "num_workers": args.num_workers,
                            "output": str(work / "runs"),
                            "run_name": f"{dataset}-{backbone}-{recipe}-{seed}",
                            **overrides,
                        },
                    )
                    t0 = time.time()
                    result = train(config, split=split, progress=False, report=False)
                    row = {
                        "dataset": dataset,
                        "backbone": backbone,
                        "recipe": recipe,
                        "seed": seed,
                        "test_acc": result.results["test_acc"],
                        "val_acc": result.results["best_val_acc"],
                        "best_epoch": result.results["best_epoch"],
                        "wall_s": round(time.time() - t0, 1),
                        "test_acc_no_tta": None,
                        "commit": commit,
                    }
                    if config.tta != "none":
                        plain = evaluate(
                            result.run_dir, num_workers=args.num_workers, progress=False
                        )
                        row["test_acc_no_tta"] = plain["test_acc"]
                    rows.append(row)
                    write_json_atomic(args.raw, rows)
                    print(json.dumps(row), f"[{len(rows)}/{total}]", flush=True)
    minutes = (time.time() - started) / 60
    command = "PYTHONPATH=src python benchmarks/ablation_recipes.py " + " ".join(sys.argv[1:])
    header = "\n".join(
        [
            "# Recipes on real photos: `seed` versus `strong`",
            "",
            f"Command: `{command.strip()}`  ",
            f"Date: {datetime.now():%Y-%m-%d %H:%M}; {minutes:.0f} min on {os.cpu_count()} CPU "
            f"cores shared with other work (load average {load_before[0]:.1f} at the start, "
            f"{os.getloadavg()[0]:.1f} at the end).  ",
            f"Budget for every recipe: {args.epochs} epochs at {args.img_size} px, batch 32; "
            f"seeds {args.seeds}; test accuracy of the checkpoint with the best validation "
            "accuracy, in %, mean ± sample standard deviation over the seeds.  ",
            "Data: hymenoptera (train/ minus a 20% validation split, seed 0; its val/ is the "
            f"test set) and a flowers subset ({per_class[0]}/{per_class[1]}/{per_class[2]} "
            "train/val/test photos per class, drawn with seed 0).",
        ]
    )
    if reused:
        commits = sorted({r.get("commit", "?") for r in rows})
        header += (
            f"\n\n{reused} of {len(rows)} runs were taken from `{args.reuse}` (an earlier "
            f"invocation); the runs' commits: {', '.join(commits)}. Every run is in `{args.raw}`."
        )
    if variants:
        header += "\n\nVariants (strong plus): " + "; ".join(
            f"`{name}`: {overrides}" for name, overrides in variants.items()
        )
    table = markdown(rows, recipes, header)
    write_text_atomic(args.out, table)
    write_json_atomic(args.raw, rows)
    print(table)


if __name__ == "__main__":
    main()
