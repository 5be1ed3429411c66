"""What the machine offers, resolved once: accelerator, precision, memory layout.

``auto`` settings become concrete ones here and nowhere else: training, evaluation, predict and
serve all ask these functions, so a checkpoint is used with the arithmetic the hardware does
natively (bf16 autocast where the CPU or GPU computes it, fp32 where it does not).
"""

from __future__ import annotations

from pathlib import Path

import torch


def cpu_supports_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_accelerator(accelerator: str) -> str:
    if accelerator != "auto":
        return accelerator
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_precision(precision: str, accelerator: str) -> str:
    """bf16 autocast where the hardware computes it natively, fp32 where it does not."""
    if precision != "auto":
        return precision
    if accelerator == "cuda":
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    if accelerator == "cpu" and cpu_supports_bf16():
        return "bf16-mixed"
    return "32-true"


def resolve_channels_last(channels_last: bool | None, accelerator: str) -> bool:
    return accelerator in ("cuda", "cpu") if channels_last is None else channels_last
