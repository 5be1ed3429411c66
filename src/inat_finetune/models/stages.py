"""Named stages of a backbone, and unfreezing by stage on a schedule of epochs.

A *stage* is a block of the network, input to output: ``stem, layer1 ... layer4`` for ResNets,
``features.0 ... features.18`` for MobileNetV2 (torchvision's ``features`` children), and for
timm models the coarse groups timm itself defines (``model.group_matcher(coarse=True)``), named
after the modules they hold (``stem, blocks.0 ... blocks.6`` for EfficientNet-Lite0). The new
classifier is the last stage, ``head``; ``all`` names the first stage.

"Train from S" means S, every stage after it and the head train; the stages before S are
frozen. That covers surgical fine-tuning (``--train-from layer3``), gradual unfreezing (a
schedule such as ``0:head,2:layer4,4:layer3``: each entry says from which epoch on training
starts at that stage) and LP-FT (``0:head,K:all``: a linear probe for K epochs, then
everything, usually with a lower backbone learning rate).

The schedule is a pure function of the epoch, and the optimizer holds every parameter from the
start (frozen ones simply get no gradient), so a run resumed mid-schedule rebuilds exactly the
same parameter groups and trainable set.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from torch import nn

from inat_finetune.errors import UserError

HEAD = "head"


ALL = "all"


# torchvision containers whose children are the network's blocks (features.0, features.1, ...).
EXPANDED_CONTAINERS = ("features", "trunk_output", "blocks", "stages", "layers")


@dataclass(frozen=True)
class Stage:
    name: str
    params: tuple[str, ...]  # parameter names, as in model.named_parameters()


def _is_head(name: str, head: str) -> bool:
    return name == head or name.startswith(head + ".")


def _param_names(module: nn.Module, prefix: str, head: str, recurse: bool = True) -> list[str]:
    names = [f"{prefix}{n}" for n, _ in module.named_parameters(recurse=recurse)]
    return [n for n in names if not _is_head(n, head)]


def _torchvision_stages(model: nn.Module, head: str) -> list[Stage]:
    """Top-level children in order; block containers (``features``...) expanded into blocks.

    Leading single layers (ResNet's ``conv1`` and ``bn1``) become one ``stem`` stage, and
    parameters held by the root itself (a ViT's class token) join the first stage.
    """
    stages: list[tuple[str, list[str], bool]] = []  # (name, params, is a single layer)
    for name, child in model.named_children():
        if not _param_names(child, f"{name}.", head):
            continue
        if name in EXPANDED_CONTAINERS or head.startswith(name + "."):
            direct = _param_names(child, f"{name}.", head, recurse=False)
            for sub, grandchild in child.named_children():
                params = _param_names(grandchild, f"{name}.{sub}.", head)
                if params:
                    stages.append((f"{name}.{sub}", direct + params, False))
                    direct = []
        else:
            params = _param_names(child, f"{name}.", head)
            stages.append((name, params, not any(True for _ in child.children())))
    leading = 0
    while leading < len(stages) and stages[leading][2]:
        leading += 1
    if leading > 1 or (leading == 1 and len(stages) > 1 and not stages[0][0].startswith("stem")):
        merged = [p for _, params, _ in stages[:leading] for p in params]
        stages = [("stem", merged, True), *stages[leading:]]
    root = _param_names(model, "", head, recurse=False)
    if root and stages:
        first_name, first_params, single = stages[0]
        stages[0] = (first_name, root + first_params, single)
    return [Stage(name, tuple(params)) for name, params, _ in stages]


def _common_module(names: list[str]) -> str:
    parts = os.path.commonprefix([n.split(".")[:-1] for n in names])
    return ".".join(parts)


def _timm_stages(model: nn.Module, head: str) -> list[Stage] | None:
    """timm's own coarse parameter groups, or None when the model defines none."""
    try:
        from timm.models import group_parameters

        groups = group_parameters(model, model.group_matcher(coarse=True))
    except (AttributeError, NotImplementedError):
        return None
    stages: list[Stage] = []
    for names in groups.values():
        names = [n for n in names if not _is_head(n, head)]
        if not names:
            continue
        # At most two levels (container and block index): timm groups ``blocks.0`` by its
        # first index even when the group holds a single block ``blocks.0.0``.
        name = ".".join(_common_module(names).split(".")[:2])
        if not name:
            # A group of several modules (timm's stem, or the last blocks plus the final norm
            # layer): name it after its first block.
            first = names[0].split(".")
            name = "stem" if not stages else ".".join(first[:2] if first[1:2] else first[:1])
        stages.append(Stage(name, tuple(names)))
    return stages


def backbone_stages(model: nn.Module, head: str) -> list[Stage]:
    """The backbone's stages, input to output, followed by the ``head`` stage.

    Every parameter of ``model`` is in exactly one stage.
    """
    stages = _timm_stages(model, head) if hasattr(model, "group_matcher") else None
    if stages is None:
        stages = _torchvision_stages(model, head)
    seen: dict[str, int] = {}
    unique = []
    for stage in stages:
        count = seen.get(stage.name, 0)
        seen[stage.name] = count + 1
        unique.append(Stage(f"{stage.name}#{count + 1}", stage.params) if count else stage)
    head_params = tuple(n for n, _ in model.named_parameters() if _is_head(n, head))
    unique.append(Stage(HEAD, head_params))
    covered = {p for s in unique for p in s.params}
    missing = [n for n, _ in model.named_parameters() if n not in covered]
    if missing:
        # Parameters outside every named block (rare) train with the last backbone stage.
        last = unique[-2] if len(unique) > 1 else unique[-1]
        unique[unique.index(last)] = Stage(last.name, last.params + tuple(missing))
    return unique


def stage_names(stages: list[Stage]) -> list[str]:
    return [s.name for s in stages]


def stage_index(stages: list[Stage], name: str, option: str = "--train-from") -> int:
    """Index of the stage called ``name``; ``all`` is the first stage and ``head`` the last."""
    names = stage_names(stages)
    if name == ALL:
        return 0
    if name in names:
        return names.index(name)
    listed = ", ".join(names[:-1])
    raise UserError(
        f"{option} {name}: no such stage; this backbone's stages, input to output, are "
        f"{listed}, then {HEAD} (or '{ALL}' for the whole network)"
    )


def parse_schedule(text: str) -> list[tuple[int, str]]:
    """``"0:head,2:layer4,4:layer3"`` -> ``[(0, "head"), (2, "layer4"), (4, "layer3")]``."""
    entries = []
    for item in text.split(","):
        epoch, sep, name = item.strip().partition(":")
        if not sep or not epoch.strip().isdigit() or not name.strip():
            raise ValueError(
                f"'{item.strip()}' is not EPOCH:STAGE; write e.g. 0:head,2:layer4,4:layer3"
            )
        entries.append((int(epoch), name.strip()))
    epochs = [e for e, _ in entries]
    if epochs[0] != 0:
        raise ValueError("the first entry must be for epoch 0 (what trains from the start)")
    if any(b <= a for a, b in zip(epochs, epochs[1:], strict=False)):
        raise ValueError("epochs must increase from one entry to the next")
    return entries


def format_schedule(schedule: list[tuple[int, str]]) -> str:
    return ",".join(f"{epoch}:{name}" for epoch, name in schedule)


@dataclass(frozen=True)
class UnfreezePlan:
    """Which stage training starts from, by epoch. ``starts[i]`` belongs to ``epochs[i]``."""

    stages: tuple[Stage, ...]
    epochs: tuple[int, ...]
    starts: tuple[int, ...]  # stage indices, non-increasing: unfreezing never re-freezes

    @classmethod
    def build(
        cls, stages: list[Stage], schedule: list[tuple[int, str]], option: str
    ) -> UnfreezePlan:
        starts = [stage_index(stages, name, option) for _, name in schedule]
        if any(b > a for a, b in zip(starts, starts[1:], strict=False)):
            raise UserError(
                f"{option} {format_schedule(schedule)}: each entry must unfreeze at least as "
                "much as the one before (stages later in the list lie nearer the input)"
            )
        return cls(tuple(stages), tuple(e for e, _ in schedule), tuple(starts))

    def start_at(self, epoch: int) -> int:
        """The first trainable stage in ``epoch``."""
        current = self.starts[0]
        for first_epoch, start in zip(self.epochs, self.starts, strict=True):
            if epoch >= first_epoch:
                current = start
        return current

    def unfreeze_epoch(self, stage: int) -> int:
        """The first epoch in which stage number ``stage`` trains (a large number if never)."""
        for first_epoch, start in zip(self.epochs, self.starts, strict=True):
            if start <= stage:
                return first_epoch
        return 1 << 30

    @property
    def last_change(self) -> int:
        return self.epochs[-1]

    def describe(self, start: int) -> str:
        return f"trainable from {self.stages[start].name}"


def apply_start(model: nn.Module, stages: tuple[Stage, ...] | list[Stage], start: int) -> None:
    """Stages ``start`` and after train; the earlier ones are frozen."""
    trainable = {p for stage in stages[start:] for p in stage.params}
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)
