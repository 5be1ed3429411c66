"""Test-time augmentation: average the logits of several views of each test image.

One implementation serves ``evaluate``, the test step at the end of ``train`` and ``predict``
(``Predictor.logits``):

* ``flip``: the image and its mirror image (2 forward passes).
* ``multicrop``: the centre and four corner crops of the resized image, each with its mirror
  image (10 passes). It needs the whole resized square, not the usual centre crop, so the
  loader uses ``tta_eval_transform`` for it.

Logits (not probabilities) are averaged, as the seed-era ``predict --tta`` did.

``tta_mode`` is the one reading of the ``--tta none|flip|multicrop`` setting that ``train``,
``evaluate``, ``predict`` and ``serve`` share (and the Python API, where ``True`` still means
``flip`` and ``False`` ``none``, as the boolean it used to be).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torchvision.transforms import v2

from inat_finetune.data.datamodule import build_eval_transform, output_steps
from inat_finetune.errors import UserError
from inat_finetune.models.backbones import Preprocessing

TTA_MODES = ("none", "flip", "multicrop")


def tta_mode(value: str | bool | None) -> str:
    """The TTA mode ``value`` names (None: none); UserError naming --tta for anything else."""
    if value is None or value is False:
        return "none"
    if value is True:
        return "flip"
    if value not in TTA_MODES:
        raise UserError(f"--tta {value}: unknown; use --tta none, flip or multicrop")
    return value


def tta_eval_transform(pre: Preprocessing, mode: str, normalise: bool = True) -> v2.Compose:
    """The test loader's transform for ``mode``: the usual one, or the whole resized square."""
    if mode != "multicrop":
        return build_eval_transform(pre, normalise)
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(pre.resize_size, interpolation=pre.interpolation_mode, antialias=True),
            v2.CenterCrop(pre.resize_size),
            *output_steps(pre, normalise),
        ]
    )


def five_crops(batch: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Centre crop first (the standard view), then the four corners."""
    height, width = batch.shape[-2:]
    top, left = (height - size) // 2, (width - size) // 2
    return [
        batch[..., top : top + size, left : left + size],
        batch[..., :size, :size],
        batch[..., :size, width - size :],
        batch[..., height - size :, :size],
        batch[..., height - size :, width - size :],
    ]


def tta_logits(
    forward: Callable[[torch.Tensor], torch.Tensor],
    batch: torch.Tensor,
    mode: str = "flip",
    crop_size: int | None = None,
) -> torch.Tensor:
    """Mean logits over the views of ``mode``; ``none`` is a single plain forward pass."""
    if mode == "none":
        return forward(batch).float()
    if mode == "flip":
        views = [batch]
    elif mode == "multicrop":
        if crop_size is None:
            raise ValueError("multicrop needs the crop size")
        views = five_crops(batch, crop_size)
    else:
        raise ValueError(f"unknown TTA mode {mode!r}; use one of {TTA_MODES}")
    total = None
    for view in views:
        for image in (view, view.flip(dims=[-1])):
            # A photo of an animal is as valid mirrored; averaging the views smooths out
            # predictions that hinge on left/right placement or on where the crop fell.
            logits = forward(image).float()
            total = logits if total is None else total + logits
    assert total is not None
    return total / (2 * len(views))
