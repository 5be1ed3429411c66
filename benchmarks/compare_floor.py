"""The floor of the augmented comparison: network time alone, per strategy, on this machine.

    PYTHONPATH=src python benchmarks/compare_floor.py --naive-s 198            # naive time given
    PYTHONPATH=src python benchmarks/compare_floor.py --naive-s 198 --clock cpu  # shared machine
    PYTHONPATH=src python benchmarks/compare_floor.py --run-naive --bf16       # all measured here

What it measures: for each of the three strategies ``compare`` runs by default
(freeze_last, freeze_k_percent, freeze_except_bn_and_fc), the network built the way ``compare``
builds it on the CPU (``get_model``, ``apply_strategy`` with --freeze-percent, the
``FineTuneModule`` with frozen BatchNorm held in eval mode, channels-last, the fast depthwise
backward), and, on synthetic normalised batches of --batch-size images at --img-size px:

* seconds per training image of one optimiser step: forward, cross-entropy, backward through
  what that strategy trains (only its trainable parameters require grad), Adam step;
* seconds per evaluation image: forward in eval mode under ``torch.inference_mode``;
* seconds per image of a forward through freeze_k_percent's frozen prefix alone.

Each is the best of --repeats timings of --steps batches after one warm-up batch, the timings
taking turns (so a busy spell of a shared machine slows them alike), in fp32, and also in
bf16 autocast with --bf16 (the faster of the two is the floor's precision). ``--clock cpu``
times by the process's CPU seconds / threads instead of the wall clock: on a shared machine
that is nearer to what the process would take alone, and on a quiet one a lower bound.

The images each strategy must see are counted from the split exactly as ``compare`` makes it
(``split_for_run`` with the seed): training images x epochs, validation images x epochs, test
images once. Their product is the floor: what the comparison would cost if nothing but the
network ran (no decoding, augmentation, loader, metrics, checkpoints, figures). ``naive /
floor`` is the largest speed-up over the naive loop that any pipeline with this network,
precision and these strategies can reach here (--naive-s, or --run-naive to time
``naive_loop.py`` with augmentation in the same process).

The last line says what one shared forward through freeze_k_percent's frozen prefix (the
leading blocks, ``speed.probing.blocks``, with nothing trainable) would save at most if
freeze_last and freeze_k_percent saw the same augmented images per epoch (per-sample seeds
depend on the run seed, epoch and index only): freeze_last's forward through those blocks,
once per training image and epoch, which freeze_k_percent's run computes anyway.
"""

from __future__ import annotations

import inat_finetune  # noqa: F401 - first: sets OpenMP's wait policy before torch loads

# isort: split
import argparse
import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from inat_finetune.experiments.comparison import SEED_STRATEGIES
from inat_finetune.models.backbones import get_model
from inat_finetune.models.freezing import apply_strategy
from inat_finetune.speed.depthwise_grad import use_fast_depthwise_grad
from inat_finetune.speed.probing import blocks
from inat_finetune.tasks.classification import FineTuneModule
from inat_finetune.training.config import load_config
from inat_finetune.training.setup import split_for_run

CLOCK = "wall"  # or "cpu" (--clock): see seconds


@dataclass
class StrategyCost:
    strategy: str
    precision: str
    train_s_per_image: float
    eval_s_per_image: float
    floor_s: float


def seconds(run: Callable[[], None], steps: int) -> float:
    """One timing of ``steps`` calls of ``run``, on the clock ``--clock`` names.

    ``cpu``: the process's CPU seconds divided by torch's threads, i.e. the wall time with
    perfect scaling on that many idle cores. On a shared machine it is closer to what this
    process would take alone (threads sleep while they wait: OMP_WAIT_POLICY=PASSIVE); on a
    quiet one it is a lower bound of the wall time."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        run()
    if CLOCK == "cpu":
        return (time.process_time() - cpu) / torch.get_num_threads()
    return time.perf_counter() - wall


def best_of_interleaved(
    runs: dict[str, Callable[[], None]], steps: int, repeats: int
) -> dict[str, float]:
    """Best of ``repeats`` timings of each run, after one warm-up call each. The runs take turns
    within every repeat, so a busy spell of a shared machine slows them alike."""
    for run in runs.values():
        run()
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, run in runs.items():
            best[name] = min(best[name], seconds(run, steps))
    return best


def build_module(backbone: str, classes: int, strategy: str, freeze_percent: float) -> Any:
    """The module ``compare`` trains for ``strategy`` on the CPU (fp32 weights)."""
    built = get_model(backbone, num_classes=classes)
    summary = apply_strategy(built.model, built.head, strategy, freeze_percent)
    card = {"class_names": [str(i) for i in range(classes)], "preprocessing": {}}
    module = FineTuneModule(built.model, card, frozen_bn="eval", channels_last=True)
    use_fast_depthwise_grad(module.model)
    module.trainable_params = summary.trainable_params
    return module


def autocast(bf16: bool) -> contextlib.AbstractContextManager:
    if bf16:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def step_runs(module: Any, args: argparse.Namespace, bf16: bool) -> dict[str, Callable[[], None]]:
    """One training step and one evaluation forward of ``module`` on a synthetic batch."""
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    labels = torch.randint(0, 2, (args.batch_size,))
    optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=1e-3)

    def train_step() -> None:
        module.train()  # FineTuneModule.train holds frozen BatchNorm in eval mode
        with autocast(bf16):
            loss = nn.functional.cross_entropy(module(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def eval_step() -> None:
        module.eval()
        with torch.inference_mode(), autocast(bf16):
            module(images)

    return {"train": train_step, "eval": eval_step}


def frozen_prefix_blocks(module: Any) -> list[str]:
    """The leading blocks with nothing trainable in them (this strategy's frozen prefix)."""
    leading = []
    for name in blocks(module.model):
        if any(p.requires_grad for p in module.model.get_submodule(name).parameters()):
            break
        leading.append(name)
    return leading


def prefix_run(module: Any, prefix: list[str], args: argparse.Namespace) -> Callable[[], None]:
    """A no-grad forward through ``prefix`` alone, eval-mode BatchNorm (as a frozen prefix runs
    in training)."""
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size).contiguous(
        memory_format=torch.channels_last
    )
    layers = [module.model.get_submodule(name) for name in prefix]

    def forward() -> None:
        module.eval()
        with torch.inference_mode():
            out = images
            for layer in layers:
                out = layer(out)

    return forward


def load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def split_sizes(args: argparse.Namespace) -> tuple[dict[str, int], int]:
    """Train/val/test image counts of the split ``compare`` makes, and the number of classes."""
    config = load_config(None, data=args.data, seed=args.seed, backbone=args.backbone)
    split = split_for_run(config)
    sizes = {
        name: sum(map(len, getattr(split, name).values())) for name in ("train", "val", "test")
    }
    return sizes, len(split.classes)


def naive_seconds(args: argparse.Namespace) -> float:
    """The naive loop's time for the three strategies, given or measured here."""
    if args.naive_s is not None:
        return args.naive_s
    from run_speed import naive_side  # the naive loop as run_speed.py runs it

    from inat_finetune.data.folders import make_split

    split = make_split(args.data, seed=args.seed)
    naive = argparse.Namespace(**vars(args), augment=True, workers=2)
    return sum(result.wall_s for result in naive_side(split, naive).values())


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data", default=str(Path(__file__).resolve().parents[2] / "shared/datasets/hymenoptera")
    )
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--freeze-percent", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--steps", type=int, default=2, help="batches per timing")
    parser.add_argument("--repeats", type=int, default=3, help="timings; the best is kept")
    parser.add_argument("--bf16", action="store_true", help="also time bf16 autocast")
    parser.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall", help="cpu: see seconds()"
    )
    parser.add_argument("--naive-s", type=float, help="the naive loop's seconds, all strategies")
    parser.add_argument("--run-naive", action="store_true", help="measure the naive loop here")
    args = parser.parse_args()
    if args.naive_s is None and not args.run_naive:
        parser.error("give --naive-s SECONDS (the naive loop's time) or --run-naive")
    return args


def measure_all(args: argparse.Namespace, classes: int) -> tuple[dict[str, float], list[str]]:
    """Seconds per image of every strategy's training step and evaluation forward (keys
    ``strategy/precision/train|eval``) and of freeze_k_percent's frozen prefix (``prefix``)."""
    runs: dict[str, Callable[[], None]] = {}
    modules = {}
    for strategy in SEED_STRATEGIES:
        module = build_module(args.backbone, classes, strategy, args.freeze_percent)
        modules[strategy] = module
        for precision in ("fp32", "bf16") if args.bf16 else ("fp32",):
            for kind, run in step_runs(module, args, precision == "bf16").items():
                runs[f"{strategy}/{precision}/{kind}"] = run
    prefix = frozen_prefix_blocks(modules["freeze_k_percent"])
    runs["prefix"] = prefix_run(modules["freeze_last"], prefix, args)
    best = best_of_interleaved(runs, args.steps, args.repeats)
    per_image = {name: value / (args.steps * args.batch_size) for name, value in best.items()}
    return per_image, prefix


def floor_rows(
    per_image: dict[str, float], train_images: int, eval_images: int, bf16: bool
) -> list[StrategyCost]:
    """Each strategy at its faster precision."""
    rows = []
    for strategy in SEED_STRATEGIES:
        options = []
        for precision in ("fp32", "bf16") if bf16 else ("fp32",):
            train_s = per_image[f"{strategy}/{precision}/train"]
            eval_s = per_image[f"{strategy}/{precision}/eval"]
            floor = train_s * train_images + eval_s * eval_images
            print(
                f"  {strategy} {precision}: {1000 * train_s:.2f} ms/train image, "
                f"{1000 * eval_s:.2f} ms/eval image, floor {floor:.1f} s"
            )
            options.append(StrategyCost(strategy, precision, train_s, eval_s, floor))
        rows.append(min(options, key=lambda row: row.floor_s))
    return rows


def main() -> None:
    global CLOCK
    args = parse_args()
    CLOCK = args.clock
    sizes, classes = split_sizes(args)
    print(
        f"{args.backbone}, {args.img_size} px, batch {args.batch_size}, {args.epochs} epochs; "
        f"{sizes['train']}/{sizes['val']}/{sizes['test']} train/val/test images; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock, "
        f"best of {args.repeats} x {args.steps} batches; load {load()}",
        flush=True,
    )
    train_images = sizes["train"] * args.epochs
    eval_images = sizes["val"] * args.epochs + sizes["test"]
    per_image, prefix = measure_all(args, classes)
    print(f"measured; load {load()}")
    rows = floor_rows(per_image, train_images, eval_images, args.bf16)
    naive = naive_seconds(args)
    print()
    print(
        "| strategy | precision | ms / training image (step) | ms / evaluation image | "
        "training images | evaluation images | floor (s) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row.strategy} | {row.precision} | {1000 * row.train_s_per_image:.2f} | "
            f"{1000 * row.eval_s_per_image:.2f} | {train_images} | {eval_images} | "
            f"{row.floor_s:.1f} |"
        )
    total = sum(row.floor_s for row in rows)
    print(f"| **total** | | | | | | **{total:.1f}** |")
    print()
    print(f"naive loop {naive:.1f} s / floor {total:.1f} s = {naive / total:.2f}x at most")
    for target in (4, 5):
        print(f"  {target}x needs the comparison in {naive / target:.1f} s or less")
    saved = per_image["prefix"] * train_images
    print(
        f"shared frozen prefix of freeze_k_percent ({len(prefix)} blocks, {prefix[0]} to "
        f"{prefix[-1]}): {1000 * per_image['prefix']:.2f} ms/image; freeze_last reusing it "
        f"saves at most {saved:.1f} s ({100 * saved / total:.1f}% of the floor): floor "
        f"{total - saved:.1f} s, naive / floor {naive / (total - saved):.2f}x"
    )


if __name__ == "__main__":
    main()
