"""Small measurements behind choices in the speed paths (see RESULTS.md), on this machine.

    PYTHONPATH=src python benchmarks/cpu_probes.py steps      # training-step images/s, ~3 min
    PYTHONPATH=src python benchmarks/cpu_probes.py workers    # DataLoader workers 2 vs 0, ~2 min
    PYTHONPATH=src python benchmarks/cpu_probes.py prefix     # frozen prefix's share, ~30 s
    PYTHONPATH=src python benchmarks/cpu_probes.py depthwise  # depthwise input gradient, ~30 s
    PYTHONPATH=src python benchmarks/cpu_probes.py figures    # each run figure's time, ~1 min
    PYTHONPATH=src python benchmarks/cpu_probes.py allocator  # freed memory reused or not, ~3 min

``steps``: MobileNetV2, batch 32, 224 px, one optimiser step at a time outside Lightning, for
the two strategies that train inside the backbone, in bf16 channels-last with the faster
depthwise backward (the project's CPU path), the same with PyTorch's own depthwise backward,
bf16 NCHW and fp32 channels-last. The floor for any training loop on this hardware.

``workers``: 2-epoch ``freeze_except_bn_and_fc`` runs of the project on hymenoptera reading the
prepared-image cache, with 2 DataLoader workers and with none, alternating, without and then
with augmentation; the first run of each pair also fills the cache.

``prefix``: how much of MobileNetV2's bf16 channels-last forward pass (batch 32, 224 px) the
blocks that ``freeze_k_percent`` leaves wholly frozen take: what storing their output (the
feature cache's frozen prefix) saves that strategy in every epoch.

``depthwise``: for each of MobileNetV2's depthwise layers with stride 2 (batch 32, bf16,
channels-last), the forward pass and the input gradient by PyTorch and by ``depthwise_grad``.

``figures``: one 1-epoch ``freeze_last`` run on hymenoptera, then each of its figures timed
three times (each time one warm-up draw, then the mean of three draws); the fastest of each.

``allocator``: the three-strategy comparison on hymenoptera (5 epochs, no augmentation, empty
caches) four times, each in a fresh process, with ``reuse_freed_memory`` on, off, on, off: wall
time, minor page faults and system CPU time of each.
"""

from __future__ import annotations

import inat_finetune  # noqa: F401 - first: sets OpenMP's wait policy before torch loads

# isort: split
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from inat_finetune.data.folders import make_split
from inat_finetune.models.backbones import get_model
from inat_finetune.models.freezing import apply_strategy
from inat_finetune.speed.depthwise_grad import _input_grad, eligible, use_fast_depthwise_grad
from inat_finetune.training.config import TrainConfig, load_config
from inat_finetune.training.run import train

HYMENOPTERA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "hymenoptera"


def step_rate(
    strategy: str, channels_last: bool, bf16: bool, fast_depthwise: bool, steps: int = 4
) -> float:
    torch.manual_seed(0)
    images, labels = torch.randn(32, 3, 224, 224), torch.randint(0, 2, (32,))
    built = get_model("mobilenet_v2", num_classes=2)
    model = built.model
    apply_strategy(model, built.head, strategy)
    if fast_depthwise:
        use_fast_depthwise_grad(model)
    model.train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], 1e-3)

    def step() -> None:
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()  # kernel selection
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return 32 * steps / (time.perf_counter() - started)


def steps() -> None:
    paths = ((True, True, True), (True, True, False), (False, True, False), (True, False, False))
    for strategy in ("freeze_except_bn_and_fc", "freeze_k_percent"):
        for channels_last, bf16, fast in paths:
            rate = step_rate(strategy, channels_last, bf16, fast)
            layout = "channels-last" if channels_last else "NCHW"
            grad = "fast depthwise backward" if fast else "PyTorch's depthwise backward"
            print(
                f"{strategy} {layout} {'bf16' if bf16 else 'fp32'}, {grad}: {rate:.1f} img/s",
                flush=True,
            )


def _hymenoptera(tmp: str, **settings: object) -> TrainConfig:
    """A MobileNetV2 run on hymenoptera with its runs and caches under ``tmp``."""
    return load_config(
        None,
        data=str(HYMENOPTERA),
        backbone="mobilenet_v2",
        output=f"{tmp}/runs",
        cache_dir=f"{tmp}/cache",
        **settings,
    )


def workers() -> None:
    split = make_split(HYMENOPTERA, 42)
    with tempfile.TemporaryDirectory() as tmp:
        for augment in (False, True):
            for count in (2, 0, 2, 0):
                config = _hymenoptera(
                    tmp,
                    strategy="freeze_except_bn_and_fc",
                    epochs=2,
                    augment=augment,
                    num_workers=count,
                )
                started = time.perf_counter()
                result = train(config, split, progress=False, report=False).results
                print(
                    f"augment={augment} workers={count}: total {time.perf_counter() - started:.1f}"
                    f" s, fit {result['train_time_s']:.1f} s, test {result['test_time_s']:.1f} s",
                    flush=True,
                )


def prefix() -> None:
    built = get_model("mobilenet_v2", num_classes=2)
    apply_strategy(built.model, built.head, "freeze_k_percent")
    first = next(n for n, p in built.model.named_parameters() if p.requires_grad)
    block = int(first.split(".")[1])  # features.<block>...: the blocks before it are frozen
    model = built.model.eval().to(memory_format=torch.channels_last)
    frozen, rest = model.features[:block], model.features[block:]
    images = torch.randn(32, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16):
        middle = frozen(images)
        rest(middle)  # kernel selection
        times = []
        for part, data in ((frozen, images), (rest, middle)):
            started = time.perf_counter()
            for _ in range(4):
                part(data)
            times.append((time.perf_counter() - started) / 4)
    print(
        f"first trainable tensor {first}; features.0-{block - 1} (frozen): {times[0]:.3f} s per "
        f"batch, features.{block}- : {times[1]:.3f} s; frozen share "
        f"{times[0] / sum(times):.0%}; output {tuple(middle.shape)}"
    )


def _seconds(fn: Callable[[], object]) -> float:
    fn()  # kernel selection
    started = time.perf_counter()
    for _ in range(3):
        fn()
    return (time.perf_counter() - started) / 3


def _depthwise_layer(conv: torch.nn.Conv2d, size: int) -> None:
    shape = (32, conv.in_channels, size, size)
    x = torch.randn(shape, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    weight = conv.weight.detach().to(torch.bfloat16)
    stride, padding, groups = conv.stride, conv.padding, conv.in_channels

    def forward() -> torch.Tensor:
        return torch.nn.functional.conv2d(x, weight, None, stride, padding, 1, groups)

    grad = torch.randn_like(forward())
    native = _seconds(
        lambda: torch.ops.aten.convolution_backward(
            grad,
            x,
            weight,
            None,
            list(stride),
            list(padding),
            [1, 1],
            False,
            [0, 0],
            groups,
            [True, False, False],
        )  # fmt: skip
    )
    fast = _seconds(lambda: _input_grad(grad, weight, x.shape, stride, padding))
    print(
        f"{conv.in_channels} channels, {size} px, stride 2: forward "
        f"{_seconds(forward) * 1e3:.1f} ms, input gradient {native * 1e3:.1f} ms (PyTorch) / "
        f"{fast * 1e3:.1f} ms (depthwise_grad)",
        flush=True,
    )


def depthwise() -> None:
    model = get_model("mobilenet_v2", num_classes=2).model
    size = 112  # the input of the first stride-2 depthwise layer at 224 px; halved by each
    for conv in (m for m in model.modules() if eligible(m) and m.stride != (1, 1)):
        _depthwise_layer(conv, size)
        size //= 2


def figures() -> None:
    from inat_finetune.reporting.plots import RUN_FIGURES

    with tempfile.TemporaryDirectory() as tmp:
        config = _hymenoptera(tmp, epochs=1, augment=False)
        run_dir = train(config, progress=False, report=False).run_dir
        total = 0.0
        for name, (_, draw) in RUN_FIGURES.items():
            best = min(_seconds(lambda draw=draw: draw(run_dir)) for _ in range(3))
            total += best
            print(f"{name}: {best:.3f} s", flush=True)
        print(f"all six: {total:.2f} s")


def allocator() -> None:
    # Each in a fresh process: leaving the block sets glibc's thresholds for good (runtime/allocator.py),
    # so a later comparison in the same process would not start from glibc's own defaults.
    import subprocess

    for reuse in ("on", "off", "on", "off"):
        subprocess.run([sys.executable, __file__, "_allocator_run", reuse], check=True)


def _allocator_run() -> None:
    from inat_finetune.experiments.comparison import SEED_STRATEGIES, compare

    reuse = sys.argv[2] == "on"
    with tempfile.TemporaryDirectory() as tmp:
        config = _hymenoptera(tmp, epochs=5, augment=False, reuse_freed_memory=reuse)
        before = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        compare(config, SEED_STRATEGIES, progress=False)
        seconds = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_SELF)
    print(
        f"reuse_freed_memory={reuse}: {seconds:.1f} s, "
        f"{after.ru_minflt - before.ru_minflt:,} minor page faults, "
        f"{after.ru_stime - before.ru_stime:.1f} s system time",
        flush=True,
    )


if __name__ == "__main__":
    probes = {
        "steps": steps,
        "workers": workers,
        "prefix": prefix,
        "depthwise": depthwise,
        "figures": figures,
        "allocator": allocator,
        "_allocator_run": _allocator_run,
    }
    probes[sys.argv[1] if len(sys.argv) > 1 else "steps"]()
