"""Where the backbone's output can be stored: the classifier's input or a frozen prefix, and
the probes that decide it (see ``speed/features.py`` for when and why features are stored).

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

The frozen prefix: when the classifier is not the only thing that trains (``freeze_k_percent``
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
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16, "32-true": None}

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


def inside(name: str, modules: list[str]) -> bool:
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
def modes_kept(module: nn.Module) -> Iterator[None]:
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
    training = [n for n, p in model.named_parameters() if p.requires_grad and not inside(n, tail)]
    if training:
        return f"strategy {config.strategy} trains {len(training)} backbone tensors"
    moving = moving_in_training(module)
    return next((why for name, why in moving.items() if not inside(name, tail)), None)


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


def moving_in_training(module: nn.Module) -> dict[str, str]:
    """The modules that compute differently between epochs in training mode, and why."""
    moving = {}
    with modes_kept(module):
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


def probe_images(module: nn.Module, crop_size: int) -> torch.Tensor:
    """Two seeded random images on the model's device, in its memory format."""
    images = torch.randn(2, 3, crop_size, crop_size, generator=torch.Generator().manual_seed(0))
    images = images.to(next(module.model.parameters()).device)
    if getattr(module, "channels_last", False):
        images = images.contiguous(memory_format=torch.channels_last)
    return images


def probe(module: nn.Module, tail: list[str], crop_size: int) -> str | None:
    """Check on a random batch that the captured features are deterministic and sufficient."""
    model = module.model
    images = probe_images(module, crop_size)
    with (
        modes_kept(module),
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
    moving = moving_in_training(module)
    leading: list[str] = []
    for name in blocks(model):
        if any(p.requires_grad for p in model.get_submodule(name).parameters()):
            break
        if any(inside(n, [name]) for n in moving):
            break
        leading.append(name)
    if not leading:
        return []
    images = probe_images(module, crop_size)
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in leading}
    hooks = [
        model.get_submodule(name).register_forward_hook(
            # Cloned: a later in-place activation may overwrite the block's output.
            lambda _m, _args, output, name=name: seen[name].append(output.clone())
        )
        for name in leading
    ]
    with modes_kept(module), torch.random.fork_rng(devices=[]), torch.no_grad():
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
        depends = inside(name, prefix) if prefix else not inside(name, tail)
        if not depends:
            continue
        flat = tensor.detach().cpu().reshape(-1).contiguous()  # logical order, any memory format
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()


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
