"""Which device inference runs on: ``--device auto|cpu|cuda|cuda:N|mps``, resolved once.

``predict``, ``evaluate``, ``serve``, ``export``'s parity check and the Python API's
``load(device=)`` all ask ``resolve_device``:

* ``auto``: the first CUDA GPU if there is one, else Apple's MPS if there is one, else the CPU
  (the same order as ``resolve_accelerator``, so inference picks what training would).
* ``cpu``, ``mps``, ``cuda`` (the current CUDA device, normally 0) or ``cuda:N``.

A device that is not there is one ``UserError`` line naming the option and the devices this
machine has, never a torch traceback halfway through loading a checkpoint. The arithmetic on
the chosen device (bf16 or fp16 autocast where it computes it natively) is
``hardware.resolve_precision``'s decision, given ``device.type``.
"""

from __future__ import annotations

import re

import torch

from inat_finetune.errors import UserError

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"


def mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend and backend.is_available())


def available_devices() -> list[str]:
    """The devices this machine offers, in ``--device`` spelling: cpu, cuda:0..., mps."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if mps_available():
        found.append("mps")
    return found


def _named(option: str, value: str) -> str:
    """``--device cuda`` on the command line, ``device='cuda'`` for a keyword (``device=``)."""
    return f"{option}{value!r}" if option.endswith("=") else f"{option} {value}"


def _missing(spec: str, option: str) -> UserError:
    return UserError(
        f"{_named(option, spec)}: this machine has no such device; it has "
        f"{', '.join(available_devices())} (pass one of those, or {_named(option, 'auto')})"
    )


def parse_device(spec: str, option: str = "--device") -> torch.device:
    """``spec`` as a torch device, without checking that it exists; UserError if malformed."""
    text = spec.strip().lower()
    match = re.fullmatch(r"(cpu|mps|cuda)(?::(\d+))?", text)
    if match is None or (match.group(2) is not None and match.group(1) != "cuda"):
        raise UserError(
            f"{_named(option, spec)}: not a device; use {DEVICE_CHOICES} (N: the GPU number)"
        )
    kind, index = match.groups()
    return torch.device(kind, int(index)) if index is not None else torch.device(kind)


def resolve_device(spec: str | torch.device = "auto", option: str = "--device") -> torch.device:
    """The device to run on; ``option`` names the setting in the error (``device=`` in the API)."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    if spec.strip().lower() == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("mps") if mps_available() else torch.device("cpu")
    device = parse_device(spec, option)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise _missing(spec, option)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise _missing(spec, option)
    if device.type == "mps" and not mps_available():
        raise _missing(spec, option)
    return device


def lightning_devices(device: torch.device) -> tuple[str, list[int] | int]:
    """Lightning's ``(accelerator, devices)`` for one resolved device."""
    if device.type == "cuda":
        return "cuda", [device.index if device.index is not None else 0]
    return device.type, 1
