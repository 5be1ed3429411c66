"""The fine-tuning task as a Lightning module, its optimisation plan, and the linear probe
on stored features."""

from inat_finetune.tasks.classification import FineTuneModule
from inat_finetune.tasks.linear_probe import ProbeFit, fit_probe, folds_for
from inat_finetune.tasks.optim import TrainingPlan, plan_from_config

__all__ = [
    "FineTuneModule",
    "ProbeFit",
    "TrainingPlan",
    "fit_probe",
    "folds_for",
    "plan_from_config",
]
