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
    FLIP,
    HEIGHT,
    HUE_SHIFT,
    WIDTH,
    BatchAugment,
    DrawParams,
    collate_padded,
    crop_box,
    shift_hue,
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


def augment_on_device(image: torch.Tensor, seeds: list[int], **options) -> tuple:
    """The batch path end to end: each sample's parameters under its seed, collate, augment."""
    draw = DrawParams(PRE.resize_size, PRE.interpolation_mode)
    items = []
    for seed in seeds:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            items.append((draw(image), 0))
    images, _, params = collate_padded(items)
    normalise = ToNormalisedFloat(PRE.mean, PRE.std)
    augment = BatchAugment(PRE.crop_size, PRE.interpolation_mode, normalise, **options)
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


def test_the_datamodule_augments_train_batches_after_the_transfer(image_folder):
    split = make_split(image_folder({"a": 6, "b": 6}))
    dm = FineTuneDataModule(
        split, PRE.at_size(32), batch_size=4, num_workers=0, augment_on="device"
    )
    batch = next(iter(dm.train_dataloader()))
    images, labels, params = batch
    assert images.dtype == torch.uint8 and params.shape[0] == len(labels) == 4
    assert min(images.shape[-2:]) >= PRE.at_size(32).resize_size  # the stored size, padded
    out, out_labels = dm.on_after_batch_transfer(batch)
    assert out.shape == (4, 3, 32, 32) and out.dtype == torch.float32
    assert out_labels is labels
    # Validation batches are only normalised.
    val_images, _ = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())))
    assert val_images.shape[1:] == (3, 32, 32) and val_images.dtype == torch.float32


def test_the_hand_written_hue_shift_is_torchvisions():
    torch.manual_seed(0)
    images = torch.rand(6, 3, 16, 16)
    images[0] = 0.5  # grey: no hue to turn
    shifts = torch.tensor([0.05, -0.05, 0.01, 0.5, -0.3, 0.0])
    expected = torch.stack([F.adjust_hue(i, float(s)) for i, s in zip(images, shifts, strict=True)])
    torch.testing.assert_close(shift_hue(images, shifts), expected, atol=1e-5, rtol=0)
