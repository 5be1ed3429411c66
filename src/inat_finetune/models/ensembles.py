"""Feature ensembles: ``--backbone a,b`` joins the pooled features of frozen backbones.

Contract:

* ``FeatureEnsemble`` holds each member network with its ImageNet classifier replaced by an
  identity (so a member maps an image to its pooled features) and one linear ``classifier``
  over the members' features concatenated in the order of the name (``mobilenet_v2,
  tf_efficientnet_lite0``: MobileNetV2's 1280 values, then EfficientNet-Lite0's 1280).
* Members are frozen feature extractors: they stay in eval mode whatever ``train()`` says
  (no dropout, no batch statistics, none of timm's functional dropout), so their features are
  the same in every epoch and can be stored (``speed/features.py`` stores them per member).
  Only head-only training makes sense; ``training/config.py`` refuses the other strategies.
* One input for all members: images scaled to [0, 1] (the ensemble's preprocessing has mean 0
  and std 1), at one size, resized and cropped as the first member's weights were. Each member
  normalises that input the way its own weights expect (``Normalise``: ImageNet mean/std for
  torchvision's, 0.5/0.5 for the EfficientNet-Lite weights) inside the network. So the
  checkpoint's preprocessing is still one description, and an exported ONNX or TorchScript
  model carries every member's normalisation with it.
* The checkpoint describes itself: its card's ``backbone`` is the comma-separated name, which
  ``models.backbones.get_model`` rebuilds, and ``members`` lists each member's source, weights,
  normalisation and feature size.

This module is plain torch (the members come in already built): ``models/backbones.py``
builds them and imports it, not the other way round.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from inat_finetune.errors import UserError

SEPARATOR = ","


def is_ensemble(name: str) -> bool:
    """Whether a backbone name names several members (``a,b``)."""
    return SEPARATOR in name


def member_names(name: str) -> list[str]:
    """The members of ``a,b``, in order; a UserError for empty or repeated members."""
    names = [part.strip() for part in name.split(SEPARATOR)]
    if len(names) < 2 or not all(names):
        raise UserError(
            f"--backbone {name}: an ensemble names two or more backbones separated by commas, "
            "e.g. --backbone mobilenet_v2,tf_efficientnet_lite0"
        )
    if len(set(names)) != len(names):
        raise UserError(f"--backbone {name}: a member is named twice; name each backbone once")
    return names


class Normalise(nn.Module):
    """``(x - mean) / std`` per channel for [0, 1] images: a member's own normalisation."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean)).view(1, -1, 1, 1))
        self.register_buffer("scale", torch.tensor(list(std)).reciprocal().view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean) * self.scale


@dataclass(frozen=True)
class Member:
    """One member as built: its name, network (classifier already an identity), the dotted
    name of that identity, its normalisation and the size of its pooled features."""

    name: str
    network: nn.Module
    head: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    features: int

    def describe(self, source: str, weights: str) -> dict[str, Any]:
        """What the checkpoint's card says about this member."""
        return {
            "backbone": self.name,
            "source": source,
            "weights": weights,
            "mean": list(self.mean),
            "std": list(self.std),
            "features": self.features,
        }


def as_member(
    name: str, network: nn.Module, head: str, mean: Sequence[float], std: Sequence[float]
) -> Member:
    """``network`` with its ImageNet classifier ``head`` replaced by an identity."""
    old = network.get_submodule(head)
    if not isinstance(old, nn.Linear):
        raise UserError(
            f"--backbone {name}: its classifier {head} is not a Linear layer over pooled "
            "features, so it cannot join an ensemble; use CNNs such as mobilenet_v2, resnet50, "
            "efficientnet_b0 or tf_efficientnet_lite0"
        )
    if hasattr(network, "reset_classifier"):
        network.reset_classifier(0)  # timm: an identity, under the same name
    else:
        network.set_submodule(head, nn.Identity())
    return Member(name, network, head, tuple(mean), tuple(std), old.in_features)


class FeatureEnsemble(nn.Module):
    """Frozen members' pooled features, concatenated, into one linear ``classifier``."""

    def __init__(self, members: Sequence[Member], num_classes: int) -> None:
        super().__init__()
        self.member_names = [m.name for m in members]
        self.member_heads = [m.head for m in members]
        self.feature_sizes = [m.features for m in members]
        self.member_stats = [(m.mean, m.std) for m in members]  # each member's normalisation
        self.members = nn.ModuleList(m.network for m in members)
        self.normalise = nn.ModuleList(Normalise(m.mean, m.std) for m in members)
        self.classifier = nn.Linear(sum(self.feature_sizes), num_classes)
        for network in self.members:
            network.requires_grad_(False)
        self.members.eval()

    def train(self, mode: bool = True) -> FeatureEnsemble:
        super().train(mode)
        self.members.eval()  # frozen feature extractors, in every mode (see above)
        return self

    def member_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Each member's pooled features of [0, 1] ``images``, flattened, in member order."""
        return [
            network(normalise(images)).flatten(1)
            for network, normalise in zip(self.members, self.normalise, strict=True)
        ]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.cat(self.member_features(images), dim=1))


def why_not_for_an_ensemble(
    backbone: str, strategy: str, staged: bool, frozen_bn: str, weights: str
) -> str | None:
    """What an ensemble (``--backbone a,b``) cannot do in a run: its members are frozen with
    their own weights, so only the head can train. None when ``backbone`` is one network."""
    if not is_ensemble(backbone):
        return None
    member_names(backbone)  # a UserError for a malformed list
    ensemble = f"--backbone {backbone} is a feature ensemble of frozen backbones"
    if staged:
        return (
            f"{ensemble}, which no stage schedule can unfreeze; drop --train-from, "
            "--lp-epochs and --unfreeze-schedule (--recipe strong sets them) and use "
            "--strategy freeze_last"
        )
    if strategy != "freeze_last":
        return (
            f"{ensemble}: only its head trains; use --strategy freeze_last "
            f"instead of --strategy {strategy}"
        )
    if frozen_bn != "eval":
        return f"{ensemble}, which keeps its ImageNet BatchNorm statistics; use --frozen-bn eval"
    if weights not in ("DEFAULT", "none"):
        return f"{ensemble}, each with its default ImageNet weights; drop --weights"
    return None
