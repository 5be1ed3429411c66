"""The ``inat-finetune`` command line with one extra callback: every DDP rank writes down which
samples its loaders gave it, how many images it processed and how many backbone features it
computed for the feature cache (read by test_distributed.py).

Run as a script (``python tests/ddp_probe.py train ...``, or under torchrun) so that Lightning's
launcher re-runs this same file, probe included, for the other ranks.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import lightning as L

from inat_finetune.cli import main as cli
from inat_finetune.training import run as training

FEATURES_COMPUTED: list[int] = []  # backbone passes this rank ran to fill the feature cache


def counting_cached_features(*args: Any, **kwargs: Any) -> Any:
    cached = features_cached(*args, **kwargs)
    FEATURES_COMPUTED.append(cached.computed)
    return cached


features_cached = training.cached_features


class ShardProbe(L.Callback):
    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.indices: dict[str, list[list[int]]] = {"train": [], "val": [], "test": []}
        self.images: dict[str, int] = {"train": 0, "val": 0, "test": 0}

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.indices["train"].append(list(trainer.train_dataloader.sampler))

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.indices["val"].append(list(trainer.val_dataloaders.sampler))

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.indices["test"].append(list(trainer.test_dataloaders.sampler))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.images["train"] += len(batch[1])

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, *_) -> None:
        self.images["val"] += len(batch[1])

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, *_) -> None:
        self.images["test"] += len(batch[1])

    def on_test_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "strategy": type(trainer.strategy).__name__,
            "datamodule": type(trainer.datamodule).__name__,
            "features_computed": FEATURES_COMPUTED,
            "indices": self.indices,
            "images": self.images,
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    probe = ShardProbe(Path(os.environ["DDP_PROBE_DIR"]))
    training.train = functools.partial(training.train, callbacks=[probe])
    training.cached_features = counting_cached_features
    cli.app()
