"""Colour jitter and normalisation as one affine colour map per image (``data.batch_augment``).

Brightness, contrast, saturation and hue, as ``ColorJitter`` applies them, are each affine in
RGB; composed in each image's drawn order with the normalisation they are one 3 x 4 matrix on
an (r, g, b, a) pixel, which ``BatchAugment`` applies to a whole batch with one ``baddbmm``.
Contrast blends with the mean grey of the image at its place in the chain: a linear function
of the crop's channel means, so those are all it needs of the pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

# torchvision's rgb_to_grayscale weights: the grey that contrast and saturation blend with.
GREY = (0.2989, 0.587, 0.114)


def colour_matrices(
    factors: torch.Tensor,
    hue_shift: torch.Tensor,
    order: torch.Tensor,
    channel_means: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's colour jitter (``factors``: B x 3 brightness, contrast and saturation
    factors; ``hue_shift``: B, in turns; ``order``: B x 4 long, each image's order of the steps
    0-3 in that sequence, hue last) and normalisation as one B x 3 x 4 matrix on a canvas
    pixel (r, g, b, a), 0-255, a = 255 where the image is and 0 in the rotation's corners:
    ``low + matrix @ (r, g, b, a)`` is the jittered, normalised pixel, and ``low`` (black,
    normalised) in the corners; and ``low``.

    The four steps are affine in RGB, composed in each image's drawn order: brightness
    ``b x``, saturation ``s x + (1 - s) grey(x)``, hue (``hue_matrix``), and contrast
    ``c x + (1 - c) grey(mean of the image)``, whose offset needs the image's mean at that
    point in the chain, a linear function of ``channel_means`` (the crop's, in [0, 1]).
    """
    b, device = len(factors), factors.device
    eye = torch.eye(3, device=device).expand(b, 3, 3)
    grey = torch.tensor(GREY, device=device)
    to_grey = grey.expand(3, 3)  # each row: the grey of (r, g, b)
    factor = factors.view(b, 3, 1, 1)
    steps = torch.stack(
        [
            eye * factor[:, 0],
            eye * factor[:, 1],
            eye * factor[:, 2] + (1 - factor[:, 2]) * to_grey,
            hue_matrix(hue_shift),
        ],
        dim=1,
    )  # B x 4 x 3 x 3, in the order (brightness, contrast, saturation, hue)
    matrix, offset = eye, torch.zeros(b, 3, device=device)
    rows = torch.arange(b, device=device)
    for position in range(4):
        step = order[:, position]
        chosen = steps[rows, step]
        image_mean = torch.einsum("bij,bj->bi", matrix, channel_means) + offset
        contrast_offset = (1 - factor[:, 1, 0, 0]) * (image_mean @ grey)
        offset = torch.einsum("bij,bj->bi", chosen, offset)
        offset = offset + (step == 1).float()[:, None] * contrast_offset[:, None]
        matrix = chosen @ matrix
    scale = 1 / torch.tensor(std, device=device)
    low = -torch.tensor(mean, device=device) * scale
    # (matrix x / 255 + offset - mean) / std = low + [matrix | offset] (x, 255) / 255 * scale.
    normalised = torch.cat([matrix * scale[:, None], (offset * scale)[..., None]], dim=2) / 255
    return normalised, low


def hue_matrix(shift: torch.Tensor) -> torch.Tensor:
    """Each image's hue shift (in turns) as a rotation of RGB about the grey axis (1, 1, 1)
    by that angle (Rodrigues' formula): how NVIDIA DALI's ``hsv`` operator approximates the
    HSV hue shift ("projected along the neutral (gray) axis, rotated based on the hue
    delta"). Hues turn as ``F.adjust_hue`` turns them, to 2.1 degrees at the largest shift
    (18 degrees); ``data.batch_augment``'s docstring says how it differs."""
    angle = shift * (2 * math.pi)
    cos, sin = angle.cos()[:, None, None], angle.sin()[:, None, None]
    axis = torch.full((3,), 1 / math.sqrt(3), device=shift.device)
    cross = (
        torch.tensor([[0.0, -1.0, 1.0], [1.0, 0.0, -1.0], [-1.0, 1.0, 0.0]], device=shift.device)
        * axis[0]
    )
    outer = torch.outer(axis, axis)
    eye = torch.eye(3, device=shift.device)
    return cos * eye + sin * cross + (1 - cos) * outer
