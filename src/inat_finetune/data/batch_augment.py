"""Training augmentation on whole batches after the transfer (``--augment-on device``).

The per-image path (``--augment-on cpu``, ``data.augment``) crops, flips, jitters and rotates
every image in the loader's workers; its colour jitter alone costs ~5 ms per 224-px image on
one core. Here the workers only read the stored uint8 image (shorter side ``resize_size``,
as the prepared-image cache holds it) and draw that image's random parameters; the collate
pads the batch to its largest image and stacks the parameters; ``BatchAugment`` then applies
them to the whole batch on the device (the GPU, or the CPU batch when there is none), as
TorchGeo applies its augmentations in ``on_after_batch_transfer``. Without a GPU the workers
also make each image's random resized crop (``DrawParams(crop_size=...)``,
``collate_cropped``, ``BatchAugment(crops_in_loader=True)``; the same pixels): the crop is the
one step with nothing to gain from a batch, and there the "device" is the main process, which
then shares the CPU's cores with the workers instead of doing the crops alone.

The contract: each image gets its own parameters, drawn from the same distributions as the
per-image path (``v2.RandomResizedCrop`` with scale (0.08, 1) and ratio (3/4, 4/3) over the
whole stored image, flip with p=0.5, ``ColorJitter(0.2, 0.2, 0.2, 0.05)`` in a random order
per image, ``RandomRotation(15)`` with nearest interpolation and black corners; the recipes'
TrivialAugment/RandAugment and random erasing). The parameters are drawn in the worker
under the sample's own seed (``data.sampling.SeededSamples``: a function of run seed, epoch
and sample index), so a resumed run augments every sample as the uninterrupted one did,
whatever the batch composition.

How the batch is augmented (``BatchAugment``, seed policy), and what differs from the
per-image path's pixels (the distributions match: ``tests/test_batch_augment.py``):

* ``resized_crop``: each crop box through torch's antialiased ``interpolate`` on
  channels-last RGBA uint8 (the colour bit for bit ``F.resized_crop``'s crop; a fourth
  channel of 255), written onto a canvas with a margin of (0, 0, 0, 0) (``crop_canvas``), in
  the loader's workers or on the device;
* ``flip_rotation_index``: the flip and the nearest-neighbour rotation only move pixels, so
  they are one ``gather`` of whole RGBA pixels (viewed as int32) from the canvas: the same
  pixels as ``F.horizontal_flip`` then ``F.rotate``, corners read from the margin;
* ``colour_matrices``: brightness (``x b``), contrast (``x c + (1 - c) mean grey``),
  saturation (blend with each pixel's grey: a 3x3 matrix) and hue are affine in RGB, so each
  image's four steps, in its drawn order, and the normalisation compose into one 3x4 matrix
  (the contrast's mean grey at its place in the chain is a linear function of the crop's
  channel means, taken once); one ``baddbmm`` applies all of them, the fourth channel maps
  the corners to black, and one clamp per channel ends it. Brightness, contrast and
  saturation are exact in float, but only the end result is clamped to [0, 1]: the per-image
  path rounds to uint8 and clamps after every step, so a pixel one step pushes past white and
  the next pulls back keeps its excess here.
* The hue shift is a rotation of RGB about the grey axis, as NVIDIA DALI's ``hsv`` operator
  approximates it, not ``F.adjust_hue``'s HSV round trip: it keeps each pixel's chroma where
  HSV keeps its largest and smallest channel, and turns hues as ``F.adjust_hue`` does to
  2.1 degrees at the largest shift (18 degrees). Per pixel it differs from ``F.adjust_hue`` by
  0.017 on average (0-1 scale, mid-range noise images, the shift itself moving them 0.020),
  where a rotation of YIQ's chroma plane (TensorFlow's ``adjust_hsv_in_yiq``) measured twice
  as far (largest difference 0.20 against 0.09).

Measured on the shared 2-core machine under load (load average 6-8: indicative), one
thread, a batch of 32 prepared 256x341 uint8 images to 224-px crops, fastest of 10
interleaved calls (``PYTHONPATH=src python benchmarks/batch_augment_steps.py``; "before" is
this module at commit 1af1903, timed the same way side by side):

==============================================  ==================================  =======
step                                            before (per image + Kornia)         now
==============================================  ==================================  =======
resized crops                                   27 ms (``F.resized_crop``)          38 ms
flip, colour jitter, rotation, normalisation    374 ms (jitter 315, rotation 53)    50 ms
                                                + normalise 6
whole call                                      437 ms                              80 ms
==============================================  ==================================  =======

The crops then included the canvas (zeroing, the fourth channel, the per-crop sums); the
``affine_grid`` + nearest ``grid_sample`` way of rotating measured several times slower than
the gather, and a bilinear ``grid_sample`` folding crop and rotation together would drop the
crop's antialiasing. ``benchmarks/data_pipeline.py`` has the loader-level figures.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch.utils.data import get_worker_info
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from inat_finetune.data.colour_matrix import colour_matrices

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
CHANNEL_MEANS = slice(15, 18)  # the crop's, in [0, 1]: filled where the crop is made
PARAMS = 18


CROP_TRIES = 10  # as v2.RandomResizedCrop: then the fallback


def crop_box(height: int, width: int) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random resized crop: ``v2.RandomResizedCrop``'s
    distribution (up to ``CROP_TRIES`` area and aspect draws, the first that fits, then a
    uniform position), from one call to torch's global RNG: a worker draws it per image, where
    the ~40 small calls of the reference's loop cost more than the crop's resize."""
    u = torch.rand(2 * CROP_TRIES + 2, dtype=torch.float64).tolist()
    area = height * width
    low, high = math.log(RATIO[0]), math.log(RATIO[1])
    for k in range(CROP_TRIES):
        target_area = area * (SCALE[0] + (SCALE[1] - SCALE[0]) * u[2 * k])
        aspect = math.exp(low + (high - low) * u[2 * k + 1])
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = min(int(u[-2] * (height - h + 1)), height - h)
            left = min(int(u[-1] * (width - w + 1)), width - w)
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


def draw_params(height: int, width: int) -> list[float]:
    """One image's parameters (a row of ``PARAMS`` Python numbers) from torch's global RNG
    (seeded per sample by the loader): the crop box, then the rest from one more call."""
    values = [0.0] * PARAMS  # CHANNEL_MEANS stay 0 until the crop is made
    values[TOP], values[LEFT], values[HEIGHT], values[WIDTH] = crop_box(height, width)
    u = torch.rand(11, dtype=torch.float64).tolist()
    values[FLIP] = float(u[0] < 0.5)
    values[ORDER] = sorted(range(4), key=lambda step: u[1 + step])  # a uniform permutation
    values[BRIGHTNESS], values[CONTRAST], values[SATURATION] = (
        1 - JITTER + 2 * JITTER * v for v in u[5:8]
    )
    values[HUE_SHIFT] = -HUE + 2 * HUE * u[8]
    values[ANGLE] = -ROTATION + 2 * ROTATION * u[9]
    values[POLICY_SEED] = float(int(u[10] * (2**31 - 1)))
    return values


class DrawParams:
    """The loader's whole training transform on this path: the uint8 image as it is stored,
    with its random parameters. ``resize_size`` resizes images that are not already stored at
    that size (the path without the prepared-image cache).

    With ``crop_size`` the loader also makes the random resized crop (``resized_crop``) and
    hands over the ``crop_size`` x ``crop_size`` x 4 crop (channels last) with its channel
    means in the parameters' ``CHANNEL_MEANS``: for ``collate_cropped`` and a
    ``BatchAugment(crops_in_loader=True)``."""

    def __init__(self, resize_size: int, interpolation: Any, crop_size: int | None = None) -> None:
        self.resize_size = resize_size
        self.interpolation = interpolation
        self.crop_size = crop_size

    def __call__(self, image: Any) -> tuple[torch.Tensor, torch.Tensor]:
        tensor = F.to_image(image).as_subclass(torch.Tensor)
        if min(tensor.shape[-2:]) != self.resize_size:
            tensor = F.resize(
                tensor, self.resize_size, interpolation=self.interpolation, antialias=True
            )
        values = draw_params(*tensor.shape[-2:])
        if self.crop_size is not None:
            tensor = resized_crop(tensor, box(values), self.crop_size, self.interpolation)
            values[CHANNEL_MEANS] = crop_means(tensor).tolist()
        return tensor, torch.tensor(values, dtype=torch.float64)

    def __repr__(self) -> str:
        crop = "" if self.crop_size is None else f", crop_size={self.crop_size}"
        return f"{type(self).__name__}(resize_size={self.resize_size}{crop})"


def collate_padded(
    samples: Sequence[tuple[tuple[torch.Tensor, torch.Tensor], int]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(uint8 images padded to the batch's largest, labels, parameters): one fixed-size batch.

    The crop boxes lie inside each image's own area, so the padding is never read (nor set).
    """
    height = max(image.shape[-2] for (image, _), _ in samples)
    width = max(image.shape[-1] for (image, _), _ in samples)
    images = batch_buffer((len(samples), 3, height, width))
    for k, ((image, _), _) in enumerate(samples):
        images[k, :, : image.shape[-2], : image.shape[-1]] = image
    params = torch.stack([row for (_, row), _ in samples])
    labels = torch.tensor([label for _, label in samples])
    return images, labels, params


def collate_cropped(
    samples: Sequence[tuple[tuple[torch.Tensor, torch.Tensor], int]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the crops of ``DrawParams(crop_size=...)`` on a ``crop_canvas``, labels, parameters)."""
    size = samples[0][0][0].shape[0]
    canvas, inner = crop_canvas(len(samples), size)
    for k, ((crop, _), _) in enumerate(samples):
        inner[k] = crop
    params = torch.stack([row for (_, row), _ in samples])
    labels = torch.tensor([label for _, label in samples])
    return canvas, labels, params


def batch_buffer(shape: tuple[int, ...], device: Any = None) -> torch.Tensor:
    """An uninitialised uint8 tensor for a batch, on ``device``; in a loader worker, in shared
    memory, as ``default_collate`` allocates its batches: handing it to the main process then
    copies nothing (a tensor in private memory is copied into a new shared segment on the way)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8, device=device)
    storage = torch.UntypedStorage._new_shared(math.prod(shape))
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)


def is_padded_batch(batch: Any) -> bool:
    """Whether ``batch`` came from ``collate_padded`` or ``collate_cropped`` (and still needs
    augmenting)."""
    return isinstance(batch, (tuple, list)) and len(batch) == 3 and batch[0].dtype == torch.uint8


def seeded(seed: int, step: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor) -> Any:
    """``step(image)`` under its own seed, leaving the global RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        return step(image)


class Normalisation(Protocol):
    """``data.datamodule.ToNormalisedFloat``: what ``BatchAugment`` folds into its matrices."""

    mean: Sequence[float]
    std: Sequence[float]

    def __call__(self, image: torch.Tensor) -> torch.Tensor: ...


class BatchAugment:
    """Applies a padded batch's per-sample parameters on the batch's device.

    ``crops_in_loader``: the batches come from ``collate_cropped`` (the loader made the random
    resized crops) rather than ``collate_padded`` (this call makes them).
    ``policy`` is the recipe's augmentation: ``seed`` (colour jitter and rotation, the original
    write-up's), ``trivialaugment`` or ``randaugment`` (torchvision's, per image under the
    sample's policy seed, on the device). ``normalise`` maps [0, 1] floats to the network's
    input (its mean and std are folded into the seed policy's colour matrices); random erasing
    comes after it, as on the per-image path.
    """

    def __init__(
        self,
        crop_size: int,
        interpolation: Any,
        normalise: Normalisation,
        policy: str = "seed",
        random_erasing: float = 0.0,
        crops_in_loader: bool = False,
    ) -> None:
        self.crop_size = crop_size
        self.crops_in_loader = crops_in_loader
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
        if self.crops_in_loader:
            canvas, means = images, params[:, CHANNEL_MEANS].to(images.device, torch.float32)
        else:
            canvas, means = resized_crops(images, rows, self.crop_size, self.interpolation)
        params = params.to(device=images.device, dtype=torch.float32)
        if self.policy_step is None:
            out = jitter_and_rotate(
                canvas,
                means,
                params,
                self.crop_size,
                self.normalise.mean,
                self.normalise.std,
            )
        else:
            crops = crops_of(canvas, self.crop_size)
            flip = params[:, FLIP].bool()
            crops = torch.where(flip[:, None, None, None], crops.flip(-1), crops)
            crops = torch.stack(
                [
                    seeded(int(row[POLICY_SEED]), self.policy_step, crop)
                    for row, crop in zip(rows, crops, strict=True)
                ]
            )
            out = self.normalise(crops)
        if self.erasing is not None:
            out = torch.stack(
                [
                    seeded(int(row[POLICY_SEED]) + 1, self.erasing, image)
                    for row, image in zip(rows, out, strict=True)
                ]
            )
        return out


def margin_for(size: int) -> int:
    """Black pixels around each crop on the canvas: enough that a crop of ``size`` rotated by
    up to ``ROTATION`` degrees reads only canvas pixels (its corners reach ``(size - 1) / 2 *
    (cos + sin)`` from the centre)."""
    reach = (size - 1) / 2 * (math.cos(math.radians(ROTATION)) + math.sin(math.radians(ROTATION)))
    return math.ceil(reach - (size - 1) / 2) + 1


def crop_canvas(count: int, size: int, device: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A B x P x P x 4 uint8 canvas (channels last, a ``batch_buffer``) for ``size``-px RGBA
    crops, and the view of its middle where they go (left for the caller to fill);
    ``margin_for(size)`` pixels of (0, 0, 0, 0) around it: black, and a fourth channel of 0."""
    margin = margin_for(size)
    padded = size + 2 * margin
    canvas = batch_buffer((count, padded, padded, 4), device)
    for strip in (
        canvas[:, :margin],
        canvas[:, margin + size :],
        canvas[:, margin : margin + size, :margin],
        canvas[:, margin : margin + size, margin + size :],
    ):
        strip.zero_()
    return canvas, canvas[:, margin : margin + size, margin : margin + size]


def resized_crop(
    image: torch.Tensor, crop: tuple[int, int, int, int], size: int, interpolation: Any
) -> torch.Tensor:
    """The (top, left, height, width) ``crop`` of a 3 x H x W uint8 image resized to ``size`` x
    ``size`` (antialiased), with a fourth channel of 255, channels last (size x size x 4): the
    colour channels bit for bit ``F.resized_crop``'s.

    On the CPU torch's ``interpolate`` runs on the box copied to four-channel channels-last
    memory, the layout its vectorised uint8 kernel works in (twice as fast as with three
    channels, which it pads to four), so the result needs no transposition and is copied onto
    a canvas as whole 4-byte pixels.
    Elsewhere (another device, another interpolation) it is torchvision's own resize, which
    handles uint8 on any device."""
    top, left, height, width = crop
    region = image[:, top : top + height, left : left + width]
    mode = v2.InterpolationMode(interpolation).value
    if image.device.type == "cpu" and mode in ("bilinear", "bicubic"):
        rgba = torch.empty(height, width, 4, dtype=torch.uint8)
        rgba[..., :3] = region.permute(1, 2, 0)
        rgba[..., 3] = 255
        # A batch dimension in front of the channels-last image, so that interpolate sees
        # channels-last memory and returns it (``rgba.permute(2, 0, 1)[None]`` gets an output
        # in channels-first memory, which every later copy then has to transpose).
        out = torch.nn.functional.interpolate(
            rgba[None].permute(0, 3, 1, 2), size=(size, size), mode=mode, antialias=True
        )[0].permute(1, 2, 0)
        out[..., 3] = 255  # interpolating a constant channel may round it to 254 elsewhere
        return out
    rgb = F.resize(region, [size, size], interpolation=interpolation, antialias=True)
    return torch.cat([rgb, torch.full_like(rgb[:1], 255)]).permute(1, 2, 0)


def crop_means(crop: torch.Tensor) -> torch.Tensor:
    """A ``resized_crop``'s channel means in [0, 1] (float32, three values; summed per crop,
    which measured 8x faster than over a batch of crops on a canvas)."""
    sums = crop.sum(dim=(0, 1), dtype=torch.float32)[:3]  # all four: a contiguous reduction
    return sums / (255 * crop.shape[0] * crop.shape[1])


def resized_crops(
    images: torch.Tensor, rows: list[list[float]], size: int, interpolation: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's crop box (``resized_crop``) on a ``crop_canvas``, and each crop's channel
    means (B x 3, ``crop_means``)."""
    canvas, inner = crop_canvas(len(rows), size, images.device)
    means = []
    for k, row in enumerate(rows):
        crop = resized_crop(images[k], box(row), size, interpolation)
        inner[k] = crop
        means.append(crop_means(crop))
    return canvas, torch.stack(means)


def box(row: Sequence[float]) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a parameter row's crop."""
    return int(row[TOP]), int(row[LEFT]), int(row[HEIGHT]), int(row[WIDTH])


def crops_of(canvas: torch.Tensor, size: int) -> torch.Tensor:
    """The B x 3 x size x size uint8 crops on a ``resized_crops`` canvas."""
    margin = margin_for(size)
    crops = canvas[:, margin : margin + size, margin : margin + size, :3]
    return crops.permute(0, 3, 1, 2).contiguous()


def jitter_and_rotate(
    canvas: torch.Tensor,
    channel_means: torch.Tensor,
    params: torch.Tensor,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """Flip, colour jitter, rotation and normalisation of a ``resized_crops`` canvas of
    ``size``-px crops (with their channel means): normalised float32 B x 3 x size x size.

    The flip and the nearest-neighbour rotation move pixels without changing them: one
    ``gather`` of whole RGBA pixels (as int32) from the canvas (``flip_rotation_index``);
    where the rotated image has no pixel it reads the black margin, whose fourth channel 0
    lets the colour matrices map it to black. The jitter and the normalisation are one affine
    colour map per image (``colour_matrices``): one batched matmul and one clamp per channel.
    """
    b, padded = canvas.shape[:2]
    index = flip_rotation_index(params, size, margin_for(size))
    rgba = canvas.view(torch.int32).view(b, padded * padded).gather(1, index)
    rgba = rgba.view(torch.uint8).view(b, size * size, 4)
    pixels = torch.empty(b, 4, size * size, device=canvas.device)
    pixels.copy_(rgba.transpose(1, 2))  # float and channels first in one copy
    matrices, low = colour_matrices_of(params, channel_means, mean, std)
    out = torch.baddbmm(low.view(1, 3, 1), matrices, pixels)
    for channel, (m, s) in enumerate(zip(mean, std, strict=True)):
        # A scalar clamp per channel, from Python numbers: 3x faster than tensor bounds on the
        # CPU, and no wait on a GPU.
        out[:, channel].clamp_(-m / s, (1 - m) / s)
    return out.view(b, 3, size, size)


def colour_matrices_of(
    params: torch.Tensor, channel_means: torch.Tensor, mean: Sequence[float], std: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``colour_matrix.colour_matrices`` of a batch's parameter rows (float) and channel means."""
    return colour_matrices(
        params[:, [BRIGHTNESS, CONTRAST, SATURATION]],
        params[:, HUE_SHIFT],
        params[:, ORDER].long(),
        channel_means,
        mean,
        std,
    )


def flip_rotation_index(params: torch.Tensor, size: int, margin: int) -> torch.Tensor:
    """B x size² indices into each canvas (``resized_crops``): where each output pixel comes
    from once the crop is flipped (when drawn) and rotated by its angle, nearest neighbour,
    counter-clockwise about the centre (``kornia.geometry.rotate``'s and ``F.rotate``'s
    pixels, ``tests/test_batch_augment.py``).

    Computed directly rather than with ``affine_grid`` and ``grid_sample``, which measured
    several times slower on the CPU for this nearest-neighbour lookup."""
    angle = params[:, ANGLE] * (math.pi / 180)
    cos, sin = angle.cos().view(-1, 1, 1), angle.sin().view(-1, 1, 1)
    mirror = 1 - 2 * params[:, FLIP].view(-1, 1, 1)  # -1: read the crop mirrored
    centre = (size - 1) / 2
    across = torch.arange(size, device=params.device, dtype=torch.float32) - centre
    x, y = across.view(1, 1, size), across.view(1, size, 1)
    column = ((cos * mirror) * x + (centre + margin - sin * mirror * y)).round_()
    row = (sin * x + (cos * y + centre + margin)).round_()
    return (row * (size + 2 * margin) + column).long().view(-1, size * size)
