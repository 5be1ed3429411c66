"""Several runs as one experiment: the strategy comparison and the hyperparameter sweep.

The sweep (``experiments.sweep.run_sweep``) is imported from its module, not from here: it needs
the 'sweep' extra (Optuna), and `compare` must not (runtime/extras.py).
"""

from inat_finetune.experiments.comparison import compare

__all__ = ["compare"]
