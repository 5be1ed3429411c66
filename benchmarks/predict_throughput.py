"""Images per second of ``inat-finetune predict`` on a folder of generated JPEGs, on a --device.

    PYTHONPATH=src python benchmarks/predict_throughput.py                  # auto: the GPU if any
    PYTHONPATH=src python benchmarks/predict_throughput.py --device cpu --images 64 --size 320x240
    PYTHONPATH=src python benchmarks/predict_throughput.py --device cuda --backbone resnet50 \\
        --images 2048 --batch-size 128 --out predict_gpu.md

Writes ``--images`` photo-like JPEGs (``data_pipeline.photo_like``: gradients, shapes and grain,
quality 90) of ``--size`` into a temporary folder and a checkpoint of ``--backbone`` with
random weights (the weights do not change the arithmetic, and nothing is downloaded), then
times ``predict_paths`` over the folder, the function the ``predict`` command runs: the
loader workers decode and crop on the CPU, hand uint8 batches over (pinned for a GPU), and the
device normalises and classifies them with the precision it computes natively. The
checkpoint is loaded once, outside the timing; one untimed pass warms the page cache, the
workers' start and the GPU's kernels, then passes repeat for at least ``--seconds`` and the
mean rate is reported with the machine, the load average, and the settings.
"""

from __future__ import annotations

import inat_finetune  # noqa: F401 - first: sets OpenMP's wait policy before torch loads

# isort: split
import argparse
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import torch
from data_pipeline import photo_like
from run_speed import load, machine

from inat_finetune.inference.predict import Predictor, predict_paths
from inat_finetune.models.backbones import get_model
from inat_finetune.models.checkpoints import CARD_KEY


def write_checkpoint(path: Path, backbone: str, classes: int, img_size: int | None) -> Path:
    built = get_model(backbone, num_classes=classes, weights=None)
    card = {
        "backbone": backbone,
        "class_names": [f"class_{i}" for i in range(classes)],
        "head": built.head,
        "preprocessing": built.preprocessing.at_size(img_size).to_dict(),
        "strategy": "none",
    }
    state = {f"model.{k}": v for k, v in built.model.state_dict().items()}
    torch.save({"state_dict": state, CARD_KEY: card}, path)
    return path


def images_per_second(predictor: Predictor, folder: Path, args: argparse.Namespace) -> float:
    def one_pass() -> int:
        report = predict_paths(
            predictor,
            [folder],
            top_k=5,
            batch_size=args.batch_size,
            tta=args.tta,
            progress=False,
            num_workers=args.workers,
        )
        if predictor.device.type == "cuda":
            torch.cuda.synchronize()
        return len(report.predictions)

    one_pass()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < args.seconds or done == 0:
        done += one_pass()
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--img-size", type=int, default=None, help="crop size (default: 224)")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", default="800x600", help="the JPEGs' width x height")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=None, help="default: predict's own")
    parser.add_argument("--tta", default="none", help="none, flip or multicrop")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=None, help="also write the report here")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))

    load_before = load()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        for i in range(args.images):
            photo_like(folder / f"{i:05d}.jpg", i, (width, height))
        ckpt = write_checkpoint(Path(tmp) / "model.ckpt", args.backbone, 10, args.img_size)
        predictor = Predictor.from_checkpoint(ckpt, device=args.device)
        rate = images_per_second(predictor, folder, args)
    precision = str(predictor.autocast_dtype or torch.float32).removeprefix("torch.")
    lines = [
        f"## predict throughput ({datetime.now():%Y-%m-%d %H:%M})",
        "",
        f"- machine: {machine()}; load average {load_before} -> {load()}",
        f"- command: `{' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}`",
        f"- {args.backbone} at {predictor.preprocessing.crop_size} px on {predictor.device} "
        f"({precision}), {args.images} JPEGs of {width}x{height}, batch {args.batch_size}, "
        f"workers {args.workers if args.workers is not None else 'default'}, tta {args.tta}",
        "",
        f"**{rate:.1f} images/s**",
        "",
    ]
    report = "\n".join(lines)
    print(report)
    if args.out is not None:
        args.out.write_text(report)


if __name__ == "__main__":
    main()
