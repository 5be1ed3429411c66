"""From a split to batches: transforms, datasets and the Lightning datamodule.

``FineTuneDataModule`` turns a ``DataSplit`` into train, validation and test loaders. Its
loaders hand over uint8 images by default and normalise each batch on the device after the
transfer (``on_after_batch_transfer``, as TorchGeo does): a quarter of the bytes through the
workers' shared memory and the host-to-device copy. The train loader's order and each
sample's augmentation are functions of (seed, epoch, index) (``data.sampling``), so a run
resumes exactly. With ``augment_on="device"`` the train loader hands over padded uint8 images
with each one's random parameters, and the same hook augments the batch there
(``data.batch_augment``); ``"cpu"`` augments each image in the workers. Code that iterates the loaders outside a Trainer calls
``datamodule.on_after_batch_transfer(batch)`` or builds it with ``normalise_on_device=False``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from inat_finetune.data.batch_augment import (
    BatchAugment,
    DrawParams,
    collate_cropped,
    collate_padded,
    is_padded_batch,
)
from inat_finetune.data.folders import DataSplit
from inat_finetune.data.images import load_image, unusable_after_scan
from inat_finetune.errors import UserError
from inat_finetune.models.backbones import Preprocessing
from inat_finetune.runtime.allocator import keep_freed_memory
from inat_finetune.runtime.distributed import evaluation_sampler


class ImageListDataset(Dataset):
    """(image path, label) pairs decoded on access."""

    def __init__(
        self, samples: Sequence[tuple[Path, int]], transform: Any, draft_size: int | None = None
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.draft_size = draft_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        try:
            image = load_image(path, self.draft_size)
        except (OSError, ValueError) as exc:
            raise UserError(unusable_after_scan(path, exc)) from exc
        return self.transform(image), label


class ToNormalisedFloat:
    """Image to normalised float32 ``(x / 255 - mean) / std`` in one subtraction and one
    multiplication.

    The same values as ``ToImage``, ``ToDtype(scale=True)`` and ``Normalize`` (to ~1e-6) in
    about half the time: reading a prepared image costs little more than this step, so it
    bounds the prepared cache's images/s.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean, self.std = tuple(mean), tuple(std)
        self._shift = {  # by input dtype: uint8 holds 0-255, floats 0-1
            torch.uint8: torch.tensor(self.mean).mul(255).view(-1, 1, 1),
            torch.float32: torch.tensor(self.mean).view(-1, 1, 1),
        }
        self._scale = {
            torch.uint8: torch.tensor(self.std).mul(255).reciprocal().view(-1, 1, 1),
            torch.float32: torch.tensor(self.std).reciprocal().view(-1, 1, 1),
        }
        # Copies on other devices, made once: a copy per batch would wait on the device.
        self._elsewhere: dict[tuple[torch.dtype, torch.device], tuple[torch.Tensor, ...]] = {}

    def __call__(self, image: Any) -> torch.Tensor:
        """One image (C, H, W) or a batch (B, C, H, W), on any device."""
        if not isinstance(image, torch.Tensor):
            image = v2.functional.to_image(image)
        tensor = image.as_subclass(torch.Tensor)
        if tensor.dtype not in self._shift:
            tensor = v2.functional.to_dtype(tensor, torch.float32, scale=True)
        kind = tensor.dtype
        shift, scale = self._shift[kind], self._scale[kind]
        if tensor.device != shift.device:
            key = (kind, tensor.device)
            if key not in self._elsewhere:
                self._elsewhere[key] = (shift.to(tensor.device), scale.to(tensor.device))
            shift, scale = self._elsewhere[key]
        # Never in place on the input. uint8 is converted first, then shifted and scaled in
        # place: the same values as a promoting subtraction (which converts each element the
        # same way) at a quarter of its time. Elementwise and exactly rounded, so a batch gets
        # bit for bit the values its images would get one by one.
        if kind == torch.uint8:
            return tensor.to(torch.float32).sub_(shift).mul_(scale)
        return tensor.sub(shift).mul_(scale)

    def __repr__(self) -> str:  # part of the feature cache's key: stable, and names the values
        return f"{type(self).__name__}(mean={list(self.mean)}, std={list(self.std)})"


def output_steps(pre: Preprocessing, normalise: bool) -> list[Any]:
    """The last step of every transform: normalised float32, or the uint8 image as it is, to
    be normalised on the device (``FineTuneDataModule.on_after_batch_transfer``)."""
    return [ToNormalisedFloat(pre.mean, pre.std) if normalise else v2.ToPureTensor()]


def build_train_transform(
    pre: Preprocessing, augment: bool = True, normalise: bool = True
) -> v2.Compose:
    """The seed's augmentation: random resized crop, flip, colour jitter, rotation."""
    if not augment:
        return build_eval_transform(pre, normalise)
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RandomResizedCrop(
                pre.crop_size, interpolation=pre.interpolation_mode, antialias=True
            ),
            v2.RandomHorizontalFlip(),
            v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05),
            v2.RandomRotation(15),
            *output_steps(pre, normalise),
        ]
    )


def build_eval_transform(pre: Preprocessing, normalise: bool = True) -> v2.Compose:
    """Deterministic: resize, centre crop and normalise exactly as the weights were trained."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(pre.resize_size, interpolation=pre.interpolation_mode, antialias=True),
            v2.CenterCrop(pre.crop_size),
            *output_steps(pre, normalise),
        ]
    )


SMALL_CPU_MACHINE = 4  # cores; at most this many, and no accelerator: see default_num_workers


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_num_workers(accelerator: str = "auto", prepared: bool = False) -> int:
    """DataLoader worker processes when ``--num-workers`` is not given.

    One per core (at most 8), except when a small machine computes on its CPU and reads the
    prepared-image cache: the network already keeps every core busy there, reading a prepared
    image is a memory copy, and worker processes only add contention and start-up. On 2 cores
    that made MobileNetV2 training epochs ~25% faster without augmentation and no slower with
    it; decoding JPEGs still gains from workers (benchmarks/RESULTS.md).
    """
    cores = cpu_cores()
    if prepared and accelerator == "cpu" and cores <= SMALL_CPU_MACHINE:
        return 0
    return min(8, cores)


class FineTuneDataModule(L.LightningDataModule):
    """Train/val/test loaders over a ``DataSplit``; augmentation on the training subset only.

    With ``normalise_on_device`` (the default) the loaders hand over uint8 images and
    ``on_after_batch_transfer`` normalises each batch once it is on the device, as TorchGeo's
    datamodules apply their batch transforms: a quarter of the bytes through the workers'
    shared memory, pinned memory and the host-to-device copy, and no per-image normalisation
    in the workers (``benchmarks/data_pipeline.py``). The values are the same as normalising
    each image in the worker. A Trainer given this datamodule applies the hook; code that
    iterates the loaders itself calls ``on_after_batch_transfer`` on each batch (or sets
    ``normalise_on_device=False``).
    """

    def __init__(
        self,
        split: DataSplit,
        preprocessing: Preprocessing,
        batch_size: int = 32,
        num_workers: int | None = None,
        augment: bool = True,
        seed: int = 42,
        image_store: Any = None,
        train_transform: Any = None,
        eval_preprocessing: Preprocessing | None = None,
        test_transform: Any = None,
        normalise_on_device: bool = True,
        augment_on: str = "cpu",
        policy: str = "seed",
        random_erasing: float = 0.0,
        crop_in_loader: bool | None = None,
    ) -> None:
        """``train_transform`` replaces the seed's augmentation; ``eval_preprocessing`` sets
        another size for validation and test (``--test-img-size``); ``test_transform`` replaces
        the test transform (multi-crop test-time augmentation needs the whole resized image).
        Transforms passed in are built with ``normalise=not normalise_on_device``; one that
        normalises anyway (random erasing must come after normalisation) still works: the
        hook leaves float batches alone.

        ``augment_on="device"`` (what training selects by default: ``TrainConfig.augment_on``)
        moves the training augmentation, ``policy`` and ``random_erasing`` included, from the
        workers to the batch after the transfer (``data.batch_augment``); it needs
        ``normalise_on_device`` and replaces ``train_transform``. Its random resized crops are
        made in the loader when ``crop_in_loader`` (by default when there is no GPU: a CPU
        batch is augmented on the cores the workers share, and the crop is the one step that
        needs no batch; ``benchmarks/data_pipeline.py``), else on the device with the rest."""
        super().__init__()
        self.split = split
        self.preprocessing = preprocessing
        self.batch_size = batch_size
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.augment = augment
        self.seed = seed
        # prepared.PreparedImages: read decoded, resized images instead of decoding the photos.
        self.image_store = image_store
        self.train_transform = train_transform
        self.eval_preprocessing = eval_preprocessing or preprocessing
        self.test_transform = test_transform
        # Applied to uint8 batches on the device; None when the workers normalise.
        self.normalise = (
            ToNormalisedFloat(preprocessing.mean, preprocessing.std)
            if normalise_on_device
            else None
        )
        self.batch_augment = (
            BatchAugment(
                preprocessing.crop_size,
                preprocessing.interpolation_mode,
                self.normalise,
                policy,
                random_erasing,
                crops_in_loader=(
                    not torch.cuda.is_available() if crop_in_loader is None else crop_in_loader
                ),
            )
            if augment and augment_on == "device" and self.normalise is not None
            else None
        )

    def dataset(self, split: str) -> Dataset:
        pre = self.preprocessing if split == "train" else self.eval_preprocessing
        in_workers = self.normalise is None
        if split == "train" and self.batch_augment is not None:
            crops_in_loader = self.batch_augment.crops_in_loader
            transform = DrawParams(
                pre.resize_size,
                pre.interpolation_mode,
                crop_size=pre.crop_size if crops_in_loader else None,
            )
        elif split == "train":
            transform = self.train_transform
            if transform is None:
                transform = build_train_transform(pre, self.augment, normalise=in_workers)
        elif split == "test" and self.test_transform is not None:
            transform = self.test_transform
        else:
            transform = build_eval_transform(pre, normalise=in_workers)
        # The store holds images at one resize size; a split evaluated at another size
        # (--test-img-size) decodes the photos instead.
        if self.image_store is not None and self.image_store.size == pre.resize_size:
            return self.image_store.dataset(self.split.samples(split), transform)
        return ImageListDataset(self.split.samples(split), transform, draft_size=pre.resize_size)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        dataset = self.dataset(split)
        # Under DDP each rank evaluates its own shard, every image exactly once. (Training gets
        # Lightning's shuffling DistributedSampler, seeded by seed_everything.)
        sampler = None if shuffle else evaluation_sampler(dataset, self.trainer)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            sampler=sampler,
            generator=generator,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=keep_freed_memory,
            collate_fn=self.train_collate() if split == "train" else None,
        )

    def train_dataloader(self) -> DataLoader:
        if self.trainer is None or self.trainer.world_size == 1:
            # Resumable mid-epoch, and augmented per sample under its own seed (see sampling).
            from inat_finetune.data.sampling import ResumableLoader

            return ResumableLoader(
                self.dataset("train"),
                self.batch_size,
                self.seed,
                self.num_workers,
                pin_memory=torch.cuda.is_available(),
                collate_fn=self.train_collate(),
            )
        return self._loader("train", shuffle=True)

    def train_collate(self) -> Any:
        """``collate_cropped`` or ``collate_padded`` when the batch is augmented on the device
        (with the crops made in the loader or not); else the default."""
        if self.batch_augment is None:
            return None
        return collate_cropped if self.batch_augment.crops_in_loader else collate_padded

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int = 0) -> Any:
        if self.batch_augment is not None and is_padded_batch(batch):
            images, labels, params = batch
            return self.batch_augment(images, params), labels
        images, labels = batch
        if self.normalise is not None and images.dtype == torch.uint8:
            images = self.normalise(images)
        return images, labels
