"""Augmentation on the device in batches (data/batch_augment.py) against the per-image path.

Not pixels (the two interpolate and round differently) but what each image gets: its own
parameters, drawn from the per-image path's distributions, and outputs whose statistics are
distributed as the per-image path's (two-sample Kolmogorov-Smirnov statistic, fixed seeds).
Everything runs on CPU tensors, the batch path's fallback when there is no GPU.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import HYMENOPTERA
from scipy.stats import ks_2samp
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from inat_finetune.data import FineTuneDataModule, build_train_transform, load_image, make_split
from inat_finetune.data.batch_augment import (
    ANGLE,
    BRIGHTNESS,
    CONTRAST,
    FLIP,
    HEIGHT,
    HUE_SHIFT,
    ORDER,
    SATURATION,
    WIDTH,
    BatchAugment,
    DrawParams,
    collate_cropped,
    collate_padded,
    crop_box,
    crops_of,
    draw_params,
    jitter_and_rotate,
    margin_for,
    resized_crop,
    resized_crops,
)
from inat_finetune.data.datamodule import ToNormalisedFloat
from inat_finetune.models.backbones import Preprocessing

PRE = Preprocessing(64, 73, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
SAMPLES = 400
# The KS statistic's critical value at alpha = 0.001 for two samples of SAMPLES: a smaller
# statistic means the two sets could well come from one distribution.
KS_LIMIT = 1.95 * math.sqrt(2 / SAMPLES)


@pytest.fixture(scope="module")
def photo() -> torch.Tensor:
    """A real photo (structure matters for crop statistics), stored as the cache stores it."""
    path = sorted((HYMENOPTERA / "train" / "bees").iterdir())[0]
    image = F.pil_to_tensor(load_image(path))
    return F.resize(image, PRE.resize_size, antialias=True)


def augment_on_device(
    image: torch.Tensor, seeds: list[int], crops_in_loader: bool = False, **options
) -> tuple:
    """The batch path end to end: each sample's parameters under its seed, collate, augment;
    the crops made by the loader (``DrawParams``) or by the batch call."""
    crop_size = PRE.crop_size if crops_in_loader else None
    draw = DrawParams(PRE.resize_size, PRE.interpolation_mode, crop_size)
    items = []
    for seed in seeds:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            items.append((draw(image), 0))
    collate = collate_cropped if crops_in_loader else collate_padded
    images, _, params = collate(items)
    normalise = ToNormalisedFloat(PRE.mean, PRE.std)
    augment = BatchAugment(
        PRE.crop_size, PRE.interpolation_mode, normalise, crops_in_loader=crops_in_loader, **options
    )
    return augment(images, params), params


def augment_per_image(image: torch.Tensor, seeds: list[int]) -> torch.Tensor:
    transform = build_train_transform(PRE, augment=True, normalise=True)
    out = []
    for seed in seeds:
        torch.manual_seed(seed)
        out.append(transform(tv_tensors.Image(image)))
    return torch.stack(out)


@pytest.mark.parametrize(
    "options",
    [{}, {"policy": "trivialaugment", "random_erasing": 0.5}, {"policy": "randaugment"}],
    ids=["seed", "trivialaugment+erasing", "randaugment"],
)
def test_identical_images_in_a_batch_come_out_different(photo, options):
    out, params = augment_on_device(photo, list(range(8)), **options)
    assert out.shape == (8, 3, PRE.crop_size, PRE.crop_size) and out.dtype == torch.float32
    for a in range(8):
        for b in range(a + 1, 8):
            assert not torch.equal(out[a], out[b]), (a, b)
    # The same seeds give the same batch: the parameters are all there is to the randomness.
    again, _ = augment_on_device(photo, list(range(8)), **options)
    assert torch.equal(out, again)
    # And where the crops are made changes nothing.
    cropped_in_loader, _ = augment_on_device(photo, list(range(8)), True, **options)
    assert torch.equal(out, cropped_in_loader)


def test_crop_boxes_are_random_resized_crops_draws():
    reference = v2.RandomResizedCrop(PRE.crop_size)
    image = [tv_tensors.Image(torch.zeros(3, 73, 97, dtype=torch.uint8))]
    torch.manual_seed(0)
    ours = torch.tensor([crop_box(73, 97) for _ in range(SAMPLES * 5)], dtype=torch.float64)
    theirs = []
    for _ in range(SAMPLES * 5):
        p = reference.make_params(image)
        theirs.append((p["top"], p["left"], p["height"], p["width"]))
    theirs = torch.tensor(theirs, dtype=torch.float64)
    for name, of in {
        "area": lambda b: b[:, 2] * b[:, 3] / (73 * 97),
        "aspect": lambda b: (b[:, 3] / b[:, 2]).log(),
        "centre x": lambda b: b[:, 1] + b[:, 3] / 2,
        "centre y": lambda b: b[:, 0] + b[:, 2] / 2,
    }.items():
        assert ks_2samp(of(ours), of(theirs)).statistic < 1.95 * math.sqrt(2 / (SAMPLES * 5)), name


def test_parameters_follow_the_per_image_transforms(photo):
    draw = DrawParams(PRE.resize_size, PRE.interpolation_mode)
    torch.manual_seed(0)
    params = torch.stack([draw(photo)[1] for _ in range(SAMPLES)])
    assert abs(params[:, FLIP].mean().item() - 0.5) < 0.1
    for column, low, high in ((BRIGHTNESS, 0.8, 1.2), (HUE_SHIFT, -0.05, 0.05), (ANGLE, -15, 15)):
        uniform = torch.linspace(low, high, SAMPLES)
        assert ks_2samp(params[:, column], uniform).statistic < KS_LIMIT, column
    area = params[:, HEIGHT] * params[:, WIDTH] / (photo.shape[-2] * photo.shape[-1])
    assert area.min() > 0.07 and area.max() <= 1


def test_outputs_are_distributed_as_the_per_image_paths(photo):
    seeds = list(range(SAMPLES))
    device, _ = augment_on_device(photo, seeds)
    per_image = augment_per_image(photo, [s + 10_000 for s in seeds])
    statistics = {
        "mean": lambda x: x.mean(dim=(1, 2, 3)),
        "contrast": lambda x: x.std(dim=(1, 2, 3)),
        "red minus blue": lambda x: (x[:, 0] - x[:, 2]).mean(dim=(1, 2)),
        "left minus right": lambda x: (
            x[..., :32].mean(dim=(1, 2, 3)) - x[..., 32:].mean(dim=(1, 2, 3))
        ),
        "black corners": lambda x: (
            (x[:, :, :4, :4] == x.amin(dim=(1, 2, 3), keepdim=True)).float().mean(dim=(1, 2, 3))
        ),
    }
    for name, statistic in statistics.items():
        result = ks_2samp(statistic(device), statistic(per_image))
        assert result.statistic < KS_LIMIT, (name, result)


@pytest.mark.parametrize(
    "crop_in_loader", [True, False], ids=["crops-in-loader", "crops-on-device"]
)
def test_the_datamodule_augments_train_batches_after_the_transfer(image_folder, crop_in_loader):
    split = make_split(image_folder({"a": 6, "b": 6}))
    dm = FineTuneDataModule(
        split,
        PRE.at_size(32),
        batch_size=4,
        num_workers=0,
        augment_on="device",
        crop_in_loader=crop_in_loader,
    )
    batch = next(iter(dm.train_dataloader()))
    images, labels, params = batch
    assert images.dtype == torch.uint8 and params.shape[0] == len(labels) == 4
    if crop_in_loader:  # the crops on their canvas, channels last
        assert images.shape == (4, 32 + 2 * margin_for(32), 32 + 2 * margin_for(32), 4)
    else:  # the stored images, padded to the largest
        assert min(images.shape[-2:]) >= PRE.at_size(32).resize_size
    out, out_labels = dm.on_after_batch_transfer(batch)
    assert out.shape == (4, 3, 32, 32) and out.dtype == torch.float32
    assert out_labels is labels
    # Validation batches are only normalised.
    val_images, _ = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())))
    assert val_images.shape[1:] == (3, 32, 32) and val_images.dtype == torch.float32


MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def mid_range_batch(count: int = 12, size: int = 32) -> tuple:
    """Stored images in 77-178 (no jitter step clamps them), their canvas of crops, the crops
    as ``F.resized_crop`` cuts them, and the images' parameters."""
    torch.manual_seed(0)
    images = torch.randint(77, 179, (count, 3, 40, 50), dtype=torch.uint8)
    params = torch.tensor([draw_params(40, 50) for _ in range(count)], dtype=torch.float64)
    canvas, means = resized_crops(images, params.tolist(), size, "bilinear")
    return images, canvas, means, params.float()


def torchvision_chain(crops: torch.Tensor, params: torch.Tensor, steps: str) -> torch.Tensor:
    """The per-image path's functional ops, each image's jitter steps in its drawn order (only
    those named in ``steps``: b, c, s, h), then the flip and rotation, normalised."""
    ops = {
        0: ("b", lambda x, p: F.adjust_brightness(x, p[BRIGHTNESS])),
        1: ("c", lambda x, p: F.adjust_contrast(x, p[CONTRAST])),
        2: ("s", lambda x, p: F.adjust_saturation(x, p[SATURATION])),
        3: ("h", lambda x, p: F.adjust_hue(x, p[HUE_SHIFT])),
    }
    out = []
    for crop, p in zip(crops.float() / 255, params.tolist(), strict=True):
        for step in params.new_tensor(p)[ORDER].long().tolist():
            name, op = ops[step]
            crop = op(crop, p) if name in steps else crop
        crop = F.horizontal_flip(crop) if p[FLIP] else crop
        out.append(F.rotate(crop, p[ANGLE]))  # nearest, black corners
    return F.normalize(torch.stack(out), MEAN, STD)


def without(params: torch.Tensor, steps: str) -> torch.Tensor:
    """``params`` with the jitter steps not named in ``steps`` set to do nothing."""
    params = params.clone()
    for name, column, identity in (
        ("b", BRIGHTNESS, 1.0),
        ("c", CONTRAST, 1.0),
        ("s", SATURATION, 1.0),
        ("h", HUE_SHIFT, 0.0),
    ):
        if name not in steps:
            params[:, column] = identity
    return params


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
def test_crops_on_the_canvas_are_torchvisions_resized_crops(interpolation):
    torch.manual_seed(1)
    images = torch.randint(0, 256, (6, 3, 60, 80), dtype=torch.uint8)
    rows = [draw_params(60, 80) for _ in range(6)]
    canvas, means = resized_crops(images, rows, 32, interpolation)
    expected = torch.stack(
        [
            F.resized_crop(
                image, *(int(v) for v in row[:4]), [32, 32], interpolation, antialias=True
            )
            for image, row in zip(images, rows, strict=True)
        ]
    )
    assert torch.equal(crops_of(canvas, 32), expected)
    torch.testing.assert_close(means, expected.float().mean(dim=(2, 3)) / 255)
    margin = margin_for(32)
    alpha = canvas[..., 3]
    assert (alpha[:, margin : margin + 32, margin : margin + 32] == 255).all()
    assert alpha.sum() == 255 * 6 * 32 * 32 and canvas[alpha == 0].sum() == 0  # a black margin


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_a_crop_on_the_cpu_comes_out_in_contiguous_channels_last_memory(interpolation):
    # The canvas takes it as whole rows of 4-byte pixels; a transposed crop would cost a
    # worker a strided copy per image.
    image = torch.randint(0, 256, (3, 60, 80), dtype=torch.uint8)
    crop = resized_crop(image, (5, 7, 40, 50), 32, interpolation)
    assert crop.shape == (32, 32, 4) and crop.is_contiguous()


def test_flip_and_rotation_are_torchvisions_pixels():
    _, canvas, means, params = mid_range_batch()
    crops = crops_of(canvas, 32)
    params = without(params, "")
    assert params[:, FLIP].sum() not in (0, len(params))  # both kinds in the batch
    out = jitter_and_rotate(canvas, means, params, 32, MEAN, STD)
    torch.testing.assert_close(out, torchvision_chain(crops, params, ""), atol=1e-5, rtol=0)


@pytest.mark.parametrize("steps", ["b", "c", "s", "bcs"])
def test_the_colour_matrix_is_torchvisions_jitter_where_nothing_clamps(steps):
    # Brightness, contrast and saturation are affine: composed in each image's order they
    # are exact (the contrast's mean grey is taken where the image's order puts it).
    _, canvas, means, params = mid_range_batch()
    params = without(params, steps)
    out = jitter_and_rotate(canvas, means, params, 32, MEAN, STD)
    expected = torchvision_chain(crops_of(canvas, 32), params, steps)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def hue_angle_and_chroma(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each pixel's hue as an angle on the chroma plane (degrees) and its chroma (max - min)."""
    r, g, b = images.unbind(dim=1)
    angle = torch.rad2deg(torch.atan2(math.sqrt(3) * (g - b), 2 * r - g - b))
    return angle, images.amax(dim=1) - images.amin(dim=1)


def test_the_hue_rotation_turns_hues_as_torchvisions_hsv_shift():
    # A rotation about the grey axis is not the HSV hexagon's shift: it keeps each pixel's
    # chroma and turns its hue by the drawn angle, where HSV keeps the largest and smallest
    # channel. At the largest shifts (18 degrees) the two agree to 2.1 degrees, chroma to 1% on
    # average;
    # a wrong sign would be 36 degrees off, a wrong scale 18.
    _, canvas, means, params = mid_range_batch(count=16)
    params = without(params, "h")
    params[:, HUE_SHIFT] = torch.where(params[:, HUE_SHIFT] < 0, -0.05, 0.05)
    std, mean = torch.tensor(STD).view(1, 3, 1, 1), torch.tensor(MEAN).view(1, 3, 1, 1)
    ours = jitter_and_rotate(canvas, means, params, 32, MEAN, STD) * std + mean
    theirs = torchvision_chain(crops_of(canvas, 32), params, "h") * std + mean
    (angle, chroma), (their_angle, their_chroma) = map(hue_angle_and_chroma, (ours, theirs))
    coloured = their_chroma > 0.05
    off = (angle - their_angle + 180).remainder(360) - 180
    assert off[coloured].abs().max() < 2.5
    assert abs((chroma[coloured] / their_chroma[coloured]).mean() - 1) < 0.02  # no saturation


@pytest.mark.parametrize(
    "crop_in_loader", [True, False], ids=["crops-in-loader", "crops-on-device"]
)
def test_a_worker_hands_over_the_batches_the_main_process_makes(image_folder, crop_in_loader):
    """In a worker the batch is built in shared memory (``batch_buffer``): the same batches,
    each sample augmented under its own seed wherever it was read."""
    split = make_split(image_folder({"a": 5, "b": 5}))

    def batches(workers: int) -> list:
        dm = FineTuneDataModule(
            split,
            PRE.at_size(32),
            batch_size=4,
            num_workers=workers,
            augment_on="device",
            crop_in_loader=crop_in_loader,
        )
        return [dm.on_after_batch_transfer(batch) for batch in dm.train_dataloader()]

    in_process, from_worker = batches(0), batches(1)
    assert len(in_process) == len(from_worker) == 2
    for (a, labels_a), (b, labels_b) in zip(in_process, from_worker, strict=True):
        assert torch.equal(a, b) and torch.equal(labels_a, labels_b)
