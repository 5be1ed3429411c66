"""The fine-tuning task as a Lightning module, and its optimisation plan."""

from inat_finetune.tasks.classification import FineTuneModule
from inat_finetune.tasks.optim import TrainingPlan, plan_from_config

__all__ = ["FineTuneModule", "TrainingPlan", "plan_from_config"]
