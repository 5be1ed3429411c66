"""A training DataLoader that can stop anywhere and carry on exactly where it stopped.

A run killed mid-epoch must, once resumed, see the rest of that epoch in the same order and
with the same augmentations as a run that was never interrupted. Two things make that hold:

* The order is a function of (seed, epoch) alone, and the loader counts the batches it has
  handed out. Lightning saves that count in every checkpoint (``state_dict``) and gives it
  back on resume (``load_state_dict``), and the sampler then skips what was already trained on.
* Every sample is augmented under its own seed, drawn from (seed, epoch) beside the order, so
  its random crop and flip do not depend on which samples came before it, on the number of
  worker processes, or on the global random state at the moment the loader restarted.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from inat_finetune.runtime.allocator import keep_freed_memory


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A generator for one epoch; SeedSequence mixes the two numbers without collisions."""
    mixed = np.random.SeedSequence([seed % 2**64, epoch]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(mixed) & (2**63 - 1))


class ResumableSampler(Sampler):
    """Shuffled ``(index, sample_seed)`` pairs for one epoch, optionally starting part-way in."""

    def __init__(self, num_samples: int, seed: int) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0
        # (epoch, samples of it already trained on): where the next __iter__ starts, if it is
        # for that epoch. A resume can land on an epoch's end, and then the next one is whole.
        self.resume_at: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        # Lightning calls this at the start of every epoch.
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def consume_start(self) -> int:
        start = self.resume_at[1] if self.resume_at and self.resume_at[0] == self.epoch else 0
        self.resume_at = None
        return start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = epoch_generator(self.seed, self.epoch)
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        sample_seeds = torch.randint(0, 2**62, (self.num_samples,), generator=generator).tolist()
        for index in order[self.consume_start() :]:
            yield index, sample_seeds[index]


class SeededSamples(Dataset):
    """Runs each ``dataset[index]`` under its sample seed: in the main process leaving the global
    generators as they were, in a loader worker leaving them seeded by the sample."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        if get_worker_info() is not None:
            # A loader worker's global generators serve only the samples, each of which seeds
            # them first: nothing to put back (saving and restoring NumPy's state would be
            # most of this wrapper's cost per sample).
            seed_generators(seed)
            return self.dataset[index]
        python_state, numpy_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            seed_generators(seed)
            try:
                return self.dataset[index]
            finally:
                random.setstate(python_state)
                np.random.set_state(numpy_state)


def seed_generators(seed: int) -> None:
    """Seeds the generators augmentations draw from: torchvision's (torch's CPU generator) and
    other libraries' (timm's RandAugment: Python's; NumPy's)."""
    # The CPU generator only: torch.manual_seed also seeds every accelerator backend, and
    # before CUDA is initialised each of those records a stack trace (about 1 ms per sample:
    # most of the cost of an epoch on stored features).
    torch.random.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


class ResumableLoader(DataLoader):
    """A shuffling DataLoader whose position within the epoch is saved in checkpoints.

    Lightning treats a train loader with ``state_dict``/``load_state_dict`` as resumable: it
    stores the state in ``checkpoint["loops"]`` and restores it before the resumed epoch starts.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        seed: int,
        num_workers: int = 0,
        pin_memory: bool = False,
        collate_fn: Any = None,
    ) -> None:
        """``collate_fn``: None for the default collate (``data.batch_augment`` pads)."""
        size = len(dataset)  # type: ignore[arg-type]
        super().__init__(
            SeededSamples(dataset),
            batch_size=batch_size,
            sampler=ResumableSampler(size, seed),
            # A last batch of one sample breaks BatchNorm in training mode ("expected more
            # than 1 value per channel"); drop it. The order changes every epoch, so a
            # different image sits out each time.
            drop_last=size > 1 and size % batch_size == 1,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            pin_memory=pin_memory,
            worker_init_fn=keep_freed_memory,
            collate_fn=collate_fn,
            # Worker seeds come from this generator, not from the global RNG, so starting
            # the loader does not disturb the random state that dropout uses.
            generator=torch.Generator().manual_seed(seed),
        )
        self.seed = seed
        self._batches_done = 0

    def __iter__(self) -> Iterator[Any]:
        sampler: ResumableSampler = self.sampler  # type: ignore[assignment]
        resume_at = sampler.resume_at
        self._batches_done = 0
        if resume_at and resume_at[0] == sampler.epoch:
            self._batches_done = resume_at[1] // self.batch_size  # type: ignore[operator]
        for batch in super().__iter__():
            self._batches_done += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        sampler: ResumableSampler = self.sampler  # type: ignore[assignment]
        return {"epoch": sampler.epoch, "batches_done": self._batches_done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        sampler: ResumableSampler = self.sampler  # type: ignore[assignment]
        epoch, done = int(state["epoch"]), int(state["batches_done"])
        sampler.set_epoch(epoch)
        sampler.resume_at = (epoch, done * self.batch_size)  # type: ignore[operator]
        self._batches_done = done
