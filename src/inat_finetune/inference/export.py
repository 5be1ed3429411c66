"""Export a checkpoint for other runtimes: ONNX or TorchScript, plus ``preprocessing.json``.

The exported network takes a float32 batch ``images`` of shape (N, 3, H, W), N free, already
preprocessed, and returns ``logits`` (N, classes). ``preprocessing.json`` beside it says how
to get from a photo to that batch (resize, centre crop, scale to [0, 1], normalise) and what
the outputs mean, so a program in any language can use the model without this package.

Every export is run once against PyTorch on a random batch before it is written: a model
file that is on disk computes what the checkpoint computes (max abs difference on logits at
most ``TOLERANCE``), or there is no file.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from inat_finetune.errors import UserError
from inat_finetune.inference.evaluation import find_checkpoint, load_checkpoint
from inat_finetune.runfiles import atomic_write, write_json_atomic
from inat_finetune.runtime.devices import resolve_device

FORMATS = ("onnx", "torchscript")


MODEL_FILES = {"onnx": "model.onnx", "torchscript": "model.pt"}


TOLERANCE = 1e-4


ONNX_OPSET = 17


@dataclass
class ExportResult:
    format: str
    model_path: Path
    preprocessing_path: Path
    max_abs_diff: float  # on logits of a random batch of 2, exported vs PyTorch


def default_output_dir(ckpt: Path) -> Path:
    """``<run>/export`` for a run's checkpoint, else ``export/`` beside the checkpoint file."""
    parent = ckpt.parent
    return (parent.parent if parent.name == "checkpoints" else parent) / "export"


def preprocessing_spec(card: dict[str, Any], fmt: str, model_file: str) -> dict[str, Any]:
    """Everything another runtime needs to feed the exported model and read its output."""
    pre = card["preprocessing"]
    size = int(pre["crop_size"])
    return {
        "format": fmt,
        "model_file": model_file,
        "backbone": card["backbone"],
        "class_names": list(card["class_names"]),
        "input_name": "images",
        "output_name": "logits",
        "input_shape": ["batch", 3, size, size],
        "input_layout": "NCHW, RGB, float32",
        "input_size": size,
        "resize_size": int(pre["resize_size"]),
        "interpolation": pre.get("interpolation", "bilinear"),
        "mean": list(pre["mean"]),
        "std": list(pre["std"]),
        "steps": [
            "decode as 8-bit RGB (apply EXIF rotation; composite transparency on white)",
            f"resize the shorter side to resize_size ({pre['resize_size']}) with "
            f"{pre.get('interpolation', 'bilinear')} interpolation (antialiased)",
            f"centre crop to input_size x input_size ({size} x {size})",
            "scale pixel values to [0, 1] (divide by 255)",
            "subtract mean and divide by std, per channel",
        ],
        "output": "logits, shape [batch, len(class_names)]; softmax gives probabilities",
    }


def _serialise_onnx(model: nn.Module, example: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript-based exporter is deprecated in favour of torch.export, which needs
        # onnxscript; this one has no extra dependency and handles every CNN we train.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            buffer,
            dynamo=False,
            input_names=["images"],
            output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=ONNX_OPSET,
        )
    return buffer.getvalue()


def _run_onnx(data: bytes, batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(onnx.load_from_string(data))
    options = ort.SessionOptions()
    # Idle ORT threads otherwise spin for a while after each run, stealing CPU from PyTorch.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # On a GPU where ONNX Runtime has CUDA; else on the CPU (the usual onnxruntime wheel).
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
    session = ort.InferenceSession(data, options, providers=providers)
    (logits,) = session.run(["logits"], {"images": batch.cpu().numpy()})
    return torch.from_numpy(logits)


def _serialise_torchscript(model: nn.Module, example: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # torch.jit is deprecated in favour of torch.export; TorchScript is still what C++
        # (libtorch) and older deployments load.
        warnings.simplefilter("ignore")
        # check_trace re-traces the whole model (seconds for resnet50); the check below is stricter.
        traced = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(traced, buffer)
    return buffer.getvalue()


def _run_torchscript(data: bytes, batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = torch.jit.load(io.BytesIO(data), map_location=device)
    with torch.inference_mode(), torch.backends.cudnn.flags(allow_tf32=False):
        return loaded(batch.to(device)).cpu()


def export(
    ckpt: str | Path,
    format: str = "onnx",
    out_dir: str | Path | None = None,
    device: str = "cpu",
) -> ExportResult:
    """Write ``model.onnx`` or ``model.pt`` and ``preprocessing.json`` to ``out_dir``.

    The parity check runs PyTorch (in float32, TF32 off) and the export on ``device``
    (auto, cpu, cuda, cuda:N, mps; ONNX Runtime on the CPU unless it has CUDA)."""
    if format not in FORMATS:
        raise UserError(f"--format {format}: use one of {', '.join(FORMATS)}")
    on = resolve_device(device)
    path = find_checkpoint(ckpt)
    model, card = load_checkpoint(path)
    model = model.float().eval()
    size = int(card["preprocessing"]["crop_size"])
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(2, 3, size, size, generator=generator)
    check = torch.randn(2, 3, size, size, generator=generator)
    with torch.inference_mode(), torch.backends.cudnn.flags(allow_tf32=False):
        expected = model.to(on)(check.to(on)).cpu()
    model = model.cpu()  # serialised from the CPU: the files load anywhere

    if format == "onnx":
        data = _serialise_onnx(model, example)
        got = _run_onnx(data, check, on)
    else:
        data = _serialise_torchscript(model, example)
        got = _run_torchscript(data, check, on)
    diff = float((got - expected).abs().max())
    if not diff <= TOLERANCE:  # also catches NaN
        raise UserError(
            f"{path}: the {format} export computes different logits than PyTorch "
            f"(max abs difference {diff:.3g} > {TOLERANCE:g}); nothing was written. "
            "Try the other --format, or report the backbone as unsupported"
        )

    out = Path(out_dir) if out_dir is not None else default_output_dir(path)
    model_path = atomic_write(out / MODEL_FILES[format], lambda handle: handle.write(data))
    spec = preprocessing_spec(card, format, model_path.name)
    spec["max_abs_diff_vs_pytorch"] = diff
    pre_path = write_json_atomic(out / "preprocessing.json", spec)
    return ExportResult(format, model_path, pre_path, diff)
