"""Several processes, one experiment: ranks, one shared run directory, rank-0-first work.

Training scales out through Lightning's ``ddp`` strategy, one process per device. The processes
come into being in one of three ways, and every helper here works for all three:

1. ``inat-finetune train --devices N`` on one machine. Lightning's subprocess launcher lets the
   first process (rank 0) run alone until ``trainer.fit``, then starts N-1 copies of the same
   command line with ``LOCAL_RANK`` set. The copies re-run everything that came before ``fit``,
   so anything rank 0 made there that is not deterministic (the timestamped run directory) is
   handed to them through the environment they inherit (``shared_directory``). ``ddp`` and not
   ``ddp_spawn``: spawn pickles the module into fresh processes and returns only rank 0's
   state, so testing and writing results could not run in the same processes; ``ddp`` also
   works unchanged under the two launchers below.
2. ``torchrun --nproc-per-node N -m inat_finetune train ...`` (any number of machines).
3. ``srun inat-finetune train ...`` in a SLURM allocation.

In 2 and 3 every process starts at once, so ``join_launched_group`` joins the process group at
the start of ``train`` rather than in ``fit`` (Lightning then reuses it): rank 0 can scan the data
and create the run directory and hand both to the others before any training starts.

Caches (decoded images, backbone features) follow one rule: build on rank 0, let the others
wait and then read what rank 0 wrote. ``rank_zero_first`` is that rule as a ``with`` block.
"""

from __future__ import annotations

import atexit
import json
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler

from inat_finetune.errors import UserError

T = TypeVar("T")


# Directories rank 0 created before Lightning started the other local processes, in order.
SHARED_DIRS_ENV = "INAT_FINETUNE_SHARED_DIRS"


REFERENCE_BATCH = 32  # the batch size the default learning rate was tuned for (the write-up's)


_replayed = 0  # how many SHARED_DIRS_ENV entries this process has taken


_object_groups: dict[int, Any] = {}


def is_distributed() -> bool:
    """True inside a process group of two or more processes."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def launcher_environment() -> Any | None:
    """Lightning's description of the external launcher (torchrun, SLURM) that started us, if
    it started more than one process; checked in Lightning's own order."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    for kind in (TorchElasticEnvironment, SLURMEnvironment):
        if kind.detect():
            environment = kind()
            return environment if environment.world_size() > 1 else None
    return None


def global_rank() -> int:
    """This process's rank, also before the process group exists (from the launcher's env)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    environment = launcher_environment()
    if environment is not None:
        return environment.global_rank()
    # A copy started by Lightning's launcher on this machine (multi-node needs a launcher).
    return int(os.environ.get("LOCAL_RANK", 0))


def is_global_zero() -> bool:
    return global_rank() == 0


def local_rank() -> int:
    """This process's rank on its own machine."""
    environment = launcher_environment()
    if environment is not None:
        return environment.local_rank()
    return int(os.environ.get("LOCAL_RANK", 0))


@dataclass(frozen=True)
class World:
    """The processes one training run uses: ``per_node`` devices on each of ``num_nodes``."""

    devices: Any  # as Lightning's Trainer takes it: an int, "auto", or "0,1"
    per_node: int
    num_nodes: int

    @property
    def processes(self) -> int:
        return self.per_node * self.num_nodes

    @property
    def strategy(self) -> str:
        return "ddp" if self.processes > 1 else "auto"


def count_devices(devices: str, accelerator: str) -> int:
    """How many devices (processes) on one machine a ``--devices`` value asks for."""
    text = devices.strip()
    if text in ("auto", "-1"):
        return torch.cuda.device_count() if accelerator == "cuda" else 1
    if text.isdigit():
        return int(text)
    # A list of device indices, "0,1" or "[0, 1]".
    return len([part for part in text.strip("[]").split(",") if part.strip()])


def _launched_shape(environment: Any) -> tuple[int, int]:
    """(processes per node, nodes) as the launcher started them."""
    world = environment.world_size()
    per_node = os.environ.get("LOCAL_WORLD_SIZE")  # torchrun
    if per_node is None:
        nodes = int(os.environ.get("SLURM_NNODES", os.environ.get("SLURM_JOB_NUM_NODES", 1)))
        return max(1, world // max(1, nodes)), nodes
    return int(per_node), max(1, world // int(per_node))


def plan_world(devices: str, num_nodes: int, accelerator: str) -> World:
    """Turn ``--devices``/``--num-nodes`` into what Lightning needs, checked against a launcher.

    Under torchrun or srun the launcher already decided how many processes there are: values
    left at their defaults are taken from it, and values that contradict it are refused here
    with the fix, rather than by Lightning after the data has been scanned.
    """
    lightning_devices: Any = int(devices) if devices.isdigit() else devices
    per_node = count_devices(devices, accelerator)
    environment = launcher_environment()
    if environment is not None:
        launched_per_node, launched_nodes = _launched_shape(environment)
        if devices.strip() in ("auto", "-1"):
            per_node = lightning_devices = launched_per_node
        if num_nodes == 1:
            num_nodes = launched_nodes
        if per_node * num_nodes != environment.world_size():
            raise UserError(
                f"--devices {devices} --num-nodes {num_nodes}: the launcher started "
                f"{environment.world_size()} processes ({launched_per_node} per node on "
                f"{launched_nodes} node(s)); leave both options out or make devices x nodes "
                "match it"
            )
    elif num_nodes > 1:
        raise UserError(
            f"--num-nodes {num_nodes}: training on several machines needs a launcher that "
            "starts the processes on each of them: torchrun or srun (see docs/distributed.md)"
        )
    if per_node < 1:
        raise UserError(f"--devices {devices}: asks for no device; use auto, 1, 2, ... or 0,1")
    return World(lightning_devices, per_node, num_nodes)


def scaled_lr(lr: float, global_batch: int, rule: Literal["none", "linear", "sqrt"]) -> float:
    """The learning rate for ``global_batch`` from one tuned for ``REFERENCE_BATCH`` (32).

    "linear" is Goyal et al.'s rule (lr x global/32), usual for SGD; "sqrt" (lr x sqrt(global/32))
    is gentler and often better for Adam. "none" leaves ``lr`` as given.
    """
    if rule == "linear":
        return lr * global_batch / REFERENCE_BATCH
    if rule == "sqrt":
        return lr * math.sqrt(global_batch / REFERENCE_BATCH)
    return lr


def join_launched_group(accelerator: str) -> None:
    """Under torchrun or srun, join the process group now instead of in ``trainer.fit``.

    Lightning finds the group initialised and uses it as it is. The backend is the one Lightning
    would choose (NCCL on CUDA, gloo otherwise).
    """
    if not dist.is_available() or dist.is_initialized():
        return
    environment = launcher_environment()
    if environment is None:
        return
    os.environ["MASTER_ADDR"] = environment.main_address
    os.environ["MASTER_PORT"] = str(environment.main_port)
    backend = "nccl" if accelerator == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(environment.local_rank())
    dist.init_process_group(
        backend, rank=environment.global_rank(), world_size=environment.world_size()
    )
    if backend == "nccl":
        # Lightning registers this for the groups it creates; torch warns about undestroyed ones.
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())


def _object_group() -> Any:
    """A gloo group for Python objects: NCCL moves only CUDA tensors. Created once, by all ranks
    (as every collective here is called by all ranks in the same order)."""
    if dist.get_backend() == "gloo":
        return None
    key = id(dist.distributed_c10d._get_default_group())
    if key not in _object_groups:
        _object_groups[key] = dist.new_group(backend="gloo")
    return _object_groups[key]


def barrier() -> None:
    """Wait for every rank; a no-op in a single process or before the group exists."""
    if is_distributed():
        dist.barrier(group=_object_group())


@contextmanager
def rank_zero_first(per_node: bool = False) -> Iterator[None]:
    """Rank 0 runs the block first; the other ranks run it once rank 0 has finished.

    For caches: rank 0 builds, the others then find it built and only read it::

        with rank_zero_first():
            features = load_or_build_feature_cache(...)  # builds on rank 0, loads elsewhere

    ``per_node=True`` for a cache on each machine's local disk: the first process of every
    machine builds its machine's copy, all at the same time. Every rank must enter the block
    (it holds a barrier). Before Lightning has started the other local processes there is
    nothing to wait for: they are started later and re-run this code after rank 0 has finished.
    """
    zero = (local_rank() if per_node else global_rank()) == 0
    if not zero:
        barrier()
    try:
        yield
    finally:
        if zero:
            barrier()


def broadcast_from_zero(compute: Callable[[], T]) -> T:
    """``compute()`` on rank 0 only, its result (or its error) on every rank.

    Without a process group each process computes it itself: only the copies started by
    Lightning's launcher get here, and they re-run deterministic work (the data scan) exactly as
    rank 0 did.
    """
    if not is_distributed():
        return compute()
    box: list[Any] = [None]
    error: BaseException | None = None
    if is_global_zero():
        try:
            box[0] = ("ok", compute())
        except Exception as exc:  # handed to the other ranks so that none waits forever
            error = exc
            box[0] = ("error", exc if isinstance(exc, UserError) else RuntimeError(repr(exc)))
    dist.broadcast_object_list(box, src=0, group=_object_group())
    status, value = box[0]
    if error is not None:
        raise error
    if status == "error":
        raise value
    return value


def shared_directory(create: Callable[[], Path], processes: int) -> Path:
    """``create()`` a directory on rank 0 only and give every rank its path.

    With a process group, rank 0 broadcasts the path. Before one exists (Lightning's launcher
    has not started the other local processes yet), rank 0 records the path in its environment,
    which the processes Lightning starts inherit; they take the recorded paths in the same order
    as rank 0 created them.
    """
    global _replayed
    if processes <= 1:
        return create()
    if is_distributed():
        return Path(broadcast_from_zero(lambda: str(create())))
    made = json.loads(os.environ.get(SHARED_DIRS_ENV, "[]"))
    if is_global_zero():
        path = create()
        os.environ[SHARED_DIRS_ENV] = json.dumps([*made, str(path)])
        return path
    if _replayed >= len(made):
        raise RuntimeError(
            f"rank {global_rank()}: rank 0 created {len(made)} shared directories before "
            "starting this process, and this process asks for more; were the processes started "
            "with different command lines?"
        )
    _replayed += 1
    return Path(made[_replayed - 1])


class ShardSampler(DistributedSampler):
    """Rank r evaluates items r, r + W, r + 2W, ...: every item exactly once, no padding.

    Lightning's default for evaluation, ``DistributedSampler``, pads the last round with
    repeated items so that all ranks have the same count; the repeats would be counted twice in
    validation and test metrics. Being a ``DistributedSampler`` subclass, Lightning leaves it in
    place. Ranks may get one item more or less than others, which evaluation allows.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.total_size = len(dataset)  # type: ignore[arg-type]
        self.num_samples = len(range(rank, self.total_size, num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples


def evaluation_sampler(dataset: Dataset, trainer: Any) -> ShardSampler | None:
    """The sampler a validation/test loader needs: this rank's exact shard under DDP, else None
    (Lightning's default, which would pad and count repeated items twice)."""
    if trainer is None or trainer.world_size <= 1:
        return None
    return ShardSampler(dataset, trainer.world_size, trainer.global_rank)


def gather_shards(local: torch.Tensor) -> torch.Tensor:
    """Rows evaluated on each rank's ``ShardSampler`` shard, back in dataset order, on all ranks."""
    if not is_distributed():
        return local
    world = dist.get_world_size()
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, local.cpu(), group=_object_group())
    total = sum(len(part) for part in parts)
    merged = torch.empty((total, *local.shape[1:]), dtype=local.dtype)
    for rank, part in enumerate(parts):
        merged[rank::world] = part
    return merged


def check_shardable(sizes: dict[str, int], processes: int) -> None:
    """Every process needs at least one validation and one test image (a rank without any would
    never join the end-of-epoch metric reduction, and the others would wait for it)."""
    if processes <= 1:
        return
    for split, size in sizes.items():
        if size < processes:
            raise UserError(
                f"--devices: the {split} split has {size} image(s), fewer than the {processes} "
                "processes; use fewer devices or more data"
            )
