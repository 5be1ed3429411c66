"""Presets of options: ``seed`` (the original write-up), ``strong`` (the best shown here),
``bn_head`` (BatchNorm + head: the built-in defaults, the default recipe before ``auto``) and
``probe`` (a linear probe fitted on cached features, ``training/probe_run.py``).

``auto``, the default, is no preset: it chooses among presets (``experiments/auto.py``), and
``recipe_values("auto")`` is empty, so a run that ``auto`` does not take over (a strategy or a
stage schedule given) is the built-in defaults, as ``bn_head``.

A recipe only fills in defaults. Precedence, highest first: command-line option, ``--config``
YAML file, recipe, built-in default. A few options go together, and a layer that sets one of
them overrides the whole set from the layers below:

* what trains: ``--strategy`` versus a stage schedule (``--train-from``, ``--lp-epochs``,
  ``--unfreeze-schedule``); ``--train-from layer3`` over ``--recipe strong`` keeps the recipe's
  linear-probe epochs but unfreezes only from layer3.
* ``--backbone`` with ``--weights``: a recipe's weights name belongs to the recipe's backbone.

``seed`` is the original notebook: ResNet50 (ImageNet weights as ``pretrained=True`` loaded
them, IMAGENET1K_V1), BatchNorm and classifier trained (``freeze_except_bn_and_fc``), Adam at
1e-3 without schedule or weight decay, plain cross-entropy, batch 32, 224 px, the notebook's
augmentation (random resized crop, flip, colour jitter, rotation), ``model.train()`` on the
whole network (``frozen_bn: train``), 30 epochs, no test-time augmentation. Two things of the
notebook are deliberately not reproduced: it augmented its validation images too (it split an
augmented ImageFolder), and it resized evaluation images to 224x224 without keeping the aspect
ratio; here validation is never augmented and evaluation is resize-256 then centre-crop-224.

``strong`` is what the ablation in ``benchmarks/RESULTS_recipes.md`` supports: LP-FT (one epoch
of the head alone, then the whole network) with AdamW at 3e-3 for the head and 1e-4 for the
backbone, warmup then cosine decay, label smoothing 0.1, no decay on norms and biases,
TrivialAugment and random erasing, gradient clipping, frozen BatchNorm kept in eval mode
during the probe, and flip test-time augmentation.

``probe`` is the linear probe on cached features, fitted by L-BFGS with its weight decay (and
the use of mirror images: extra training rows, flip TTA) chosen by 5-fold cross-validation on
the training split (``tasks/linear_probe.py``, ``training/probe_run.py``). Fitted that way on
hymenoptera's MobileNetV2 features (all of train/), it scored 96.1% test against fastai's
frozen ``fit_one_cycle`` 95.0 and the Adam-trained head (``--strategy freeze_last
--no-augment``) 93.7.
"""

from __future__ import annotations

from typing import Any

from inat_finetune.errors import UserError
from inat_finetune.models.stages import format_schedule

RECIPES: dict[str, dict[str, Any]] = {
    "seed": {
        "backbone": "resnet50",
        "weights": "IMAGENET1K_V1",
        "strategy": "freeze_except_bn_and_fc",
        "frozen_bn": "train",
        "epochs": 30,
        "batch_size": 32,
        "lr": 1e-3,
        "optimizer": "adam",
        "weight_decay": 0.0,
        "img_size": 224,
        "augment": True,
        "augmentation": "seed",
        "random_erasing": 0.0,
        "lr_schedule": "constant",
        "warmup_epochs": 0.0,
        "label_smoothing": 0.0,
        "backbone_lr_scale": 1.0,
        "tta": "none",
    },
    "strong": {
        "lp_epochs": 1,
        "train_from": "all",
        "frozen_bn": "eval",
        "epochs": 20,
        "batch_size": 32,
        "optimizer": "adamw",
        # The linear-probe epoch needs a brisk head; the backbone then fine-tunes at 1e-4.
        # Chosen on validation accuracy over lr 1e-3 / scale 0.1 (benchmarks/RESULTS_recipes.md).
        "lr": 3e-3,
        "backbone_lr_scale": 0.0333,
        "weight_decay": 0.01,
        "lr_schedule": "cosine",
        "warmup_epochs": 1.0,
        "label_smoothing": 0.1,
        "grad_clip_norm": 1.0,
        "augment": True,
        "augmentation": "trivialaugment",
        "random_erasing": 0.25,
        "tta": "flip",
    },
    # The built-in defaults: BatchNorm and classifier train, augmented, Adam at 1e-3.
    "bn_head": {},
    # Fitted in closed form on cached features (training/probe_run.py): what trains and what
    # would stop the cache are fixed; lr, epochs, batch and weight decay play no part (the
    # weight decay is chosen by cross-validation on the training split).
    "probe": {
        "strategy": "freeze_last",
        "frozen_bn": "eval",
        "augment": False,
        "feature_cache": True,
        "tta": "none",
        "epochs": 1,
    },
}


AUTO = "auto"  # the recipe that chooses among the others (experiments/auto.py)


SCHEDULE_KEYS = ("train_from", "lp_epochs", "unfreeze_schedule")


# key set by a layer -> keys of the layers below that it displaces
DISPLACES: dict[str, tuple[str, ...]] = {
    "strategy": SCHEDULE_KEYS,
    "unfreeze_schedule": ("strategy", "train_from", "lp_epochs"),
    "train_from": ("strategy", "unfreeze_schedule"),
    "lp_epochs": ("strategy", "unfreeze_schedule"),
    "backbone": ("weights",),
}


def recipe_values(name: str | None) -> dict[str, Any]:
    if name is None or name == AUTO:
        return {}
    if not isinstance(name, str) or name not in RECIPES:
        raise UserError(f"--recipe {name}: unknown; use one of {AUTO}, {', '.join(RECIPES)}")
    return dict(RECIPES[name])


def merge_layers(layers: list[dict[str, Any]]) -> dict[str, Any]:
    """Later layers win; a key that belongs to a set displaces the set from earlier layers."""
    merged: dict[str, Any] = {}
    for layer in layers:
        for key in layer:
            for displaced in DISPLACES.get(key, ()):
                if displaced not in layer:
                    merged.pop(displaced, None)
        merged.update(layer)
    return merged


def preset_name(config: Any) -> str | None:
    """The preset a run trained with: ``auto`` is a choice, not a preset; a run that reaches
    training with it (called directly, not through ``experiments/auto.py``) has none."""
    return None if config.recipe == AUTO else config.recipe


def recipe_card(config: Any, plan: Any, train_preprocessing: Any) -> dict[str, Any]:
    """What a checkpoint's card records of the recipe, beside model_card's fields."""
    schedule = config.stage_schedule()
    return {
        "recipe": preset_name(config),
        "schedule": format_schedule(schedule) if schedule else None,
        "ema": plan.ema_decay is not None,
        "tta": config.tta,
        "train_preprocessing": train_preprocessing.to_dict(),
    }


def recipe_results(config: Any, module: Any, epochs_run: int) -> dict[str, Any]:
    """The recipe's entries of results.json."""
    schedule = config.stage_schedule()
    unfreeze = module.plan.unfreeze
    return {
        "recipe": preset_name(config),
        "schedule": format_schedule(schedule) if schedule else None,
        # The stages that started training within the epochs run, e.g. [[0, "head"],
        # [1, "features.0"]]: the schedule is a function of the epoch, so a resumed run
        # reports the same as one that never stopped.
        "unfrozen": [
            [epoch, unfreeze.stages[start].name]
            for epoch, start in zip(unfreeze.epochs, unfreeze.starts, strict=True)
            if epoch < epochs_run
        ]
        if unfreeze is not None
        else None,
        "lr": module.lr,
        "ema": module.ema is not None,
        "tta": config.tta,
    }


def why_not_for_the_probe(
    augment: bool, tta: str, feature_cache: bool, strategy: str
) -> str | None:
    """The options that rule out ``--recipe probe`` (a head fitted on cached features of a
    frozen backbone), named in one line; None when there are none."""
    clashes = {
        "--augment": augment,
        f"--tta {tta}": tta != "none",
        "--no-feature-cache": not feature_cache,
        f"--strategy {strategy}": strategy != "freeze_last",
    }
    given = [option for option, clash in clashes.items() if clash]
    if not given:
        return None
    return (
        f"recipe probe fits the head on cached features of a frozen backbone, which "
        f"{', '.join(given)} rule(s) out; drop them or use another --recipe"
    )
