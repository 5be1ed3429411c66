"""Training augmentation on whole batches after the transfer (``--augment-on device``).

The per-image path (``--augment-on cpu``, ``data.augment``) crops, flips, jitters and rotates
every image in the loader's workers; its colour jitter alone costs ~5 ms per 224-px image on
one core. Here the workers only read the stored uint8 image (shorter side ``resize_size``,
as the prepared-image cache holds it) and draw that image's random parameters; the collate
pads the batch to its largest image and stacks the parameters; ``BatchAugment`` then applies
them to the whole batch on the device (the GPU, or the CPU batch when there is none), as
TorchGeo applies its augmentations in ``on_after_batch_transfer``.

The contract: each image gets its own parameters, drawn from the same distributions as the
per-image path (``v2.RandomResizedCrop`` with scale (0.08, 1) and ratio (3/4, 4/3) over the
whole stored image, flip with p=0.5, ``ColorJitter(0.2, 0.2, 0.2, 0.05)`` in a random order
per image, ``RandomRotation(15)`` with nearest interpolation and black corners; the recipes'
TrivialAugment/RandAugment and random erasing). The parameters are drawn in the worker
under the sample's own seed (``data.sampling.SeededSamples``: a function of run seed, epoch
and sample index), so a resumed run augments every sample as the uninterrupted one did,
whatever the batch composition. The pixels differ from the per-image path's (interpolation
of the rotation, float arithmetic instead of uint8 rounding between jitter steps): what
matches is the distribution (``tests/test_batch_augment.py``).

Which library, measured on one CPU thread on a batch of 32 (prepared 256x341 uint8 to
224-px crops; ``benchmarks/data_pipeline.py`` has the loader-level figures):

==============================  ======================================  ==========================
step                            torchvision v2 functional, per image    Kornia 0.9, batched
==============================  ======================================  ==========================
resized crop (antialiased)      21 ms                                   127 ms (``roi_align``)
colour jitter (hue included)    162 ms                                  186 ms
rotation                        37 ms                                   41 ms
==============================  ======================================  ==========================

The crop stays torchvision's per image: 6x faster and the same antialiased resize as the
per-image path. Brightness, contrast, saturation and rotation use Kornia's batched
functional ops with per-sample factors (``adjust_*_with_*_subtraction`` are torchvision's
formulas, equal to ~2e-5): on the CPU they are within 15% of a per-image torchvision loop,
and on a GPU they are a fixed handful of kernels per batch where a per-image loop launches
~30 per image. Hue, most of the jitter's cost, is hand-written (``shift_hue``): it measured
half the time of both libraries' (see there).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from kornia import enhance
from kornia.geometry import transform as kornia_transform
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

SCALE = (0.08, 1.0)  # v2.RandomResizedCrop's defaults, as the per-image path uses them
RATIO = (3.0 / 4.0, 4.0 / 3.0)
JITTER = 0.2  # brightness, contrast, saturation: factor in [0.8, 1.2]
HUE = 0.05  # hue shift in [-0.05, 0.05] of a turn
ROTATION = 15.0  # degrees either way

# One row of parameters per image (float64: the integer columns are exact).
TOP, LEFT, HEIGHT, WIDTH, FLIP = 0, 1, 2, 3, 4
ORDER = slice(
    5, 9
)  # the colour steps' order: a permutation of (brightness, contrast, saturation, hue)
BRIGHTNESS, CONTRAST, SATURATION, HUE_SHIFT, ANGLE, POLICY_SEED = 9, 10, 11, 12, 13, 14
PARAMS = 15


def crop_box(height: int, width: int) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random resized crop: ``v2.RandomResizedCrop``'s draw."""
    area = height * width
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(*SCALE).item()
        aspect = math.exp(torch.empty(1).uniform_(*log_ratio).item())
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,)).item())
            left = int(torch.randint(0, width - w + 1, size=(1,)).item())
            return top, left, h, w
    # Fallback: the central crop at the nearest allowed aspect ratio.
    in_ratio = width / height
    if in_ratio < RATIO[0]:
        w, h = width, int(round(width / RATIO[0]))
    elif in_ratio > RATIO[1]:
        h, w = height, int(round(height * RATIO[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def draw_params(height: int, width: int) -> torch.Tensor:
    """One image's parameters from torch's global RNG (seeded per sample by the loader)."""
    row = torch.zeros(PARAMS, dtype=torch.float64)
    row[[TOP, LEFT, HEIGHT, WIDTH]] = torch.tensor(crop_box(height, width), dtype=torch.float64)
    row[FLIP] = float(torch.rand(1).item() < 0.5)
    row[ORDER] = torch.randperm(4).to(torch.float64)
    row[[BRIGHTNESS, CONTRAST, SATURATION]] = (
        torch.empty(3).uniform_(1 - JITTER, 1 + JITTER).double()
    )
    row[HUE_SHIFT] = torch.empty(1).uniform_(-HUE, HUE).item()
    row[ANGLE] = torch.empty(1).uniform_(-ROTATION, ROTATION).item()
    row[POLICY_SEED] = float(torch.randint(0, 2**31 - 1, (1,)).item())
    return row


class DrawParams:
    """The loader's whole training transform on this path: the uint8 image as it is stored,
    with its random parameters. ``resize_size`` resizes images that are not already stored at
    that size (the path without the prepared-image cache)."""

    def __init__(self, resize_size: int, interpolation: Any) -> None:
        self.resize_size = resize_size
        self.interpolation = interpolation

    def __call__(self, image: Any) -> tuple[torch.Tensor, torch.Tensor]:
        tensor = F.to_image(image).as_subclass(torch.Tensor)
        if min(tensor.shape[-2:]) != self.resize_size:
            tensor = F.resize(
                tensor, self.resize_size, interpolation=self.interpolation, antialias=True
            )
        return tensor, draw_params(*tensor.shape[-2:])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(resize_size={self.resize_size})"


def collate_padded(
    samples: Sequence[tuple[tuple[torch.Tensor, torch.Tensor], int]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(uint8 images padded to the batch's largest, labels, parameters): one fixed-size batch.

    The crop boxes lie inside each image's own area, so the padding is never read.
    """
    height = max(image.shape[-2] for (image, _), _ in samples)
    width = max(image.shape[-1] for (image, _), _ in samples)
    images = torch.zeros(len(samples), 3, height, width, dtype=torch.uint8)
    for k, ((image, _), _) in enumerate(samples):
        images[k, :, : image.shape[-2], : image.shape[-1]] = image
    params = torch.stack([row for (_, row), _ in samples])
    labels = torch.tensor([label for _, label in samples])
    return images, labels, params


def is_padded_batch(batch: Any) -> bool:
    """Whether ``batch`` came from ``collate_padded`` (and still needs augmenting)."""
    return isinstance(batch, (tuple, list)) and len(batch) == 3 and batch[0].dtype == torch.uint8


def seeded(seed: int, step: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor) -> Any:
    """``step(image)`` under its own seed, leaving the global RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        return step(image)


class BatchAugment:
    """Applies a padded batch's per-sample parameters on the batch's device.

    ``policy`` is the recipe's augmentation: ``seed`` (colour jitter and rotation, the original
    write-up's), ``trivialaugment`` or ``randaugment`` (torchvision's, per image under the
    sample's policy seed, on the device). ``normalise`` maps [0, 1] floats to the network's
    input; random erasing comes after it, as on the per-image path.
    """

    def __init__(
        self,
        crop_size: int,
        interpolation: Any,
        normalise: Callable[[torch.Tensor], torch.Tensor],
        policy: str = "seed",
        random_erasing: float = 0.0,
    ) -> None:
        self.crop_size = crop_size
        self.interpolation = interpolation
        self.normalise = normalise
        self.policy = policy
        bilinear = v2.InterpolationMode.BILINEAR  # as data.augment's policies
        self.policy_step = {
            "seed": None,
            "trivialaugment": v2.TrivialAugmentWide(interpolation=bilinear),
            "randaugment": v2.RandAugment(interpolation=bilinear),
        }[policy]
        self.erasing = (
            v2.RandomErasing(p=random_erasing, value="random") if random_erasing else None
        )

    def __call__(self, images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        rows = params.cpu().tolist()  # the crop boxes and seeds as Python numbers
        crops = torch.stack(
            [
                F.resized_crop(
                    images[k],
                    *(int(row[c]) for c in (TOP, LEFT, HEIGHT, WIDTH)),
                    [self.crop_size, self.crop_size],
                    interpolation=self.interpolation,
                    antialias=True,
                )
                for k, row in enumerate(rows)
            ]
        )
        params = params.to(device=images.device, dtype=torch.float32)
        flip = params[:, FLIP].bool()
        crops = torch.where(flip[:, None, None, None], crops.flip(-1), crops)
        if self.policy_step is not None:
            crops = torch.stack(
                [
                    seeded(int(row[POLICY_SEED]), self.policy_step, crop)
                    for row, crop in zip(rows, crops, strict=True)
                ]
            )
            out = crops.float().div_(255)
        else:
            out = jitter(crops.float().div_(255), params)
            out = kornia_transform.rotate(
                out, params[:, ANGLE], mode="nearest", padding_mode="zeros"
            )
        out = self.normalise(out)
        if self.erasing is not None:
            out = torch.stack(
                [
                    seeded(int(row[POLICY_SEED]) + 1, self.erasing, image)
                    for row, image in zip(rows, out, strict=True)
                ]
            )
        return out


def jitter(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """``ColorJitter(0.2, 0.2, 0.2, 0.05)`` with each image's factors and order, on floats
    in [0, 1]: at each of the four positions, every step applies to the images whose order
    puts it there."""
    order = params[:, ORDER].long()
    steps = (
        lambda x, p: enhance.adjust_brightness_accumulative(x, p[:, BRIGHTNESS]),
        lambda x, p: enhance.adjust_contrast_with_mean_subtraction(x, p[:, CONTRAST]),
        lambda x, p: enhance.adjust_saturation_with_gray_subtraction(x, p[:, SATURATION]),
        lambda x, p: shift_hue(x, p[:, HUE_SHIFT]),
    )
    for position in range(4):
        for step_id, step in enumerate(steps):
            chosen = (order[:, position] == step_id).nonzero().flatten()
            if len(chosen):
                images[chosen] = step(images[chosen], params[chosen]).clamp_(0, 1)
    return images


# Where each output channel (r, g, b) sits on the hue hexagon: HSV to RGB's (5, 3, 1).
HEXAGON_OFFSETS = (5.0, 3.0, 1.0)


def shift_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Each image's hue turned by its ``shift`` (in turns): ``F.adjust_hue``'s HSV result
    (to ~2e-6) without building the HSV image.

    A hue shift keeps every pixel's largest and smallest channel (value and saturation), so
    only the hue is computed, shifted, and mapped straight back through the hexagon. Half
    the time of Kornia's ``adjust_hue`` and of a per-image ``F.adjust_hue`` loop on a CPU
    batch (32x3x224x224, one thread: 359 ms against 685 and 709 ms on the loaded 2-core
    machine; hue is most of the colour jitter's cost).
    """
    top, channel = images.max(dim=1, keepdim=True)
    chroma = top - images.min(dim=1, keepdim=True).values
    # Hue in sixths of a turn: (g - b) / chroma when red is largest, 2 + (b - r) / chroma
    # when green is, 4 + (r - g) / chroma when blue is.
    ahead = images.roll(-1, dims=1) - images.roll(-2, dims=1)
    hue = ahead.gather(1, channel).div_(chroma.clamp(min=1e-12)).add_(channel * 2.0)
    hue = hue.add_(shift.view(-1, 1, 1, 1) * 6).remainder_(6)
    offsets = torch.tensor(HEXAGON_OFFSETS, device=images.device).view(1, 3, 1, 1)
    k = (hue + offsets).remainder_(6)
    return top - chroma * torch.minimum(k, 4 - k).clamp_(0, 1)
