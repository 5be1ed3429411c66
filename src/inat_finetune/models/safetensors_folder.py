"""The safetensors export folder: ``model.safetensors`` plus ``config.json``, read safely.

``inat-finetune export --format safetensors`` writes a folder in the layout timm's
``save_for_hf`` writes and the Hugging Face Hub serves:

- ``model.safetensors``: the fine-tuned network's ``state_dict`` (float32), keys as the
  backbone's own library names them (timm's or torchvision's), no ``model.`` prefix.
- ``config.json``: under ``CONFIG_KEY`` (``"inat_finetune"``) the checkpoint's card (backbone,
  class names, head, preprocessing, strategy, ...) plus ``head_layer`` (the classifier's type
  and sizes) and ``version`` (this package's). For a timm backbone the file also holds timm's
  own keys (``architecture``, ``num_classes``, ``num_features``, ``label_names``,
  ``model_args``, ``pretrained_cfg`` with ``input_size``, ``mean``, ``std``, ``crop_pct``,
  ``interpolation``), so ``timm.create_model("local-dir:FOLDER", pretrained=True)`` builds the
  same network without this package. torchvision backbones (``resnet50``, ``mobilenet_v2``, ...)
  have no timm architecture to name, so their folder has only this package's section.

Reading (``read_safetensors_folder``) uses safetensors' own loader, which holds tensors only:
no pickle, nothing in the file can run code. Every way the folder can be bad is one line
naming the file.
"""

from __future__ import annotations

import json
import math
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from torch import nn

from inat_finetune.errors import UserError
from inat_finetune.models.backbones import Preprocessing

CONFIG_KEY = "inat_finetune"  # config.json's section describing the model for this package


WEIGHTS_FILE = "model.safetensors"


CONFIG_FILE = "config.json"


def is_safetensors_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder holding ``model.safetensors`` and ``config.json``."""
    path = Path(path)
    return (path / WEIGHTS_FILE).is_file() and (path / CONFIG_FILE).is_file()


def package_version() -> str:
    """This package's installed version ("unknown" when run from a bare source tree)."""
    try:
        return version("inat-finetune")
    except PackageNotFoundError:
        return "unknown"


def head_layer(model: nn.Module, head: str) -> dict[str, Any]:
    """The classifier layer described for people: its dotted name, type and sizes."""
    layer = model.get_submodule(head)
    described: dict[str, Any] = {"module": head, "type": type(layer).__name__}
    for size in ("in_features", "out_features", "in_channels", "out_channels"):
        if hasattr(layer, size):
            described[size] = int(getattr(layer, size))
    return described


def package_section(model: nn.Module, card: dict[str, Any]) -> dict[str, Any]:
    """``config.json``'s ``CONFIG_KEY`` section: the card, the head layer (where the card names
    one module as the head), the version."""
    section = {**card, "version": package_version()}
    head = card.get("head")
    if isinstance(head, str) and head in dict(model.named_modules()):
        section["head_layer"] = head_layer(model, head)
    return section


def timm_pretrained_cfg(preprocessing: Preprocessing) -> dict[str, Any]:
    """The card's preprocessing in timm's ``pretrained_cfg`` terms (what timm's transforms read).

    timm resizes the shorter side to ``floor(input_size / crop_pct)``: ``crop_pct`` is nudged
    down by float rounding where needed so that gives exactly the card's ``resize_size``.
    """
    crop, resize = preprocessing.crop_size, preprocessing.resize_size
    crop_pct = crop / resize
    while math.floor(crop / crop_pct) < resize:
        crop_pct = math.nextafter(crop_pct, 0.0)
    return {
        "input_size": (3, crop, crop),
        "crop_pct": crop_pct,
        "crop_mode": "center",
        "interpolation": preprocessing.interpolation,
        "mean": tuple(preprocessing.mean),
        "std": tuple(preprocessing.std),
    }


def read_config(folder: Path) -> dict[str, Any]:
    """``config.json``'s ``CONFIG_KEY`` section: the card to rebuild the model from."""
    path = folder / CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not a readable JSON file: {exc}") from None
    section = config.get(CONFIG_KEY) if isinstance(config, dict) else None
    if not isinstance(section, dict) or not {"backbone", "class_names", "preprocessing"} <= set(
        section
    ):
        raise UserError(
            f"{path}: not an inat-finetune export (no '{CONFIG_KEY}' section with backbone, "
            "class_names and preprocessing); export a checkpoint with "
            "`inat-finetune export RUN --format safetensors`"
        )
    return section


def read_safetensors_folder(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The weights (tensors only, on the CPU) and the card of an exported folder."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    card = read_config(folder)
    path = folder / WEIGHTS_FILE
    try:
        state = load_file(path, device="cpu")
    except (SafetensorError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: not a readable safetensors file (truncated?): {first}") from None
    return state, card
