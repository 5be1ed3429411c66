"""Where and how a run executes: hardware, device and precision resolution, ranks and process
groups, the CPU allocator setting."""

from inat_finetune.runtime.allocator import freed_memory_kept, keep_freed_memory
from inat_finetune.runtime.devices import resolve_device
from inat_finetune.runtime.distributed import is_global_zero, plan_world
from inat_finetune.runtime.hardware import (
    resolve_accelerator,
    resolve_channels_last,
    resolve_precision,
)

__all__ = [
    "freed_memory_kept",
    "is_global_zero",
    "keep_freed_memory",
    "plan_world",
    "resolve_accelerator",
    "resolve_channels_last",
    "resolve_device",
    "resolve_precision",
]
