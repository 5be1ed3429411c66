"""Backbones and their ImageNet weights, feature ensembles of them, freezing strategies,
stages, and the self-describing checkpoint."""

from inat_finetune.models.backbones import BuiltModel, Preprocessing, get_model, list_models
from inat_finetune.models.checkpoints import CARD_KEY, read_checkpoint
from inat_finetune.models.ensembles import FeatureEnsemble
from inat_finetune.models.freezing import STRATEGIES, apply_strategy
from inat_finetune.models.stages import backbone_stages

__all__ = [
    "BuiltModel",
    "CARD_KEY",
    "FeatureEnsemble",
    "Preprocessing",
    "STRATEGIES",
    "apply_strategy",
    "backbone_stages",
    "get_model",
    "list_models",
    "read_checkpoint",
]
