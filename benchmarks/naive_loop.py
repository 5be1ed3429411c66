"""The reference: the original write-up's training loop, written the straightforward way.

Every epoch decodes and resizes every photo again with PIL (``ImageFolder``), runs the whole
network forward on every image in fp32 and NCHW (the linear probe included), and keeps the
whole network in ``model.train()`` (frozen BatchNorm layers update their statistics, as the
original notebook did). Adam at 1e-3, batch 32, 224 px, the best epoch chosen by validation
accuracy and then tested. It uses the project only to build the same pretrained network, to
freeze it by the same strategy and to get the same split, so that the only differences from
``inat-finetune compare`` are the speed paths.

It is the yardstick of ``run_speed.py`` and is not part of the package or of the tests.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from inat_finetune.data.folders import DataSplit, detect_layout
from inat_finetune.models.backbones import get_model
from inat_finetune.models.freezing import apply_strategy

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def naive_transforms(
    augment: bool, size: int = 224, crop_from: int | None = None
) -> tuple[transforms.Compose, transforms.Compose]:
    """The seed's PIL transforms (torchvision v1): training (augmented or not) and evaluation.

    ``crop_from``: resize each training photo to that shorter side before its random resized
    crop, as the project crops from the stored image (``augment_accuracy.py`` asks whether that
    costs accuracy)."""
    evaluation = transforms.Compose(
        [
            transforms.Resize(round(size * 256 / 224)),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )
    if not augment:
        return evaluation, evaluation
    first = [transforms.Resize(crop_from)] if crop_from else []
    training = transforms.Compose(
        [
            *first,
            transforms.RandomResizedCrop(size),
            transforms.RandomHorizontalFlip(),
            transforms.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05),
            transforms.RandomRotation(15),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )
    return training, evaluation


def image_folder(
    split: DataSplit, name: str, transform: transforms.Compose
) -> datasets.ImageFolder:
    """``ImageFolder`` over the folder that holds split ``name``, restricted to its images."""
    layout = detect_layout(split.root)
    in_test_dir = name == "test" and layout.test_dir is not None
    folder = layout.test_dir if in_test_dir else layout.train_dir
    wanted = {str(path) for path, _ in split.samples(name)}
    dataset = datasets.ImageFolder(str(Path(folder).resolve()), transform=transform)
    dataset.samples = [s for s in dataset.samples if s[0] in wanted]
    dataset.imgs, dataset.targets = dataset.samples, [label for _, label in dataset.samples]
    assert len(dataset.samples) == len(wanted), (name, len(dataset.samples), len(wanted))
    assert dataset.classes == split.classes
    return dataset


@dataclass
class NaiveResult:
    strategy: str
    wall_s: float
    best_val_acc: float
    test_acc: float


def _accuracy(model: nn.Module, loader: DataLoader) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for images, labels in loader:
            correct += (model(images).argmax(1) == labels).sum().item()
            total += len(labels)
    return correct / max(total, 1)


def run_naive(
    split: DataSplit,
    strategy: str,
    backbone: str = "mobilenet_v2",
    epochs: int = 5,
    batch_size: int = 32,
    lr: float = 1e-3,
    augment: bool = False,
    num_workers: int = 2,
    seed: int = 42,
    size: int = 224,
    crop_from: int | None = None,
) -> NaiveResult:
    """Train one strategy the naive way; wall time from building the network to the test."""
    started = time.perf_counter()
    torch.manual_seed(seed)
    train_tf, eval_tf = naive_transforms(augment, size, crop_from)
    loaders = {
        name: DataLoader(
            image_folder(split, name, train_tf if name == "train" else eval_tf),
            batch_size=batch_size,
            shuffle=name == "train",
            num_workers=num_workers,
        )
        for name in ("train", "val", "test")
    }
    built = get_model(backbone, num_classes=len(split.classes))
    model = built.model
    apply_strategy(model, built.head, strategy, 0.25)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    criterion = nn.CrossEntropyLoss()
    best_acc, best_state = -1.0, None
    for _ in range(epochs):
        model.train()
        for images, labels in loaders["train"]:
            optimizer.zero_grad()
            criterion(model(images), labels).backward()
            optimizer.step()
        val_acc = _accuracy(model, loaders["val"])
        if val_acc > best_acc:
            best_acc, best_state = val_acc, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    test_acc = _accuracy(model, loaders["test"])
    return NaiveResult(strategy, time.perf_counter() - started, best_acc, test_acc)
