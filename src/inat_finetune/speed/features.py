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

Where the features are captured and the probes that decide it: ``speed/probing.py``.

One store per (architecture, a hash of every backbone tensor, so weight names, weight files and
random initialisations are told apart; capture point; evaluation transform; precision;
channels-last; device type; torch version); one entry per image file, valid while the file is
unchanged and its stored bytes match their checksum (``speed/caching.py``): features found damaged
or cut off when the run opens the store are computed again from the photos, with a warning
naming the store's data file, and counted in the run's summary.

A feature ensemble (``--backbone a,b``, ``models/ensembles.py``) is stored per member, under
the key a run of that member alone would use (``_member_passes``): its features are computed
once whichever run needs them first, so a run of ``a,b`` after a run of ``a`` computes ``b``'s
only, and the head trains on the members' features joined per image. The member's
normalisation is applied to the batch before the member (as that run would), not inside the
network as the ensemble does; the two agree to ~1e-6.

Same results: in fp32 with ``num_workers=0`` a cached run reproduces the uncached run's
metrics to ~1e-5, for the classifier's input and for a prefix (``tests/test_features.py``).
With DataLoader workers the shuffling differs (a persistent-worker loader draws its seed once,
an in-memory loader every epoch), and under bf16/fp16 autocast the one feature pass folds
BatchNorm into the convolutions (``_folded``), so the two are then equal in distribution
rather than number for number.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Subset, TensorDataset

from inat_finetune.data.datamodule import ToNormalisedFloat
from inat_finetune.models.ensembles import FeatureEnsemble
from inat_finetune.runtime.allocator import keep_freed_memory
from inat_finetune.speed.caching import ArrayStore, cache_root, short_hash
from inat_finetune.speed.feature_data import FeatureDataModule, features_of, joined
from inat_finetune.speed.probing import (
    AUTOCAST_DTYPES,
    backbone_fingerprint,
    bypassed,
    capturing,
    feature_tail,
    frozen_prefix,
    modes_kept,
    prefix_for_strategy,
    probe,
    run_bypassing,
    run_tail,
    why_not_cacheable,
    why_not_for_this_run,
)

# run_tail and run_bypassing are imported from here by tasks.classification.
__all__ = ["CachedFeatures", "FeatureDataModule", "cached_features", "run_bypassing", "run_tail"]

log = logging.getLogger(__name__)

FEATURE_VERSION = 2  # 2: under autocast, computed with BatchNorm folded in (_folded)


SPLITS = ("train", "val", "test")


PRECISION_ALIASES = {"32": "32-true", "bf16": "bf16-mixed", "16": "16-mixed"}


def _device(accelerator: str) -> torch.device:
    if accelerator in ("cuda", "gpu") and torch.cuda.is_available():
        return torch.device("cuda")
    if accelerator == "mps":
        return torch.device("mps")
    return torch.device("cpu")


def _loader_over(
    datasets: dict[str, Any],
    todo: list[Path],
    batch_size: int,
    num_workers: int,
    device: torch.device,
    progress: bool,
) -> tuple[Any, list[Path]]:
    """Batches of the images of ``todo`` (each once, whichever split has it), and their paths."""
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
    if not progress:
        return loader, paths
    from rich.progress import track

    return track(loader, total=len(loader), description="Caching backbone features"), paths


def _prepared(
    network: nn.Module, dtype: torch.dtype | None, channels_last: bool, keep: str | None = None
) -> nn.Module:
    """``network`` as the feature pass runs it: folded under autocast, in the memory format."""
    # Under autocast only: in fp32 the features stay bit for bit what training computes.
    network = _folded(network, keep) if dtype is not None else network
    return network.to(memory_format=torch.channels_last) if channels_last else network


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
    batches, paths = _loader_over(datasets, todo, batch_size, num_workers, device, progress)
    model, home = module.model, next(module.model.parameters()).device
    dtype = AUTOCAST_DTYPES[precision]
    paths_iter = iter(paths)
    channels_last = getattr(module, "channels_last", False)
    with (
        modes_kept(module),
        torch.random.fork_rng(devices=[]),  # loader seeds come from the global generator
        torch.inference_mode(),
        torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext(),
    ):
        module.eval()
        model.to(device)
        segments, start = [], 0
        for cut in cuts:
            segment = nn.Sequential(*map(model.get_submodule, cut[start:]))
            segments.append(_prepared(segment, dtype, channels_last))
            start = len(cut)
        bypass = cuts[-1] if cuts else []
        with bypassed(model, bypass):
            # Folded here, the copy keeps the identities; unfolded, it is bypassed per batch.
            rest = _prepared(model, dtype, channels_last, keep=tail[0]) if features else None
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


@dataclass
class CachedFeatures:
    """What ``train`` swaps in: the feature data module, and the tail or the prefix that the
    stored features replace (None/[] when off)."""

    summary: str
    datamodule: FeatureDataModule | None = None
    tail: list[str] = field(default_factory=list)
    computed: int = 0
    prefix: list[str] = field(default_factory=list)


def _capture_point(
    config: Any, module: nn.Module, tail: list[str], precision: str, crop_size: int
) -> tuple[list[str], str | None]:
    """([], None): store the classifier's input; (prefix, None): store the frozen prefix's
    output; ([], reason): store nothing, and why."""
    reason = why_not_cacheable(config, module, tail, precision) or probe(module, tail, crop_size)
    if reason is None:
        return [], None
    if why_not_for_this_run(config, module, precision) is None:
        prefix = frozen_prefix(module, crop_size)
        if prefix:
            return prefix, None
    return [], reason


def _evaluation_transform(datasets: dict[str, Any], datamodule: Any) -> str | None:
    """What maps a photo to the backbone's input, as text for the store's key; None when the
    training transform differs (then features would differ between epochs)."""
    transform = repr(datasets["test"].transform)
    if repr(datasets["train"].transform) != transform:
        return None
    normalise = getattr(datamodule, "normalise", None)  # uint8 batches, normalised on the device
    if normalise is not None:
        transform += f", then on the device {normalise!r}"
    return transform


@dataclass
class _FeaturePass:
    """Everything the one pass over the images needs besides the cuts and the images."""

    config: Any
    module: nn.Module  # what has the network as .model: the run's module, or a member's view
    tail: list[str]
    datasets: dict[str, Any]
    after_transfer: Callable[[Any], Any]  # batches on the device to the network's input
    num_workers: int
    transform: str
    precision: str
    device: torch.device
    progress: bool
    name: str  # the store's name starts with it: the backbone's

    def store_for(self, cut: list[str]) -> ArrayStore:
        """The store for the output of ``cut`` (the classifier's input when ``cut`` is [])."""
        module = self.module
        meta = {
            "kind": "features",
            "version": FEATURE_VERSION,
            "architecture": type(module.model).__qualname__,
            "backbone": backbone_fingerprint(module.model, self.tail, cut),
            "capture": f"output of {cut[-1]}" if cut else self.tail[0],
            "transform": self.transform,
            "precision": self.precision,
            "channels_last": bool(getattr(module, "channels_last", False)),
            "device": self.device.type,
            "torch": ".".join(torch.__version__.split(".")[:2]),
        }
        name = f"{self.name}-{short_hash(meta)}"
        return ArrayStore(cache_root(self.config.cache_dir) / "features" / name, "float32", meta)

    def extract(
        self, cuts: list[list[str]], features: bool, todo: list[Path]
    ) -> Iterator[tuple[Path, list[np.ndarray]]]:
        return _extract(
            self.module,
            self.tail,
            cuts,
            features,
            self.datasets,
            self.after_transfer,
            todo,
            self.config.batch_size,
            self.num_workers,
            self.device,
            self.precision,
            self.progress,
        )


class _MemberView(nn.Module):
    """One member of a feature ensemble as ``_extract`` runs a network: as ``.model``."""

    def __init__(self, network: nn.Module, channels_last: bool) -> None:
        super().__init__()
        self.model = network
        self.channels_last = channels_last


def _member_passes(run: _FeaturePass, datamodule: Any) -> list[_FeaturePass]:
    """A pass per member of a ``FeatureEnsemble``, keyed as a run of that member alone keys
    its features (same name, network, capture point, transform and normalisation), so that
    either run reuses what the other stored. Each member normalises the ensemble's [0, 1]
    input (or uint8 batch, on the device) itself, as the ensemble does inside."""
    ensemble = run.module.model
    test = repr(run.datasets["test"].transform)
    on_device = getattr(datamodule, "normalise", None) is not None
    passes = []
    for index, name in enumerate(ensemble.member_names):
        network, head = ensemble.members[index], ensemble.member_heads[index]
        normalise = ToNormalisedFloat(*ensemble.member_stats[index])
        then = "then on the device" if on_device else "then"
        passes.append(
            replace(
                run,
                module=_MemberView(network, bool(getattr(run.module, "channels_last", False))),
                tail=feature_tail(network, head),
                after_transfer=lambda batch, n=normalise: (n(batch[0]), batch[1]),
                transform=f"{test}, {then} {normalise!r}",
                name=name,
            )
        )
    return passes


def _ensemble_features(
    run: _FeaturePass, datamodule: Any, samples: dict[str, list[tuple[Path, int]]]
) -> tuple[dict[str, TensorDataset], int, str]:
    """Each member's features stored in its own store (a member stored by an earlier run,
    alone or in another ensemble, costs no pass), joined per image in member order;
    (features per split, images computed, what was reused and computed per member)."""
    paths = [p for name in SPLITS for p, _ in samples[name]]
    per_split: dict[str, list[TensorDataset]] = {name: [] for name in SPLITS}
    computed, said = 0, []
    for member in _member_passes(run, datamodule):
        store = member.store_for([])
        count, _ = _fill_stores(member, store, paths, [], dict)
        shape = store.arrays(paths[:1])[paths[0]].shape
        for name in SPLITS:
            per_split[name].append(features_of(store, samples[name], shape))
        damaged = f", {len(store.damaged)} damaged" if store.damaged else ""
        said.append(f"{member.name} ({len(paths) - count} reused, {count} computed{damaged})")
        computed += count
    joined_sets = {name: joined(parts) for name, parts in per_split.items()}
    return joined_sets, computed, "; ".join(said)


def _prefixes_of(
    module: nn.Module, head: str, config: Any, crop_size: int, strategies: Sequence[str]
) -> dict[tuple[str, ...], list[str]]:
    """The frozen prefix each of ``strategies`` will cut, with the strategies that cut it."""
    shared: dict[tuple[str, ...], list[str]] = {}
    for strategy in strategies:
        cut = prefix_for_strategy(module, head, strategy, config.freeze_percent, crop_size)
        if cut:
            shared.setdefault(tuple(cut), []).append(strategy)
    return shared


def _fill_stores(
    run: _FeaturePass,
    store: ArrayStore,
    paths: list[Path],
    prefix: list[str],
    on_the_way: Callable[[], dict[tuple[str, ...], list[str]]],
) -> tuple[int, list[str]]:
    """Compute what ``store`` lacks in one pass, and the prefixes of ``on_the_way`` on the way;
    (images computed, what was stored for later runs)."""
    stored_for: list[str] = []
    with contextlib.ExitStack() as stack:
        todo, put = stack.enter_context(store.filling(paths))
        # Prefixes stored on the way: only by a pass over the whole backbone (whose blocks
        # they are), each filling in what it lacks of the images this pass computes anyway.
        shared = on_the_way() if todo and not prefix else {}
        # Each cut's output goes to its store, then the classifier inputs (if any) to this
        # run's: one store per array _extract yields, in order.
        cuts: list[list[str]] = [prefix] if prefix else []
        fill: list[tuple[set[str], Any]] = []
        for cut in sorted(shared, key=len):
            stale, put_cut = stack.enter_context(run.store_for(list(cut)).filling(todo))
            if stale:
                cuts.append(list(cut))
                fill.append((set(map(str, stale)), put_cut))
                stored_for.append(f"the output of {cut[-1]} for {', '.join(shared[cut])}")
        fill.append((set(map(str, todo)), put))
        if todo:
            for path, arrays in run.extract(cuts, not prefix, todo):
                for (stale, put_array), array in zip(fill, arrays, strict=True):
                    if str(path) in stale:
                        put_array(path, array)
    return len(todo), stored_for


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
    prefix, reason = _capture_point(config, module, tail, precision, crop_size)
    if reason is not None:
        return CachedFeatures(f"off ({reason})")
    datasets = {name: datamodule.dataset(name) for name in SPLITS}
    transform = _evaluation_transform(datasets, datamodule)
    if transform is None:
        return CachedFeatures("off (the training transform is not the evaluation transform)")
    run = _FeaturePass(
        config,
        module,
        tail,
        datasets,
        datamodule.on_after_batch_transfer,
        datamodule.num_workers,
        transform,
        precision,
        _device(accelerator),
        progress,
        config.backbone,
    )
    samples = {name: list(ds.samples) for name, ds in datasets.items()}
    paths = [p for name in SPLITS for p, _ in samples[name]]
    try:
        if isinstance(module.model, FeatureEnsemble):
            feature_sets, computed, per_member = _ensemble_features(run, datamodule, samples)
            return CachedFeatures(
                f"on, per member: {per_member}",
                FeatureDataModule(feature_sets, config.batch_size, config.seed),
                tail,
                computed,
            )
        store = run.store_for(prefix)
        computed, stored_for = _fill_stores(
            run,
            store,
            paths,
            prefix,
            lambda: _prefixes_of(module, head, config, crop_size, also_for),
        )
        shape = store.arrays(paths[:1])[paths[0]].shape
        feature_sets = {name: features_of(store, samples[name], shape) for name in SPLITS}
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
