"""Optimisation beyond the seed's plain Adam: parameter groups, schedules, EMA, lr range test.

* Parameter groups: one pair per stage (see ``models/stages.py``), so each stage can have its own
  learning rate (discriminative learning rates: the head gets ``lr``, the backbone
  ``lr * backbone_lr_scale``, and with ``layer_decay < 1`` each stage further from the head
  another factor ``layer_decay`` less), and so norm-layer weights and biases (every tensor of
  one dimension) get no weight decay: decaying them only shrinks the scale of features.
* The optimizer holds every parameter from the first step, frozen or not: a frozen parameter
  has no gradient, and Adam, AdamW and SGD skip those entirely (no update, no state, no weight
  decay). Unfreezing is then only ``requires_grad``, and resuming rebuilds identical groups.
* Schedules (stepped every batch): ``constant``, ``cosine`` (linear warmup, then cosine to 0)
  or ``onecycle`` (torch's OneCycleLR). With warmup, a stage unfrozen later warms up again
  from the epoch it starts training, so waking layers do not take a full-size step at once.
* EMA: timm's ``ModelEmaV3`` with its warmup (the decay grows with the step count, so short
  runs average sensibly). With EMA on, the averaged weights are the model: they are what is
  validated (and so what selects ``best.ckpt``), tested, and saved as the checkpoint's
  ``model.*`` weights that ``evaluate``, ``predict`` and ``export`` load. The raw training
  weights are kept in the checkpoint too, under ``training_model.*``, only so that a run can
  be resumed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from inat_finetune.models.freezing import FreezeSummary, apply_strategy, summarize
from inat_finetune.models.stages import HEAD, Stage, UnfreezePlan, apply_start, backbone_stages

EMA_RAW_PREFIX = "training_model."


@dataclass
class TrainingPlan:
    """Everything the training loop does beyond the seed's; the defaults are the seed's."""

    stages: list[Stage] = field(default_factory=list)  # empty: one group for everything
    unfreeze: UnfreezePlan | None = None
    backbone_lr_scale: float = 1.0
    layer_decay: float = 1.0
    lr_schedule: str = "constant"
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    class_weights: list[float] | None = None
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    ema_decay: float | None = None
    tta: str = "none"


def plan_from_config(
    config: Any, model: nn.Module, head: str, split: Any
) -> tuple[TrainingPlan, FreezeSummary]:
    """Freeze ``model`` for the first epoch (by strategy or stage schedule); gather the plan.

    With a stage schedule the parameter counts returned are those of its last stage, when the
    most trains.
    """
    stages = backbone_stages(model, head)
    schedule = config.stage_schedule()
    unfreeze = None
    if schedule is None:
        summary = apply_strategy(model, head, config.strategy, config.freeze_percent)
    else:
        option = "--unfreeze-schedule" if config.unfreeze_schedule else "--train-from"
        unfreeze = UnfreezePlan.build(stages, schedule, option)
        apply_start(model, stages, unfreeze.starts[-1])
        summary = summarize(model, config.strategy)
        apply_start(model, stages, unfreeze.starts[0])
    weights = None
    if config.class_weighted_loss:
        weights = class_weights(split.counts()["train"], split.classes)
    plan = TrainingPlan(
        stages=stages,
        unfreeze=unfreeze,
        backbone_lr_scale=config.backbone_lr_scale,
        layer_decay=config.layer_decay,
        lr_schedule=config.lr_schedule,
        warmup_epochs=config.warmup_epochs,
        label_smoothing=config.label_smoothing,
        class_weights=weights,
        mixup_alpha=config.mixup_alpha,
        cutmix_alpha=config.cutmix_alpha,
        ema_decay=config.ema_decay,
        tta=config.tta,
    )
    return plan, summary


def no_decay(name: str, param: nn.Parameter, skip: set[str]) -> bool:
    """Biases and norm weights (1-D), and what the model itself lists (ViT position tokens)."""
    return param.ndim <= 1 or name in skip


def param_groups(
    model: nn.Module,
    stages: list[Stage],
    lr: float,
    weight_decay: float,
    backbone_lr_scale: float = 1.0,
    layer_decay: float = 1.0,
) -> list[dict[str, Any]]:
    """Two groups per stage (decayed, not decayed), each with its stage's learning rate.

    Groups depend only on the architecture, never on what is frozen, so a resumed run builds
    the same groups in the same order before the saved optimizer state is loaded into them.
    """
    named = dict(model.named_parameters())
    if not stages:
        stages = [Stage(HEAD, tuple(named))]
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    n_backbone = sum(1 for s in stages if s.name != HEAD)
    groups = []
    for index, stage in enumerate(stages):
        scale = 1.0
        if stage.name != HEAD:
            scale = backbone_lr_scale * layer_decay ** (n_backbone - 1 - index)
        plain = {n for n in stage.params if no_decay(n, named[n], skip)}
        decayed = [n for n in stage.params if n not in plain]
        undecayed = [n for n in stage.params if n in plain]
        for suffix, names, decay in (("", decayed, weight_decay), (" (no decay)", undecayed, 0.0)):
            params = [named[n] for n in names]
            if params:
                groups.append(
                    {
                        "params": params,
                        "lr": lr * scale,
                        "weight_decay": decay,
                        "name": stage.name + suffix,
                        "stage": index,
                    }
                )
    return groups


def build_optimizer(name: str, groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    # Adam's weight_decay is L2 added to the gradient (the seed's optimizer); AdamW's is decoupled.
    return torch.optim.Adam(groups, lr=lr)


def lr_factor(
    step: int, total: int, warmup: int, start: int = 0, schedule: str = "cosine"
) -> float:
    """Multiplier of a group's learning rate at optimizer step ``step`` (0-based).

    ``start`` is the step at which the group's stage starts training: its warmup begins there.
    """
    warm = 1.0 if warmup <= 0 else min(1.0, (step - start + 1) / warmup)
    if schedule != "cosine":
        return max(warm, 0.0)
    progress = min(1.0, max(0.0, (step - warmup) / max(1, total - warmup)))
    return max(warm, 0.0) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, plan: TrainingPlan, total_steps: int, max_epochs: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """A per-step scheduler for ``plan.lr_schedule`` (``constant`` still warms up)."""
    steps_per_epoch = max(1, total_steps // max(1, max_epochs))
    warmup = round(plan.warmup_epochs * steps_per_epoch)
    if plan.lr_schedule == "onecycle":
        total = max(total_steps, 2)
        pct_start = min(0.9, warmup / total) if warmup else 0.25
        if round(pct_start * total) == 1:
            # torch divides by (pct_start * total_steps - 1), the warm-up's last step: a
            # warm-up of one step (a 4-step run, or one epoch of one batch) divides by zero.
            pct_start = min(0.9, 2 / total)
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=[g["lr"] for g in optimizer.param_groups],
            total_steps=total,
            pct_start=pct_start,
        )
    lambdas = []
    for group in optimizer.param_groups:
        start = 0
        if plan.unfreeze is not None:
            start = min(plan.unfreeze.unfreeze_epoch(group["stage"]), max_epochs) * steps_per_epoch

        def factor(step: int, start: int = start) -> float:
            return lr_factor(step, total_steps, warmup, start, plan.lr_schedule)

        lambdas.append(factor)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


def class_weights(counts: dict[str, int], classes: list[str]) -> list[float]:
    """``n / (C * n_c)``: each class contributes equally to the loss whatever its size."""
    total = sum(counts[c] for c in classes)
    return [total / (len(classes) * max(1, counts[c])) for c in classes]


def make_ema(model: nn.Module, decay: float) -> nn.Module:
    from timm.utils import ModelEmaV3

    ema = ModelEmaV3(model, decay=decay, use_warmup=True)
    for param in ema.parameters():
        param.requires_grad_(False)
    return ema


def swap_ema_for_saving(state_dict: dict[str, torch.Tensor]) -> None:
    """In place: ``model.*`` <- the EMA weights, ``training_model.*`` <- the raw weights."""
    for key in [k for k in state_dict if k.startswith("model.")]:
        rest = key[len("model.") :]
        state_dict[EMA_RAW_PREFIX + rest] = state_dict[key]
        state_dict[key] = state_dict.pop("ema.module." + rest)


def swap_ema_for_loading(state_dict: dict[str, torch.Tensor]) -> None:
    """Undo ``swap_ema_for_saving`` so the state dict fits the module again."""
    for key in [k for k in state_dict if k.startswith(EMA_RAW_PREFIX)]:
        rest = key[len(EMA_RAW_PREFIX) :]
        state_dict["ema.module." + rest] = state_dict["model." + rest]
        state_dict["model." + rest] = state_dict.pop(key)


def run_lr_find(
    trainer: Any, module: Any, datamodule: Any, steps: int, apply: bool
) -> dict[str, Any]:
    """Lightning's learning-rate range test: the rates tried, their losses and the suggestion.

    The learning rate grows exponentially from 1e-7 to 1 over ``steps`` batches while the loss
    is recorded; the suggestion is the rate where the loss falls fastest. Every parameter group
    gets the same rate during the test, so the suggestion is for the head (``--lr``); the
    backbone's groups keep their ratio to it. The model and optimizer are restored afterwards.
    Returns ``suggestion``, ``applied`` (``apply`` and a suggestion was found: ``module.lr`` is
    then set to it), and ``lr``/``loss`` (absent when Lightning found nothing). Draws and writes
    nothing: the caller saves the numbers and draws them (``reporting/lr_find.py``).
    """
    from lightning.pytorch.tuner import Tuner

    finder = Tuner(trainer).lr_find(
        module,
        datamodule=datamodule,
        min_lr=1e-7,
        max_lr=1.0,
        num_training=steps,
        update_attr=apply,
        attr_name="lr",
    )
    if finder is None:
        return {"suggestion": None, "applied": False}
    suggestion = finder.suggestion()
    return {
        "suggestion": suggestion,
        "applied": bool(apply and suggestion is not None),
        "lr": [float(v) for v in finder.results["lr"]],
        "loss": [float(v) for v in finder.results["loss"]],
    }
