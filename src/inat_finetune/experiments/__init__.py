"""Several runs as one experiment: the strategy comparison and the hyperparameter sweep."""

from inat_finetune.experiments.comparison import compare
from inat_finetune.experiments.sweep import run_sweep

__all__ = ["compare", "run_sweep"]
