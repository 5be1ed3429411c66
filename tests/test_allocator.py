"""Freed memory kept for reuse during a CPU run: fewer page faults inside, memory given back after."""

from __future__ import annotations

import json
import platform
import resource
import subprocess
import sys

import numpy as np
import pytest
from torch.utils.data import DataLoader, Dataset

from inat_finetune.data.datamodule import FineTuneDataModule
from inat_finetune.data.folders import make_split
from inat_finetune.models.backbones import IMAGENET_PREPROCESSING
from inat_finetune.runtime.allocator import freed_memory_kept, keep_freed_memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
PAGES = 64 * 2**20 // 4096  # of one 64 MiB block, above glibc's largest mmap threshold

# Run in a fresh process, so glibc starts from its own defaults whatever other tests did.
PROBE = """
import json, resource, sys
import torch
from inat_finetune.runtime.allocator import freed_memory_kept

def faults(count):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(count):
        torch.ones(64 * 2**20, dtype=torch.uint8).add_(1)  # allocated, touched, freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

def resident():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()

with freed_memory_kept(sys.argv[1] == "on") as how:
    faults(1)  # the first block grows the heap
    inside = faults(8)
    held = [torch.ones(64 * 2**20, dtype=torch.uint8) for _ in range(8)]
    del held
    peak = resident()
print(json.dumps({"how": how, "faults": inside, "peak": peak, "after": resident()}))
"""


def _probe(setting: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, setting], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="the allocator settings are glibc's (Linux)")
def test_freed_blocks_are_reused_inside_and_memory_given_back_after():
    on, off = _probe("on"), _probe("off")
    assert (on["how"], off["how"]) == ("freed memory reused (glibc)", "default")
    # glibc's default: every 64 MiB block is mapped afresh and faulted in page by page.
    assert off["faults"] > 7 * PAGES, off
    # Kept: the freed block is reused, at most a block or two faulted in over the 8.
    assert on["faults"] < 3 * PAGES, on
    # Given back when the block ends: the 512 MiB held at the peak went back to the system.
    assert on["peak"] - on["after"] > 6 * 64 * 2**20, on


def test_off_or_elsewhere_changes_nothing(monkeypatch):
    with freed_memory_kept(enabled=False) as how:
        assert how == "default"
    monkeypatch.setattr(platform, "libc_ver", lambda: ("musl", ""))
    with freed_memory_kept() as how:
        assert how == "default (not glibc)"


class BatchOfPreparedImages(Dataset):
    """Page faults of a worker that copies 32 prepared images (256x341) and frees them, 4 times."""

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> list[int]:
        source = np.full(3 * 256 * 341, 7, np.uint8)
        [source.copy() for _ in range(32)]  # the first batch grows the heap
        counts = []
        for _ in range(4):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            batch = [source.copy() for _ in range(32)]
            del batch
            counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        return counts


@pytest.mark.skipif(not GLIBC, reason="the allocator settings are glibc's (Linux)")
def test_loader_workers_keep_freed_memory(image_folder):
    def worker_faults(init) -> int:
        loader = DataLoader(
            BatchOfPreparedImages(), batch_size=None, num_workers=1, worker_init_fn=init
        )
        return sum(next(iter(loader)))

    pages = 4 * 32 * 3 * 256 * 341 // 4096
    # glibc's default trims the freed heap, and the next batch is faulted in again.
    assert worker_faults(None) > pages / 4
    assert worker_faults(keep_freed_memory) < pages / 50
    # The project's loaders start their workers so.
    dm = FineTuneDataModule(make_split(image_folder({"a": 4, "b": 4})), IMAGENET_PREPROCESSING)
    assert dm.train_dataloader().worker_init_fn is keep_freed_memory
    assert dm.test_dataloader().worker_init_fn is keep_freed_memory
