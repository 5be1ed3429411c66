"""Feature caching: train the head on stored backbone features when the backbone cannot change.

If every parameter before the classifier is frozen, frozen BatchNorm layers keep their
ImageNet statistics (``frozen_bn="eval"``), nothing random runs before the classifier in
training mode, and the training images are not augmented, then the backbone maps each image
to the same features in every epoch. Running it once per image and training the head on the
stored features is then the same training as running it every epoch: the linear probe
(``freeze_last``) costs one forward pass over the data, and a later run on the same images
(another seed, learning rate or number of epochs, or the same data in a comparison) none.

Augmentation is on by default, and augmented training images differ in every epoch, so then
nothing is cached and ``--no-augment`` is what lets ``freeze_last`` use the cache. Caching
only the validation/test features of an augmented run was left out on purpose: it saves the
evaluation passes only (a quarter of the work at most) at the price of a module that takes
images in training and features in evaluation.

How it works:

* The *tail* is the classifier plus the dropout layers right before it in the same
  ``Sequential`` (MobileNet's and EfficientNet's classifier is Dropout then Linear). A forward
  pre-hook on the tail's first module captures its input, which works for any architecture.
* Training runs the tail on stored features, so that dropout still drops at random in
  training mode, as it does without the cache.
* The LightningModule still holds the whole network: checkpoints, ``evaluate``, ``predict`` and
  ``export`` are unchanged. Only its forward (``FineTuneModule.feature_tail``) and the data
  module differ.
* Beyond the static checks, a probe on a random batch decides: two training-mode passes must
  capture the same features (this catches any dropout or stochastic depth, timm's functional
  dropout included), and in eval mode the tail applied to the captured features must give the
  network's output (this catches classifiers followed by more layers, like SqueezeNet's).

One store per (architecture, a hash of every backbone tensor, so weight names, weight files and
random initialisations are told apart; capture point; evaluation transform; precision;
channels-last; device type; torch version); one entry per image file, valid while the file is
unchanged and its stored bytes match their checksum (``speed/caching.py``): features found damaged
or cut off when the run opens the store are computed again from the photos, with a warning
naming the store's data file, and counted in the run's summary.

The frozen prefix. When the classifier is not the only thing that trains (``freeze_k_percent``
trains the later blocks), the longest run of leading blocks that is frozen and deterministic
gives the same output in every epoch instead, and that output is stored (``frozen_prefix``):

* The blocks are the model's children in order, ``Sequential`` containers opened up
  (MobileNetV2: ``features.0.0``, ..., ``features.18``, ``classifier.0``, ...; ResNet: ``conv1``,
  ``bn1``, ``relu``, ``maxpool``, ``layer1.0``, ...). The cut is placed after the last leading
  block that is frozen, has no BatchNorm in training mode and nothing random, and whose output
  holds at most a quarter of the values of the input image, so that the stored outputs take
  less room than the images would (MobileNetV2 after ``features.4`` at 224 px: 32x28x28 values,
  a sixth of the image's; ResNet50's outputs are larger than that until ``layer4``).
* Training runs the whole network on the stored outputs with the prefix blocks replaced by
  identities for the duration of each forward pass (``bypassed``); the rest trains as usual.
* The probe checks on a random batch that each prefix block is called once, that running the
  blocks one after the other gives what the network computes at the cut, and that the network
  with the prefix bypassed maps that to the network's output.
* Storing the prefix's output costs a pass over the prefix only; for MobileNetV2's
  ``freeze_k_percent`` the prefix is about 70% of the forward pass on a CPU
  (``benchmarks/cpu_probes.py prefix``), which every epoch then skips.
* In a comparison (``compare``) the linear probe's pass goes through those blocks anyway: it
  is told which strategies come after it (``also_for``), finds the prefix each of them will
  cut (``prefix_for_strategy``: the same probe, with that strategy's trainable flags) and
  stores those outputs on the way, so the next run finds them stored and no image is decoded
  twice. The stores are the ones that run would have filled itself, under the same key.

Same results: in fp32 with ``num_workers=0`` a cached run reproduces the uncached run's
metrics to ~1e-5, for the classifier's input and for a prefix (``tests/test_features.py``).
With DataLoader workers the shuffling differs (a persistent-worker loader draws its seed once,
an in-memory loader every epoch), and under bf16/fp16 autocast the one feature pass folds
BatchNorm into the convolutions (``_folded``), so the two are then equal in distribution
rather than number for number.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset, TensorDataset

from inat_finetune.runtime.allocator import keep_freed_memory
from inat_finetune.runtime.distributed import evaluation_sampler
from inat_finetune.speed.caching import ArrayStore, cache_root, short_hash

log = logging.getLogger(__name__)


FEATURE_VERSION = 2  # 2: under autocast, computed with BatchNorm folded in (_folded)


SPLITS = ("train", "val", "test")


AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16, "32-true": None}


PRECISION_ALIASES = {"32": "32-true", "bf16": "bf16-mixed", "16": "16-mixed"}


# Random in training mode, besides dropout; matched by class name so timm need not be imported.
STOCHASTIC_CLASSES = ("StochasticDepth", "DropPath", "DropBlock2d")


def feature_tail(model: nn.Module, head: str) -> list[str]:
    """The classifier and the dropout layers right before it in its ``Sequential``, in order."""
    parent_name, _, child = head.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if not parent_name or not isinstance(parent, nn.Sequential):
        return [head]
    children = [name for name, _ in parent.named_children()]
    start = children.index(child)
    while start > 0 and isinstance(
        parent.get_submodule(children[start - 1]), (nn.modules.dropout._DropoutNd, nn.Identity)
    ):
        start -= 1
    return [f"{parent_name}.{name}" for name in children[start : children.index(child) + 1]]


def _inside(name: str, modules: list[str]) -> bool:
    """Whether ``name`` is one of ``modules`` or inside one of them."""
    return any(name == m or name.startswith(m + ".") for m in modules)


def run_tail(model: nn.Module, tail: list[str], features: torch.Tensor) -> torch.Tensor:
    for name in tail:
        features = model.get_submodule(name)(features)
    return features


def blocks(model: nn.Module) -> list[str]:
    """The model's children in order, ``Sequential`` containers opened up (see above)."""
    names: list[str] = []

    def visit(prefix: str, parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if isinstance(child, nn.Sequential):
                visit(f"{prefix}{name}.", child)
            else:
                names.append(f"{prefix}{name}")

    visit("", model)
    return names


_IDENTITY = nn.Identity()


@contextlib.contextmanager
def bypassed(model: nn.Module, names: list[str]) -> Iterator[None]:
    """Replace the modules ``names`` by identities for the duration of the block."""
    originals = []
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        originals.append((parent, child, parent._modules[child]))
        parent._modules[child] = _IDENTITY
    try:
        yield
    finally:
        for parent, child, original in reversed(originals):
            parent._modules[child] = original


def run_bypassing(model: nn.Module, prefix: list[str], features: torch.Tensor) -> torch.Tensor:
    """The network's output for stored prefix outputs: the network with the prefix bypassed."""
    with bypassed(model, prefix):
        return model(features)


@contextlib.contextmanager
def capturing(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect the input of every call of ``module``."""
    captured: list[torch.Tensor] = []
    handle = module.register_forward_pre_hook(lambda _module, args: captured.append(args[0]))
    try:
        yield captured
    finally:
        handle.remove()


@contextlib.contextmanager
def _modes_kept(module: nn.Module) -> Iterator[None]:
    modes = {m: m.training for m in module.modules()}
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


def _is_random_in_training(module: nn.Module) -> bool:
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return module.p > 0
    if type(module).__name__ in STOCHASTIC_CLASSES:
        return float(getattr(module, "p", getattr(module, "drop_prob", 1.0)) or 0) > 0
    return False


def why_not_cacheable(
    config: Any, module: nn.Module, tail: list[str], precision: str
) -> str | None:
    """The reason the backbone's features may differ between epochs, or None if they cannot."""
    reason = why_not_for_this_run(config, module, precision)
    if reason is not None:
        return reason
    model = module.model
    training = [n for n, p in model.named_parameters() if p.requires_grad and not _inside(n, tail)]
    if training:
        return f"strategy {config.strategy} trains {len(training)} backbone tensors"
    moving = _moving_in_training(module)
    return next((why for name, why in moving.items() if not _inside(name, tail)), None)


def why_not_for_this_run(config: Any, module: nn.Module, precision: str) -> str | None:
    """What rules out any stored features in this run, wherever the cut."""
    if config.augment:
        return "augmentation on; --no-augment lets a frozen backbone's features be cached"
    plan = getattr(module, "plan", None)
    if plan is not None:
        # Recipe parts that need images, or a backbone that does not stay frozen.
        if plan.unfreeze is not None:
            return "an unfreezing schedule trains backbone stages later"
        if getattr(module, "mixer", None) is not None:
            return "mixup/cutmix mixes images"
        if plan.tta != "none":
            return "test-time augmentation transforms images"
        if getattr(module, "ema", None) is not None:
            return "EMA weights"
    if precision not in AUTOCAST_DTYPES:
        return f"precision {precision} is not cached"
    return None


def _moving_in_training(module: nn.Module) -> dict[str, str]:
    """The modules that compute differently between epochs in training mode, and why."""
    moving = {}
    with _modes_kept(module):
        module.train()  # the modes training will use, frozen BatchNorm held as configured
        for name, sub in module.model.named_modules():
            if not sub.training:
                continue
            if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                moving[name] = (
                    f"BatchNorm {name} uses batch statistics in training (frozen_bn=train)"
                )
            elif _is_random_in_training(sub):
                moving[name] = f"{name} ({type(sub).__name__}) is random in training mode"
    return moving


def _probe_images(module: nn.Module, crop_size: int) -> torch.Tensor:
    """Two seeded random images on the model's device, in its memory format."""
    images = torch.randn(2, 3, crop_size, crop_size, generator=torch.Generator().manual_seed(0))
    images = images.to(next(module.model.parameters()).device)
    if getattr(module, "channels_last", False):
        images = images.contiguous(memory_format=torch.channels_last)
    return images


def probe(module: nn.Module, tail: list[str], crop_size: int) -> str | None:
    """Check on a random batch that the captured features are deterministic and sufficient."""
    model = module.model
    images = _probe_images(module, crop_size)
    with (
        _modes_kept(module),
        torch.random.fork_rng(devices=[]),  # the uncached run's random stream stays untouched
        torch.no_grad(),
        capturing(model.get_submodule(tail[0])) as captured,
    ):
        module.train()
        module(images)
        module(images)
        if len(captured) != 2:
            return f"{tail[0]} is not called once per forward pass"
        if not torch.allclose(captured[0], captured[1], rtol=1e-4, atol=1e-6):
            return "the backbone is random in training mode"
        module.eval()
        logits = module(images)
        if not torch.allclose(run_tail(model, tail, captured[2]), logits, rtol=1e-4, atol=1e-5):
            return f"the output of {tail[-1]} is not the network's output"
    return None


def frozen_prefix(module: nn.Module, crop_size: int) -> list[str]:
    """The leading blocks whose output can be stored (see above), or [] if there are none."""
    model = module.model
    moving = _moving_in_training(module)
    leading: list[str] = []
    for name in blocks(model):
        if any(p.requires_grad for p in model.get_submodule(name).parameters()):
            break
        if any(_inside(n, [name]) for n in moving):
            break
        leading.append(name)
    if not leading:
        return []
    images = _probe_images(module, crop_size)
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in leading}
    hooks = [
        model.get_submodule(name).register_forward_hook(
            # Cloned: a later in-place activation may overwrite the block's output.
            lambda _m, _args, output, name=name: seen[name].append(output.clone())
        )
        for name in leading
    ]
    with _modes_kept(module), torch.random.fork_rng(devices=[]), torch.no_grad():
        try:
            module.eval()
            logits = module(images)
        finally:
            for hook in hooks:
                hook.remove()
        # Cut candidates: blocks called once each, in order, one feeding the next.
        cut, values, output = [], crop_size * crop_size * 3 // 4, images
        for index, name in enumerate(leading):
            if len(seen[name]) != 1:
                break
            output = model.get_submodule(name)(output)
            if output.shape != seen[name][0].shape or not torch.allclose(
                output, seen[name][0], rtol=1e-4, atol=1e-5
            ):
                break
            if output[0].numel() <= values:
                cut = leading[: index + 1]
        if not cut:
            return []
        bypassing = run_bypassing(model, cut, seen[cut[-1]][0])
        if not torch.allclose(bypassing, logits, rtol=1e-4, atol=1e-5):
            return []
        module.train()  # functional randomness the module scan cannot see
        if not torch.equal(run_tail(model, cut, images), run_tail(model, cut, images)):
            return []
    return cut


def backbone_fingerprint(model: nn.Module, tail: list[str], prefix: list[str] | None = None) -> str:
    """A hash of every tensor the stored features depend on: outside the tail, or in the prefix.

    The same weights give the same features."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in model.state_dict().items():
        depends = _inside(name, prefix) if prefix else not _inside(name, tail)
        if not depends:
            continue
        flat = tensor.detach().cpu().reshape(-1).contiguous()  # logical order, any memory format
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()


def _device(accelerator: str) -> torch.device:
    if accelerator in ("cuda", "gpu") and torch.cuda.is_available():
        return torch.device("cuda")
    if accelerator == "mps":
        return torch.device("mps")
    return torch.device("cpu")


def _extract(
    module: nn.Module,
    tail: list[str],
    cuts: list[list[str]],
    features: bool,
    datasets: dict[str, Any],
    after_transfer: Callable[[Any], Any],
    todo: list[Path],
    batch_size: int,
    num_workers: int,
    device: torch.device,
    precision: str,
    progress: bool,
) -> Iterator[tuple[Path, list[np.ndarray]]]:
    """Yield (path, arrays) for the images of ``todo``, computed in eval mode in one pass.

    The arrays are the output of each of ``cuts`` (leading runs of blocks, each one longer
    than the one before), then, if ``features``, the input of ``tail[0]``; without
    ``features`` the blocks of the last cut are all that runs. ``after_transfer`` is the
    datamodule's hook for batches on the device (it normalises uint8 images)."""
    wanted, parts, paths = {str(p) for p in todo}, [], []
    for dataset in datasets.values():
        indices = [i for i, (p, _) in enumerate(dataset.samples) if str(p) in wanted]
        wanted -= {str(dataset.samples[i][0]) for i in indices}
        parts.append(Subset(dataset, indices))
        paths += [dataset.samples[i][0] for i in indices]
    loader = DataLoader(
        ConcatDataset(parts),
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        worker_init_fn=keep_freed_memory,
    )
    model, home = module.model, next(module.model.parameters()).device
    dtype = AUTOCAST_DTYPES[precision]
    batches: Any = loader
    if progress:
        from rich.progress import track

        batches = track(loader, total=len(loader), description="Caching backbone features")
    paths_iter = iter(paths)
    channels_last = getattr(module, "channels_last", False)

    def prepared(network: nn.Module, keep: str | None = None) -> nn.Module:
        # Under autocast only: in fp32 the features stay bit for bit what training computes.
        network = _folded(network, keep) if dtype is not None else network
        return network.to(memory_format=torch.channels_last) if channels_last else network

    with (
        _modes_kept(module),
        torch.random.fork_rng(devices=[]),  # loader seeds come from the global generator
        torch.inference_mode(),
        torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext(),
    ):
        module.eval()
        model.to(device)
        segments, start = [], 0
        for cut in cuts:
            segments.append(prepared(nn.Sequential(*map(model.get_submodule, cut[start:]))))
            start = len(cut)
        bypass = cuts[-1] if cuts else []
        with bypassed(model, bypass):
            # Folded here, the copy keeps the identities; unfolded, it is bypassed per batch.
            rest = prepared(model, keep=tail[0]) if features else None
        try:
            capture = capturing(rest.get_submodule(tail[0])) if rest else contextlib.nullcontext()
            with capture as seen:
                for images, labels in batches:
                    output, _ = after_transfer((images.to(device, non_blocking=True), labels))
                    if channels_last:
                        output = output.contiguous(memory_format=torch.channels_last)
                    arrays = []
                    for segment in segments:
                        output = segment(output)
                        arrays.append(output.float().contiguous().cpu().numpy())
                    if rest is not None:
                        with bypassed(model, bypass):
                            rest(output)
                        arrays.append(seen.pop().float().contiguous().cpu().numpy())
                    for rows in zip(*arrays, strict=True):
                        yield next(paths_iter), list(rows)
        finally:
            model.to(home)


def _folded(network: nn.Module, keep: str | None = None) -> nn.Module:
    """An eval-mode copy of ``network`` with each BatchNorm folded into the convolution before it.

    A third fewer operations for the one inference pass that stores features (MobileNetV2 on
    the CPU: 179 against 118 images/s, bf16, batch 32); the same values up to rounding, which is
    why it is used under bf16/fp16 autocast only, where rounding of that size happens anyway.
    ``keep`` names a module that must still be called as a module in the copy (the capture
    point). Where the network cannot be traced (a data-dependent forward) or that module was
    traced through, the network itself."""
    from torch.fx.experimental.optimization import fuse

    try:
        folded = fuse(network.eval())
    except Exception as exc:  # noqa: BLE001 - any tracing failure means: run it as it is
        log.debug("BatchNorm not folded for the feature pass (%s)", exc)
        return network
    calls = {node.target for node in folded.graph.nodes if node.op == "call_module"}
    return network if keep is not None and keep not in calls else folded


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


@dataclass
class CachedFeatures:
    """What ``train`` swaps in: the feature data module, and the tail or the prefix that the
    stored features replace (None/[] when off)."""

    summary: str
    datamodule: FeatureDataModule | None = None
    tail: list[str] = field(default_factory=list)
    computed: int = 0
    prefix: list[str] = field(default_factory=list)


def _features_of(
    store: ArrayStore, samples: list[tuple[Path, int]], shape: tuple[int, ...]
) -> TensorDataset:
    arrays = store.arrays(p for p, _ in samples)
    features = np.stack([arrays[p] for p, _ in samples]) if samples else np.empty((0, *shape))
    labels = torch.tensor([label for _, label in samples], dtype=torch.long)
    return TensorDataset(torch.from_numpy(features).float(), labels)


def prefix_for_strategy(
    module: nn.Module, head: str, strategy: str, freeze_percent: float, crop_size: int
) -> list[str]:
    """The frozen prefix a run of ``strategy`` would store, found on this run's module: the
    trainable flags are that strategy's for the probe only."""
    from inat_finetune.models.freezing import apply_strategy

    flags = [(p, p.requires_grad) for p in module.model.parameters()]
    try:
        apply_strategy(module.model, head, strategy, freeze_percent)
        return frozen_prefix(module, crop_size)
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)


def cached_features(
    config: Any,
    module: nn.Module,
    head: str,
    datamodule: Any,
    accelerator: str,
    precision: str,
    progress: bool = False,
    also_for: Sequence[str] = (),
) -> CachedFeatures:
    """Use stored features for this run if its backbone is frozen and deterministic.

    ``module`` is the run's ``FineTuneModule`` and ``datamodule`` its ``FineTuneDataModule``;
    the images of every split are run through the backbone once (those not stored yet). The
    classifier's input is stored where everything before it is frozen, else the output of the
    frozen prefix where there is one.

    ``also_for`` names strategies that later runs on the same data and settings will train (a
    comparison's): the pass that stores this run's classifier inputs then also stores the
    outputs of their frozen prefixes on the way, so that their runs find them stored.
    """
    if not config.feature_cache:
        return CachedFeatures("off")
    precision = PRECISION_ALIASES.get(str(precision), str(precision))
    tail = feature_tail(module.model, head)
    crop_size = datamodule.preprocessing.crop_size
    reason = why_not_cacheable(config, module, tail, precision) or probe(module, tail, crop_size)
    prefix: list[str] = []
    if reason is not None:
        if why_not_for_this_run(config, module, precision) is None:
            prefix = frozen_prefix(module, crop_size)
        if not prefix:
            return CachedFeatures(f"off ({reason})")
    datasets = {name: datamodule.dataset(name) for name in SPLITS}
    transform = repr(datasets["test"].transform)
    if repr(datasets["train"].transform) != transform:
        return CachedFeatures("off (the training transform is not the evaluation transform)")
    normalise = getattr(datamodule, "normalise", None)  # uint8 batches, normalised on the device
    if normalise is not None:
        transform += f", then on the device {normalise!r}"
    device = _device(accelerator)

    def store_for(cut: list[str]) -> ArrayStore:
        meta = {
            "kind": "features",
            "version": FEATURE_VERSION,
            "architecture": type(module.model).__qualname__,
            "backbone": backbone_fingerprint(module.model, tail, cut),
            "capture": f"output of {cut[-1]}" if cut else tail[0],
            "transform": transform,
            "precision": precision,
            "channels_last": bool(getattr(module, "channels_last", False)),
            "device": device.type,
            "torch": ".".join(torch.__version__.split(".")[:2]),
        }
        folder = cache_root(config.cache_dir) / "features" / f"{config.backbone}-{short_hash(meta)}"
        return ArrayStore(folder, "float32", meta)

    samples = {name: list(ds.samples) for name, ds in datasets.items()}
    paths = [p for name in SPLITS for p, _ in samples[name]]
    stored_for: list[str] = []
    try:
        store = store_for(prefix)
        with contextlib.ExitStack() as stack:
            todo, put = stack.enter_context(store.filling(paths))
            # Prefixes stored on the way: only by a pass over the whole backbone (whose blocks
            # they are), each filling in what it lacks of the images this pass computes anyway.
            shared: dict[tuple[str, ...], list[str]] = {}
            for strategy in also_for if todo and not prefix else ():
                cut = prefix_for_strategy(module, head, strategy, config.freeze_percent, crop_size)
                if cut:
                    shared.setdefault(tuple(cut), []).append(strategy)
            # Each cut's output goes to its store, then the classifier inputs (if any) to this
            # run's: one store per array _extract yields, in order.
            cuts: list[list[str]] = [prefix] if prefix else []
            fill: list[tuple[set[str], Any]] = []
            for cut in sorted(shared, key=len):
                stale, put_cut = stack.enter_context(store_for(list(cut)).filling(todo))
                if stale:
                    cuts.append(list(cut))
                    fill.append((set(map(str, stale)), put_cut))
                    stored_for.append(f"the output of {cut[-1]} for {', '.join(shared[cut])}")
            fill.append((set(map(str, todo)), put))
            if todo:
                extracted = _extract(
                    module,
                    tail,
                    cuts,
                    not prefix,
                    datasets,
                    datamodule.on_after_batch_transfer,
                    todo,
                    config.batch_size,
                    datamodule.num_workers,
                    device,
                    precision,
                    progress,
                )
                for path, arrays in extracted:
                    for (stale, put_array), array in zip(fill, arrays, strict=True):
                        if str(path) in stale:
                            put_array(path, array)
        computed = len(todo)
        shape = store.arrays(paths[:1])[paths[0]].shape
        feature_sets = {name: _features_of(store, samples[name], shape) for name in SPLITS}
    except OSError as exc:
        log.warning("Feature cache unusable (%s); running the backbone in every epoch", exc)
        return CachedFeatures(f"off ({type(exc).__name__})")
    where = f" after {prefix[-1]}" if prefix else ""
    damaged = f", {len(store.damaged)} of them damaged in the cache" if store.damaged else ""
    also = "".join(f"; stored {what}" for what in stored_for)
    return CachedFeatures(
        f"on{where} ({len(paths) - computed} reused, {computed} computed{damaged}{also})",
        FeatureDataModule(feature_sets, config.batch_size, config.seed),
        [] if prefix else tail,
        computed,
        prefix,
    )
