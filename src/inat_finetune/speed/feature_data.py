"""The data module of a run trained on stored features: ``FeatureDataModule``.

Stored features (``speed/features.py``) of each split, batched and shuffled the way
``FineTuneDataModule`` batches images, resumable mid-epoch, and sharded per rank under DDP.
``joined`` puts a feature ensemble's per-member features side by side.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from inat_finetune.runtime.distributed import evaluation_sampler
from inat_finetune.speed.caching import ArrayStore


class FeatureDataModule(L.LightningDataModule):
    """Stored features and labels per split, batched and shuffled like ``FineTuneDataModule``."""

    def __init__(self, datasets: dict[str, Dataset], batch_size: int, seed: int) -> None:
        super().__init__()
        self.datasets = datasets
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = 0  # in memory already: workers would only add start-up time

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        # As FineTuneDataModule: under DDP each rank evaluates its own shard, every item once.
        sampler = None if shuffle else evaluation_sampler(self.datasets[split], self.trainer)
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size,
            shuffle=shuffle,
            sampler=sampler,
            generator=generator,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        if self.trainer is not None and self.trainer.world_size > 1:
            # Lightning swaps in its shuffling DistributedSampler, as for images.
            return self._loader("train", shuffle=True)
        # Resumable mid-epoch, in the same order scheme as FineTuneDataModule (see sampling).
        from inat_finetune.data.sampling import ResumableLoader

        return ResumableLoader(
            self.datasets["train"],
            self.batch_size,
            self.seed,
            pin_memory=torch.cuda.is_available(),
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


def features_of(
    store: ArrayStore, samples: list[tuple[Path, int]], shape: tuple[int, ...]
) -> TensorDataset:
    """The stored arrays of ``samples``' images, stacked, with their labels."""
    arrays = store.arrays(p for p, _ in samples)
    features = np.stack([arrays[p] for p, _ in samples]) if samples else np.empty((0, *shape))
    labels = torch.tensor([label for _, label in samples], dtype=torch.long)
    return TensorDataset(torch.from_numpy(features).float(), labels)


def joined(parts: Sequence[TensorDataset]) -> TensorDataset:
    """Features of the same images and labels, concatenated along the feature axis in order."""
    features = torch.cat([part.tensors[0] for part in parts], dim=1)
    return TensorDataset(features, parts[0].tensors[1])
