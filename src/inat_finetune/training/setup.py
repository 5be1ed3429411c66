"""The set-up every entry point shares: the processes, and the split with its test set guarded.

``train``, ``compare`` and ``sweep`` all call ``split_for_run``, so the data is split one way
everywhere and no entry point trains on a test set that holds copies of training images;
``train`` and ``compare`` both call ``prepare_processes``, so under torchrun, srun or
``--devices`` every process plans the same world and rank 0 alone scans and writes.
"""

from __future__ import annotations

import lightning as L

from inat_finetune.data.folders import DataSplit, make_split
from inat_finetune.errors import UserError
from inat_finetune.runtime.distributed import (
    World,
    broadcast_from_zero,
    check_shardable,
    is_global_zero,
    join_launched_group,
    plan_world,
)
from inat_finetune.runtime.hardware import (
    resolve_accelerator,
    resolve_channels_last,
    resolve_precision,
)
from inat_finetune.training.config import TrainConfig
from inat_finetune.training.state import Processes


def prepare_processes(config: TrainConfig) -> Processes:
    """Resolve the hardware, plan the processes, join a launcher's group, seed everything.

    Every process of a multi-process run calls this (``train`` and ``compare``) before the data
    is scanned; the seed makes the new head's initialisation the same on every rank.
    """
    accelerator = resolve_accelerator(config.accelerator)
    world = plan_world(config.devices, config.num_nodes, accelerator)
    join_launched_group(accelerator)
    zero = is_global_zero()
    L.seed_everything(config.seed, workers=True, verbose=False)
    return Processes(
        accelerator=accelerator,
        precision=resolve_precision(config.precision, accelerator),
        channels_last=resolve_channels_last(config.channels_last, accelerator),
        world=world,
        zero=zero,
    )


def split_for_run(
    config: TrainConfig, progress: bool = False, given: DataSplit | None = None
) -> DataSplit:
    """The split a run trains on: ``given`` or a scan of ``--data``, with its test set guarded.

    Rank 0 scans (and shows ``progress``); every other rank receives its result (or its
    error). ``train``, ``compare`` and ``sweep`` all split through here, so no entry point
    can train on a split whose test set holds copies of training images.
    """

    def scan() -> DataSplit:
        found = given or make_split(
            config.data,
            config.seed,
            config.val_fraction,
            config.test_fraction,
            progress=progress,
        )
        return guard_test_set(found)

    return broadcast_from_zero(scan)


def guard_test_set(split: DataSplit) -> DataSplit:
    """Keep copies of training images out of the test set before any training starts.

    A test set on disk (nature_12K's val/) with such copies is refused: the user must fix it.
    A test set carved out here is cleaned: its leaked copies are dropped and counted; if none
    is left, the data is refused too.
    """
    from inat_finetune.data.datacheck import assert_no_leakage, drop_leaked_test_images

    if split.test_fraction is not None:
        cleaned = drop_leaked_test_images(split)
        if not any(cleaned.test.values()):  # nothing left to test on: the run would crash
            raise UserError(
                f"{split.root}: every image of the carved test set is a copy of a training or "
                f"validation image; delete the copies (`inat-finetune check-data {split.root}` "
                "lists them)"
            )
        return cleaned
    assert_no_leakage(split)
    return split


def check_before_building(config: TrainConfig, split: DataSplit, world: World) -> None:
    """Refuse, before any model is built, settings this data or machine cannot run."""
    from inat_finetune.training.preflight import preflight

    preflight(config, split)
    counts = {k: sum(v.values()) for k, v in split.counts().items()}
    check_shardable({"val": counts["val"], "test": counts["test"]}, world.processes)
