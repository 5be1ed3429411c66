"""A configuration under another recipe, keeping what the user gave: how ``--recipe auto``'s
candidates (``experiments/auto.py``) and ``compare --recipes`` (``experiments/comparison.py``)
derive each run's configuration from the one the user asked for.

Precedence is the command line's (``training/config.py``): the recipe's preset, then the
candidate's own options, then every option the user set explicitly, then the caller's changes.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from inat_finetune.errors import UserError
from inat_finetune.training.config import TrainConfig, explain_validation_error
from inat_finetune.training.recipes import merge_layers, recipe_values


def given_options(config: TrainConfig) -> dict[str, Any]:
    """The options set explicitly (a keyword, the command line, a --config file or a recipe)."""
    return {name: getattr(config, name) for name in config.model_fields_set}


def with_recipe(
    config: TrainConfig,
    recipe: str | None,
    options: dict[str, Any] | None = None,
    **changes: Any,
) -> TrainConfig:
    """``config`` under another recipe: the recipe's preset and ``options`` over it, then what
    ``config`` was given explicitly (it wins, as on the command line), then ``changes``."""
    given = {k: v for k, v in given_options(config).items() if k != "recipe"}
    layers = [recipe_values(recipe), options or {}, given, {"recipe": recipe, **changes}]
    values = merge_layers(layers)
    try:
        return TrainConfig(**values)
    except ValidationError as exc:
        raise UserError(explain_validation_error(exc, f"--recipe {recipe}")) from None
