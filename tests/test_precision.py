"""Speed paths chosen by the hardware: bf16 only where it is computed natively; DataLoader workers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from inat_finetune.runtime import hardware
from inat_finetune.runtime.hardware import (
    cpu_supports_bf16,
    resolve_channels_last,
    resolve_precision,
)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ("fpu sse avx2 avx512f avx512bw", False),  # AVX-512 without its bf16 extension
        ("fpu sse avx2 avx512f avx512_bf16", True),
        ("fpu sse avx2 amx_tile amx_bf16", True),
        ("fp asimd", False),  # an Arm CPU
    ],
)
def test_cpu_bf16_support_is_read_from_the_cpu_flags(monkeypatch, flags, expected):
    real_read_text = Path.read_text

    def fake_read_text(self, *args, **kwargs):
        if str(self) == "/proc/cpuinfo":
            return f"processor\t: 0\nflags\t\t: {flags}\n"
        return real_read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", fake_read_text)
    assert cpu_supports_bf16() is expected


def test_no_cpuinfo_means_no_bf16(monkeypatch):
    def unreadable(self, *args, **kwargs):
        raise OSError("no /proc here")

    monkeypatch.setattr(Path, "read_text", unreadable)
    assert cpu_supports_bf16() is False


def test_bf16_is_not_used_where_unsupported(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_supports_bf16", lambda: False)
    assert resolve_precision("auto", "cpu") == "32-true"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("auto", "cuda") == "16-mixed"  # e.g. a V100 or T4: fp16, not bf16
    assert resolve_precision("auto", "mps") == "32-true"


def test_bf16_is_used_where_supported(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_supports_bf16", lambda: True)
    assert resolve_precision("auto", "cpu") == "bf16-mixed"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", "cuda") == "bf16-mixed"


def test_explicit_choices_override_the_automatic_ones(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_supports_bf16", lambda: True)
    assert resolve_precision("32-true", "cpu") == "32-true"
    assert resolve_channels_last(None, "cpu") is True
    assert resolve_channels_last(None, "mps") is False
    assert resolve_channels_last(False, "cuda") is False


@pytest.mark.parametrize(
    ("cores", "accelerator", "prepared", "expected"),
    [
        (2, "cpu", True, 0),  # the CPU computes and a prepared image is a memory copy
        (2, "cpu", False, 2),  # decoding JPEGs in workers overlaps with the network
        (2, "cuda", True, 2),  # the GPU computes: the CPU cores are free to load
        (16, "cpu", True, 8),
        (64, "cuda", False, 8),
    ],
)
def test_default_workers_are_sized_to_the_machine(
    monkeypatch, cores, accelerator, prepared, expected
):
    from inat_finetune.data import datamodule as data

    monkeypatch.setattr(data, "cpu_cores", lambda: cores)
    assert data.default_num_workers(accelerator, prepared) == expected
