"""Freed memory kept for reuse during a CPU run: fewer page faults inside, memory given back after."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from inat_finetune.allocator import freed_memory_kept

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
PAGES = 64 * 2**20 // 4096  # of one 64 MiB block, above glibc's largest mmap threshold

# Run in a fresh process, so glibc starts from its own defaults whatever other tests did.
PROBE = """
import json, resource, sys
import torch
from inat_finetune.allocator import freed_memory_kept

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
