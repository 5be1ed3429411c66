"""ResNet50 training throughput on one GPU: synthetic tensors against the real data pipeline.

    PYTHONPATH=src python benchmarks/gpu_throughput.py --out benchmarks/gpu_results.md
    PYTHONPATH=src python benchmarks/gpu_throughput.py --smoke     # tiny sizes, runs on a CPU

One command, under 10 minutes on one GPU. It measures training steps (forward, backward, Adam)
in images per second:

* synthetic tensors already on the GPU: the most the GPU can do; fp32 NCHW, fp32
  channels-last, bf16 autocast channels-last;
* the real data pipeline (bf16 channels-last, training augmentation, pinned memory, persistent
  workers) on generated nature-sized JPEGs (800x600, like nature_12K's photos), with 2, 4 and
  all CPU workers (a notebook's and a server's cases): the naive ImageFolder loader (PIL, whole
  JPEG decoded, augmented and normalised in the workers), and the project's loader on the
  prepared-image cache with the augmentation per image in the workers (``--augment-on cpu``)
  and on the batch on the GPU (``--augment-on device``, ``data/batch_augment.py``: the random
  resized crops on the GPU, the default there, or in the workers, the default without one); with all
  workers also the project's loader without the cache (JPEG draft mode, augmented on the GPU).

The gap between the synthetic bf16 row and the pipeline rows is the time the GPU waits for
the CPU; the last column says how much of the synthetic rate each pipeline reaches. The
report is one markdown table, to paste into ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import inat_finetune  # noqa: F401 - first: sets OpenMP's wait policy before torch loads

# isort: split
import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime
from pathlib import Path

import torch
import torchvision
from data_pipeline import photo_like
from naive_loop import naive_transforms
from run_speed import load, machine
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets

from inat_finetune.data.datamodule import FineTuneDataModule
from inat_finetune.data.folders import make_split
from inat_finetune.models.backbones import IMAGENET_PREPROCESSING
from inat_finetune.speed.prepared import prepared_images_for

FULL = dict(img=224, batch=256, warmup=10, steps=40, images=4096, photo=(800, 600), epochs=2)
SMOKE = dict(img=32, batch=2, warmup=1, steps=1, images=8, photo=(200, 150), epochs=1)


def make_model(device: torch.device, channels_last: bool) -> nn.Module:
    model = torchvision.models.resnet50(num_classes=10).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.train()


def step_fn(
    model: nn.Module, device: torch.device, bf16: bool, channels_last: bool, on_device=None
):
    """One training step; ``on_device`` maps each batch once it is on the device (the project's
    loaders hand over uint8 images, normalised there)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    criterion = nn.CrossEntropyLoss()

    def step(images: torch.Tensor, labels: torch.Tensor, *rest: torch.Tensor) -> None:
        # rest: the per-sample augmentation parameters of a batch augmented on the device.
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True) % 10
        rest = tuple(t.to(device, non_blocking=True) for t in rest)
        if on_device is not None:
            images, labels = on_device((images, labels, *rest))
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = criterion(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def worker_counts(cores: int) -> list[int]:
    """2 and 4 workers (a notebook's 2-4 cores) and one per core (a server), as available."""
    return sorted({count for count in (2, 4) if count < cores} | {cores})


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def synthetic(device: torch.device, sizes: dict, bf16: bool, channels_last: bool) -> float:
    model = make_model(device, channels_last)
    step = step_fn(model, device, bf16, channels_last)
    images = torch.randn(sizes["batch"], 3, sizes["img"], sizes["img"], device=device)
    labels = torch.randint(0, 10, (sizes["batch"],), device=device)
    for _ in range(sizes["warmup"]):
        step(images, labels)
    sync(device)
    started = time.perf_counter()
    for _ in range(sizes["steps"]):
        step(images, labels)
    sync(device)
    return sizes["steps"] * sizes["batch"] / (time.perf_counter() - started)


def pipeline(
    device: torch.device, sizes: dict, dataset, workers: int, on_device=None, collate=None
) -> float:
    """Images/s of bf16 channels-last training fed by ``dataset``; the last epoch is timed."""
    model = make_model(device, channels_last=True)
    step = step_fn(model, device, bf16=True, channels_last=True, on_device=on_device)
    loader = DataLoader(
        dataset,
        batch_size=sizes["batch"],
        shuffle=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        drop_last=True,
        collate_fn=collate,
    )
    for _ in range(sizes["epochs"]):
        sync(device)
        started, count = time.perf_counter(), 0
        for batch in loader:
            step(*batch)
            count += len(batch[1])
        sync(device)
        elapsed = time.perf_counter() - started
    return count / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the code on CPU")
    parser.add_argument("--out", type=Path, help="also write the markdown report here")
    args = parser.parse_args()
    sizes = SMOKE if args.smoke else FULL
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.smoke:
        parser.error("no GPU here; --smoke runs the code on the CPU at tiny sizes")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    workers = min(16, cores)  # threads that generate the JPEGs and build the cache
    torch.backends.cudnn.benchmark = True
    lines = [
        f"- date: {datetime.now().isoformat(timespec='minutes')}",
        f"- machine: {machine()}",
        f"- command: `{' '.join(['python', *sys.argv])}`",
        f"- ResNet50 (10 classes), batch {sizes['batch']}, {sizes['img']} px, Adam"
        + (
            "; fp32 = TF32 convolutions (cudnn default), fp32 matmuls"
            if device.type == "cuda"
            else ""
        ),
        f"- load average at start: {load()}",
        "",
        "| input, training augmentation | workers | precision | memory format | images/s "
        "| of synthetic bf16 |",
        "|---|---:|---|---|---:|---:|",
    ]
    rows: list[str] = []
    synthetic_bf16 = 0.0

    def row(text: str) -> None:
        rows.append(text)
        print(text, flush=True)

    def pipeline_row(label: str, count: int, rate: float) -> None:
        row(
            f"| {label} | {count} | bf16 autocast | channels-last | {rate:.0f} "
            f"| {rate / synthetic_bf16:.0%} |"
        )

    for bf16, channels_last in ((False, False), (False, True), (True, True)):
        rate = synthetic(device, sizes, bf16, channels_last)
        synthetic_bf16 = rate if bf16 else synthetic_bf16
        row(
            f"| synthetic tensors on the device, none | - | "
            f"{'bf16 autocast' if bf16 else 'fp32'} | "
            f"{'channels-last' if channels_last else 'NCHW'} | {rate:.0f} | |"
        )
    with tempfile.TemporaryDirectory(prefix="inat-gpu-") as tmp:
        root = Path(tmp) / "data"
        started = time.perf_counter()
        names = [root / f"c{i % 10}" / f"{i}.jpg" for i in range(sizes["images"])]
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(photo_like, names, range(len(names)), [sizes["photo"]] * len(names)))
        generate_s = time.perf_counter() - started
        split = make_split(root, seed=0, val_fraction=0.01, test_fraction=0.01)
        pre = IMAGENET_PREPROCESSING.at_size(sizes["img"])
        started = time.perf_counter()
        store, _ = prepared_images_for(split, pre, cache_dir=str(Path(tmp) / "cache"))
        build_s = time.perf_counter() - started
        everything = split.samples("train") + split.samples("val") + split.samples("test")
        train_tf, _ = naive_transforms(augment=True, size=sizes["img"])
        naive = datasets.ImageFolder(str(root), transform=train_tf)
        photo = f"{sizes['photo'][0]}x{sizes['photo'][1]} JPEGs"
        for count in worker_counts(cores):
            rate = pipeline(device, sizes, naive, count)
            pipeline_row(f"{photo}, naive ImageFolder (PIL), per image", count, rate)
            cases = [
                ("prepared cache", store, "cpu", False),
                ("prepared cache", store, "device", False),
                ("prepared cache", store, "device", True),
            ]
            if count == cores:
                cases.append(("project loader, no cache", None, "device", False))
            for label, image_store, augment_on, crop_in_loader in cases:
                dm = FineTuneDataModule(
                    split,
                    pre,
                    augment=True,
                    image_store=image_store,
                    augment_on=augment_on,
                    crop_in_loader=crop_in_loader,
                )
                dataset = dm.dataset("train")
                dataset.samples = everything
                rate = pipeline(
                    device, sizes, dataset, count, dm.on_after_batch_transfer, dm.train_collate()
                )
                where = "per image"
                if augment_on == "device":
                    crops = "in the workers" if crop_in_loader else "on the GPU"
                    where = f"on the GPU, per batch, crops {crops}"
                pipeline_row(f"{photo}, {label}, {where}", count, rate)
    lines += rows
    lines += [
        "",
        f"- {len(names)} JPEGs generated in {generate_s:.0f} s; prepared cache built in "
        f"{build_s:.1f} s ({len(names) / build_s:.0f} images/s) with {workers} threads",
        f"- DataLoader: pinned memory, persistent workers, training augmentation; the last "
        f"of {sizes['epochs']} epochs is timed",
        f"- load average at end: {load()}",
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.write_text(report)


if __name__ == "__main__":
    main()
