"""Which parameters train: the seed's three freezing strategies plus full fine-tuning.

Strategies (the new classifier head always trains):

* ``freeze_last``: only the head trains (a linear probe on frozen features).
* ``freeze_k_percent``: the backbone's parameter tensors, taken in registration order
  (``named_parameters()`` minus the head, which for torchvision and timm CNNs is the order the
  forward pass uses them), are counted; the first ``floor(freeze_percent * count)`` tensors
  are frozen and the rest train. The unit is *tensors*, not scalars, as in the original
  write-up: ``freeze_percent=0.25`` on ResNet50 freezes 39 of its 159 backbone tensors
  (the stem, layer1 and the start of layer2).
* ``freeze_except_bn_and_fc``: the affine weight and bias of every BatchNorm layer train, as
  does the head; everything else is frozen.
* ``none``: everything trains.

Frozen BatchNorm layers (those whose affine parameters are all frozen) still hold running
statistics. ``frozen_bn`` says what happens to them in training mode:

* ``"eval"`` (default): they stay in eval mode and keep the ImageNet statistics, so a frozen
  backbone computes exactly the same features in every epoch (needed to cache features).
* ``"train"``: they update their running statistics on the new data, as the original notebook
  did by calling ``model.train()`` on the whole network.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from inat_finetune.errors import UserError

STRATEGIES = ("freeze_last", "freeze_k_percent", "freeze_except_bn_and_fc", "none")


FROZEN_BN_MODES = ("eval", "train")


NORM_TYPES = (nn.modules.batchnorm._BatchNorm,)


@dataclass(frozen=True)
class FreezeSummary:
    strategy: str
    trainable_params: int
    total_params: int
    trainable_tensors: int
    total_tensors: int

    def describe(self) -> str:
        share = 100 * self.trainable_params / max(self.total_params, 1)
        return (
            f"{self.strategy}: {self.trainable_params:,} of {self.total_params:,} parameters "
            f"trainable ({share:.2f}%)"
        )


def set_requires_grad(module: nn.Module, requires_grad: bool) -> None:
    for param in module.parameters():
        param.requires_grad_(requires_grad)


def _is_head(name: str, head: str) -> bool:
    return name == head or name.startswith(head + ".")


def apply_strategy(
    model: nn.Module, head: str, strategy: str, freeze_percent: float = 0.25
) -> FreezeSummary:
    """Set ``requires_grad`` on every parameter of ``model`` according to ``strategy``."""
    if strategy not in STRATEGIES:
        raise UserError(f"--strategy {strategy}: unknown; use one of {', '.join(STRATEGIES)}")
    if not 0.0 <= freeze_percent <= 1.0:
        raise UserError(
            f"--freeze-percent {freeze_percent}: must be a fraction in [0, 1] (0.25 = 25%)"
        )
    set_requires_grad(model, strategy == "none")
    set_requires_grad(model.get_submodule(head), True)
    if strategy == "freeze_k_percent":
        backbone = [p for name, p in model.named_parameters() if not _is_head(name, head)]
        n_frozen = math.floor(freeze_percent * len(backbone))
        for index, param in enumerate(backbone):
            param.requires_grad_(index >= n_frozen)
    elif strategy == "freeze_except_bn_and_fc":
        for module in model.modules():
            if isinstance(module, NORM_TYPES):
                set_requires_grad(module, True)
    return summarize(model, strategy)


def summarize(model: nn.Module, strategy: str) -> FreezeSummary:
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    return FreezeSummary(
        strategy=strategy,
        trainable_params=sum(p.numel() for p in trainable),
        total_params=sum(p.numel() for p in params),
        trainable_tensors=len(trainable),
        total_tensors=len(params),
    )


def frozen_batchnorm_layers(model: nn.Module) -> list[nn.Module]:
    """BatchNorm layers none of whose parameters train."""
    return [
        module
        for module in model.modules()
        if isinstance(module, NORM_TYPES)
        and not any(p.requires_grad for p in module.parameters(recurse=False))
    ]


def hold_frozen_batchnorm(model: nn.Module) -> None:
    """Put frozen BatchNorm layers in eval mode; call after every ``model.train()``."""
    for module in frozen_batchnorm_layers(model):
        module.eval()
