"""Freed memory kept for reuse during a CPU run, given back when it ends (glibc only).

PyTorch's CPU tensors come from ``malloc``. glibc serves large requests (above 128 KiB, rising
to at most 32 MiB as it adapts) with fresh ``mmap`` pages and unmaps them on ``free``, so every
activation larger than that, allocated anew in every step, is zero-filled page by page by the
kernel on first touch. MobileNetV2's 112-px activations for a batch of 32 are 77 MB in bf16:
a three-strategy comparison on hymenoptera page-faults 2.6-3.5 million times, 7-8 s of system
time on 2 cores. With ``mmap`` off and the heap never trimmed during the run, freed blocks are
reused instead: 0.7 million faults, under 4 s, and the comparison about 5% faster
(``benchmarks/cpu_probes.py allocator``). The price is that the process keeps its peak memory
until the run ends; then the heap is trimmed (``malloc_trim``) and the settings go to the
values glibc itself adapts to once it has seen a 32 MiB block freed, and stay there: glibc has
no way back to adapting after ``mallopt``, so later work in the same process keeps them.

CUDA runs are left alone (PyTorch caches GPU memory itself), and so are other C libraries.

DataLoader workers keep freed memory for their whole life, on every machine
(``keep_freed_memory``, their ``worker_init_fn``): a worker allocates the same few
image-sized buffers for every image, and a prepared image's 260 KB copy otherwise costs more
in page faults (fresh pages each time) than in copying.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import platform
from collections.abc import Iterator

log = logging.getLogger(__name__)


# From glibc's malloc.h.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4


NEVER_TRIM = 2**31 - 1  # mallopt takes an int: the largest one, 2 GiB of free heap kept


# What glibc adapts to after a free of >= 32 MiB: mmap threshold at its 32 MiB maximum (64-bit),
# trim threshold twice that; and its default cap on the number of mmapped blocks.
ADAPTED = {M_MMAP_THRESHOLD: 32 * 2**20, M_TRIM_THRESHOLD: 64 * 2**20, M_MMAP_MAX: 65536}


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


def _keep(libc: ctypes.CDLL) -> None:
    settings = {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: NEVER_TRIM}
    if not all([libc.mallopt(option, value) for option, value in settings.items()]):
        log.debug("glibc refused the allocator settings; running with its defaults")


def keep_freed_memory(worker_id: int = 0) -> None:
    """``worker_init_fn`` of the project's DataLoaders: this process keeps freed memory."""
    libc = _glibc()
    if libc is not None:
        _keep(libc)


@contextlib.contextmanager
def freed_memory_kept(enabled: bool = True) -> Iterator[str]:
    """Within the block, glibc keeps freed memory for reuse; yields what was done, in words."""
    libc = _glibc() if enabled else None
    if libc is None:
        yield "default" if not enabled else "default (not glibc)"
        return
    _keep(libc)
    try:
        yield "freed memory reused (glibc)"
    finally:
        for option, value in ADAPTED.items():
            libc.mallopt(option, value)
        libc.malloc_trim(0)
