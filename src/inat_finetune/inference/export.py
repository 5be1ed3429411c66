"""Export a checkpoint for other runtimes: ONNX, TorchScript or safetensors, plus
``preprocessing.json``.

The exported network takes a float32 batch ``images`` of shape (N, 3, H, W), N free, already
preprocessed, and returns ``logits`` (N, classes). ``preprocessing.json`` beside it says how
to get from a photo to that batch (resize, centre crop, scale to [0, 1], normalise) and what
the outputs mean, so a program in any language can use the model without this package.

Where it goes (``--output``, ``export_paths``): a folder gets ``model.onnx``/``model.pt``/
``model.safetensors`` and ``preprocessing.json`` (default ``<run>/export``); a path ending in
``.onnx`` or ``.pt`` is the model file itself, with ``<stem>.preprocessing.json`` beside it
(``model.onnx`` and ``model.preprocessing.json``). A suffix of another format than
``--format`` is refused before the checkpoint is read.

- ONNX also carries, in its ``metadata_props``, ``class_names`` and ``preprocessing`` (JSON
  strings), ``backbone`` and ``producer``: what onnxruntime's
  ``get_modelmeta().custom_metadata_map`` answers.
- safetensors is a folder: ``model.safetensors`` and ``config.json``
  (models/safetensors_folder.py); ``load()``, ``predict``, ``evaluate`` and ``serve`` take it
  as they take a run, and for a timm backbone it is written by timm's own ``save_for_hf``, so
  ``timm.create_model("local-dir:FOLDER", pretrained=True)`` loads it. torchvision backbones
  cannot be built by timm: their folder loads through this package only.

Every export is run once against PyTorch on a random batch before it is written: a model
file that is on disk computes what the checkpoint computes (max abs difference on logits at
most ``TOLERANCE``), or there is no file. A safetensors folder is checked as it is read back:
by this package's loader, and for timm backbones by timm's.
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from inat_finetune.errors import UserError
from inat_finetune.inference.evaluation import find_checkpoint, load_checkpoint
from inat_finetune.models.backbones import Preprocessing
from inat_finetune.models.safetensors_folder import (
    CONFIG_FILE,
    CONFIG_KEY,
    WEIGHTS_FILE,
    package_section,
    package_version,
    timm_pretrained_cfg,
)
from inat_finetune.runfiles import (
    atomic_write,
    check_output_dir,
    check_output_file,
    write_json_atomic,
)
from inat_finetune.runtime.devices import resolve_device
from inat_finetune.runtime.extras import require_extra

FORMATS = ("onnx", "torchscript", "safetensors")


MODEL_FILES = {"onnx": "model.onnx", "torchscript": "model.pt", "safetensors": WEIGHTS_FILE}


# An --output ending in one of these names a file of that format, not a folder.
SUFFIX_FORMATS = {".onnx": "onnx", ".pt": "torchscript", ".safetensors": "safetensors"}


FILE_SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt"}  # the formats that can be one file


# preprocessing.json's keys that the ONNX metadata's "preprocessing" entry repeats.
ONNX_PREPROCESSING_KEYS = (
    "input_name",
    "output_name",
    "input_shape",
    "input_layout",
    "input_size",
    "resize_size",
    "interpolation",
    "mean",
    "std",
    "steps",
)


TOLERANCE = 1e-4


ONNX_OPSET = 17


@dataclass
class ExportResult:
    format: str
    model_path: Path
    preprocessing_path: Path
    max_abs_diff: float  # on logits of a random batch of 2, exported vs PyTorch
    config_path: Path | None = None  # safetensors: config.json


@dataclass(frozen=True)
class ExportPaths:
    model: Path
    preprocessing: Path
    config: Path | None  # safetensors only


def default_output_dir(ckpt: Path) -> Path:
    """``<run>/export`` for a run's checkpoint, else ``export/`` beside the checkpoint file."""
    parent = ckpt.parent
    return (parent.parent if parent.name == "checkpoints" else parent) / "export"


def preprocessing_spec(card: dict[str, Any], fmt: str, model_file: str) -> dict[str, Any]:
    """Everything another runtime needs to feed the exported model and read its output."""
    pre = card["preprocessing"]
    size = int(pre["crop_size"])
    spec = {
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
    if "members" in card:  # a feature ensemble (models/ensembles.py): normalised inside
        spec["members"] = card["members"]
        spec["steps"].append("(mean 0, std 1: each member normalises inside the model)")
    return spec


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


def onnx_metadata(card: dict[str, Any]) -> dict[str, str]:
    """The ONNX model's ``metadata_props``: what a runtime needs to feed it and read it."""
    spec = preprocessing_spec(card, "onnx", MODEL_FILES["onnx"])
    return {
        "class_names": json.dumps(spec["class_names"]),
        "preprocessing": json.dumps({key: spec[key] for key in ONNX_PREPROCESSING_KEYS}),
        "backbone": str(card["backbone"]),
        "producer": f"inat-finetune {package_version()}",
    }


def with_onnx_metadata(data: bytes, props: dict[str, str]) -> bytes:
    """The serialised ONNX model with ``props`` as its ``metadata_props``."""
    import onnx

    model = onnx.load_from_string(data)
    onnx.helper.set_model_props(model, props)
    return model.SerializeToString()


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: use one of {', '.join(FORMATS)}")


def output_is_file(output: Path, fmt: str) -> bool:
    """Whether ``--output`` names the model file itself (``.onnx``, ``.pt``) rather than a
    folder; a suffix that belongs to another format than ``--format`` is refused."""
    suffix = output.suffix.lower()
    kind = SUFFIX_FORMATS.get(suffix)
    if kind is None:
        return False
    if kind != fmt:
        wanted = FILE_SUFFIXES.get(fmt)
        instead = f"a {wanted} file or a folder" if wanted else "a folder"
        raise UserError(
            f"--output {output}: a {suffix} file is for --format {kind}, but --format is "
            f"{fmt}; pass --format {kind}, or name {instead} as --output"
        )
    if fmt == "safetensors":
        raise UserError(
            f"--output {output}: --format safetensors writes a folder ({WEIGHTS_FILE} and "
            f"{CONFIG_FILE}, the layout timm and Hugging Face load); name a folder, such as "
            f"{output.with_suffix('')}"
        )
    return True


def check_export_output(output: str | Path | None, fmt: str) -> None:
    """Refuse, before any work, a ``--format`` or ``--output`` that cannot be written."""
    check_format(fmt)
    if output is None:
        return
    output = Path(output)
    if not output_is_file(output, fmt):
        check_output_dir(output, "--output")
        return
    if output.is_dir():
        raise UserError(
            f"--output {output}: is a folder, but a {output.suffix} path names the model file "
            "itself; remove the folder, or name another file (or a folder without the suffix)"
        )
    check_output_file(output, "--output", output.name)


def export_paths(output: str | Path | None, fmt: str, ckpt: Path) -> ExportPaths:
    """Where the model, ``preprocessing.json`` and (safetensors) ``config.json`` go."""
    check_export_output(output, fmt)
    if output is not None and output_is_file(Path(output), fmt):
        model = Path(output)
        return ExportPaths(model, model.with_name(f"{model.stem}.preprocessing.json"), None)
    folder = Path(output) if output is not None else default_output_dir(ckpt)
    config = folder / CONFIG_FILE if fmt == "safetensors" else None
    return ExportPaths(folder / MODEL_FILES[fmt], folder / "preprocessing.json", config)


def is_timm_model(model: nn.Module) -> bool:
    return type(model).__module__.startswith("timm.")


def stage_safetensors(model: nn.Module, card: dict[str, Any], folder: Path) -> None:
    """Write ``model.safetensors`` and ``config.json`` into ``folder`` (a scratch folder)."""
    section = package_section(model, card)
    if is_timm_model(model):
        from timm.models import save_for_hf

        pre = Preprocessing.from_dict(card["preprocessing"])
        timm_config = {
            "label_names": list(card["class_names"]),
            "pretrained_cfg": timm_pretrained_cfg(pre),
            CONFIG_KEY: section,
        }
        save_for_hf(model, str(folder), model_config=timm_config, safe_serialization=True)
        return
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps({CONFIG_KEY: section}, indent=2) + "\n")


def read_back_logits(folder: Path, batch: torch.Tensor, timm_too: bool) -> list[torch.Tensor]:
    """Logits of the folder's network as ``load()`` builds it (and timm, for timm backbones)."""
    built, _ = load_checkpoint(folder / WEIGHTS_FILE)
    models = [built]
    if timm_too:
        import timm

        models.append(timm.create_model(f"local-dir:{folder}", pretrained=True))
    with torch.inference_mode():
        return [m.float().eval()(batch) for m in models]


def serialise(model: nn.Module, card: dict[str, Any], fmt: str, check: torch.Tensor) -> bytes:
    """The ONNX (with its metadata) or TorchScript file's bytes, traced on a batch like ``check``."""
    example = torch.randn(check.shape, generator=torch.Generator().manual_seed(0))
    if fmt == "onnx":
        return with_onnx_metadata(_serialise_onnx(model, example), onnx_metadata(card))
    return _serialise_torchscript(model, example)


def refuse_if_different(diff: float, path: Path, fmt: str) -> None:
    if not diff <= TOLERANCE:  # also catches NaN
        raise UserError(
            f"{path}: the {fmt} export computes different logits than PyTorch "
            f"(max abs difference {diff:.3g} > {TOLERANCE:g}); nothing was written. "
            "Try the other --format, or report the backbone as unsupported"
        )


def max_abs_diff(outputs: list[torch.Tensor], expected: torch.Tensor) -> float:
    return max(float((got - expected).abs().max()) for got in outputs)


def write_safetensors(
    model: nn.Module,
    card: dict[str, Any],
    target: ExportPaths,
    check: tuple[torch.Tensor, torch.Tensor],
    ckpt: Path,
) -> float:
    """Stage the folder, read it back, and only if it computes ``check``'s logits (a batch and
    the checkpoint's logits on it) copy its two files into place; the max abs difference."""
    assert target.config is not None
    batch, expected = check
    with tempfile.TemporaryDirectory(prefix="inat-finetune-export-") as scratch:
        staged = Path(scratch)
        stage_safetensors(model, card, staged)
        diff = max_abs_diff(read_back_logits(staged, batch, is_timm_model(model)), expected)
        refuse_if_different(diff, ckpt, "safetensors")
        for name, place in ((WEIGHTS_FILE, target.model), (CONFIG_FILE, target.config)):
            with (staged / name).open("rb") as source:
                atomic_write(place, lambda handle, src=source: shutil.copyfileobj(src, handle))
    return diff


def export(
    ckpt: str | Path,
    format: str = "onnx",
    output: str | Path | None = None,
    *,
    out_dir: str | Path | None = None,
    device: str = "cpu",
) -> ExportResult:
    """Write the model and ``preprocessing.json`` to ``output``: a folder (default
    ``<run>/export``), or for ONNX and TorchScript a ``.onnx``/``.pt`` file path.

    The parity check runs PyTorch (in float32, TF32 off) and the export on ``device`` (auto,
    cpu, cuda, cuda:N, mps; ONNX Runtime on the CPU unless it has CUDA); files are serialised
    from the CPU, so they load anywhere. ``out_dir`` is the earlier name of ``output``.
    """
    output = output if output is not None else out_dir
    check_export_output(output, format)
    if format == "onnx":
        require_extra("export", "export --format onnx")
    on = resolve_device(device)
    path = find_checkpoint(ckpt)
    model, card = load_checkpoint(path)
    model = model.float().eval()
    target = export_paths(output, format, path)
    size = int(card["preprocessing"]["crop_size"])
    generator = torch.Generator().manual_seed(1)
    check = torch.randn(2, 3, size, size, generator=generator)
    with torch.inference_mode(), torch.backends.cudnn.flags(allow_tf32=False):
        expected = model.to(on)(check.to(on)).cpu()
    model = model.cpu()

    if format == "safetensors":
        diff = write_safetensors(model, card, target, (check, expected), path)
    else:
        data = serialise(model, card, format, check)
        run = _run_onnx if format == "onnx" else _run_torchscript
        diff = max_abs_diff([run(data, check, on)], expected)
        refuse_if_different(diff, path, format)
        atomic_write(target.model, lambda handle: handle.write(data))

    spec = preprocessing_spec(card, format, target.model.name)
    spec["max_abs_diff_vs_pytorch"] = diff
    write_json_atomic(target.preprocessing, spec)
    return ExportResult(format, target.model, target.preprocessing, diff, target.config)
