"""Milliseconds per step of one ``BatchAugment`` call (``data/batch_augment.py``, seed policy).

    PYTHONPATH=src python benchmarks/batch_augment_steps.py            # one thread, 10 calls
    PYTHONPATH=src python benchmarks/batch_augment_steps.py --threads 2 --calls 20

A batch of 32 stored 256x341 uint8 images (as the prepared-image cache holds 4:3 photos for
224-px presets) with parameters drawn as the loader draws them, cropped to 224 px; the steps
are timed in turn, interleaved, and the fastest and the median of ``--calls`` are printed: on
a shared machine the fastest is the least disturbed.
"""

from __future__ import annotations

import inat_finetune  # noqa: F401 - first: sets OpenMP's wait policy before torch loads

# isort: split
import argparse
import statistics
import time

import torch

from inat_finetune.data import batch_augment as ba
from inat_finetune.data.datamodule import ToNormalisedFloat
from inat_finetune.models.backbones import IMAGENET_PREPROCESSING as PRE
from inat_finetune.runtime.allocator import keep_freed_memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calls", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as inside train on a CPU
    torch.manual_seed(0)
    draw = ba.DrawParams(PRE.resize_size, PRE.interpolation_mode)
    stored = [torch.randint(0, 256, (3, 256, 341), dtype=torch.uint8) for _ in range(32)]
    images, _, params = ba.collate_padded([(draw(image), 0) for image in stored])
    rows, size, floats = params.tolist(), PRE.crop_size, params.float()
    canvas, means = ba.resized_crops(images, rows, size, PRE.interpolation_mode)
    augment = ba.BatchAugment(size, PRE.interpolation_mode, ToNormalisedFloat(PRE.mean, PRE.std))
    steps = {
        "resized_crops (canvas included)": lambda: ba.resized_crops(
            images, rows, size, PRE.interpolation_mode
        ),
        "jitter_and_rotate (flip, jitter, rotation, normalisation)": lambda: ba.jitter_and_rotate(
            canvas, means, floats, size, PRE.mean, PRE.std
        ),
        "  of which flip_rotation_index": lambda: ba.flip_rotation_index(
            floats, size, ba.margin_for(size)
        ),
        "  of which colour_matrices": lambda: ba.colour_matrices_of(
            floats, means, PRE.mean, PRE.std
        ),
        "whole call": lambda: augment(images, params),
    }
    times: dict[str, list[float]] = {name: [] for name in steps}
    for step in steps.values():
        step()  # warm
    for _ in range(args.calls):
        for name, step in steps.items():
            started = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - started)
    print(f"| step ({args.threads} thread(s), batch 32) | fastest (ms) | median (ms) |")
    print("|---|---:|---:|")
    for name, measured in times.items():
        print(f"| {name} | {min(measured) * 1000:.1f} | {statistics.median(measured) * 1000:.1f} |")


if __name__ == "__main__":
    main()
