"""Training-time augmentation beyond the seed's: TrivialAugment/RandAugment, random erasing,
and MixUp/CutMix on batches (all torchvision transforms v2).

Validation and test images are never augmented; test-time augmentation is ``data/tta.py``.
"""


from __future__ import annotations


from typing import Any

import torch

from torchvision.transforms import v2

from inat_finetune.data.datamodule import output_steps, build_train_transform

from inat_finetune.models.backbones import Preprocessing



AUGMENTATIONS = ("seed", "trivialaugment", "randaugment")


def build_recipe_train_transform(
    pre: Preprocessing,
    augmentation: str = "seed",
    random_erasing: float = 0.0,
    normalise: bool = True,
) -> v2.Compose:
    """Random resized crop and flip, then the chosen policy, then random erasing.

    ``seed`` is exactly the original write-up's set (``data.build_train_transform``) when
    random erasing is off. TrivialAugment draws one operation with a random strength per
    image and has no knobs to tune; RandAugment applies two at a fixed strength. With
    random erasing the images are normalised here whatever ``normalise`` says.
    """
    if augmentation == "seed" and random_erasing == 0:
        return build_train_transform(pre, augment=True, normalise=normalise)
    steps: list[Any] = [
        v2.RandomResizedCrop(pre.crop_size, interpolation=pre.interpolation_mode, antialias=True),
        v2.RandomHorizontalFlip(),
    ]
    # The policies' rotations and shears interpolate bilinearly whatever the weights' resize
    # interpolation: torchvision's tensor kernels (prepared images are tensors) have no bicubic
    # affine transform, and for a random distortion the difference does not matter.
    policy_interpolation = v2.InterpolationMode.BILINEAR
    if augmentation == "seed":
        steps += [
            v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05),
            v2.RandomRotation(15),
        ]
    elif augmentation == "trivialaugment":
        steps.append(v2.TrivialAugmentWide(interpolation=policy_interpolation))
    elif augmentation == "randaugment":
        steps.append(v2.RandAugment(interpolation=policy_interpolation))
    else:
        raise ValueError(f"unknown augmentation {augmentation!r}; use one of {AUGMENTATIONS}")
    steps += output_steps(pre, normalise or random_erasing > 0)
    if random_erasing > 0:
        # After normalisation, so the erased patch is random noise around the dataset mean.
        steps.append(v2.RandomErasing(p=random_erasing, value="random"))
    return v2.Compose(steps)


def batch_mixer(num_classes: int, mixup_alpha: float, cutmix_alpha: float) -> Any | None:
    """MixUp, CutMix, or one of the two at random per batch; None when both are off.

    The result maps ``(images, labels)`` to ``(mixed images, soft targets)`` of shape (B, C).
    """
    mixers = []
    if mixup_alpha > 0:
        mixers.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
    if cutmix_alpha > 0:
        mixers.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)


def dominant_labels(targets: torch.Tensor) -> torch.Tensor:
    """The class that makes up most of each mixed image: what train accuracy is scored against.

    A mixed image is ``lam`` of one photo and ``1 - lam`` of another; scoring the prediction
    against the first photo's label regardless of ``lam`` would count a correct answer for a
    mostly-other image as wrong.
    """
    return targets.argmax(dim=1)

