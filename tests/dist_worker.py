"""One rank of test_distributed.test_helpers_in_a_real_process_group.

A module of its own that imports only torch and ``inat_finetune.distributed``: every spawned
rank imports it, and importing the test module (Lightning, the CLI) would cost seconds per rank.
"""

from __future__ import annotations

import json
import socket
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from inat_finetune.errors import UserError
from inat_finetune.runtime import distributed


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def collectives(rank: int, world: int, port: int, tmp: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    try:
        built = Path(tmp) / "cache-built"
        with distributed.rank_zero_first():
            if rank == 0:
                time.sleep(0.5)  # a slow cache build: the others must wait for it
                built.write_text("rank 0")
            found_cache = built.exists()
        run_dir = distributed.shared_directory(
            lambda: Path(tempfile.mkdtemp(dir=tmp)), processes=world
        )
        shard = torch.arange(rank, 9, world, dtype=torch.float32).unsqueeze(1)  # ShardSampler's
        merged = distributed.gather_shards(shard).squeeze(1).tolist()
        try:
            distributed.broadcast_from_zero(lambda: (_ for _ in ()).throw(UserError("bad data")))
            error = None
        except UserError as exc:
            error = str(exc)
        record = {"cache": found_cache, "dir": str(run_dir), "merged": merged, "error": error}
        (Path(tmp) / f"rank{rank}.json").write_text(json.dumps(record))
    finally:
        dist.destroy_process_group()
