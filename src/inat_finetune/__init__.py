"""inat-finetune: fine-tune ImageNet-pretrained CNNs on iNaturalist nature_12K.

From Python: ``train``, ``compare`` and ``load`` (see ``inat_finetune.api``).
"""

import os

# OpenMP threads that spin while they wait starve the DataLoader workers and every other
# process on a small machine: on 2 shared cores a training epoch ran 2.5-3x faster with
# threads that sleep instead (benchmarks/RESULTS.md). It must be set before torch loads, so it
# only applies where this package is imported first (the command line, the benchmarks); a
# value already in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from inat_finetune.api import Comparison, Run, compare, load, train
from inat_finetune.errors import UserError
from inat_finetune.models.backbones import get_model, list_models

__version__ = "0.1.0"
__all__ = [
    "Comparison",
    "Run",
    "UserError",
    "__version__",
    "compare",
    "get_model",
    "list_models",
    "load",
    "train",
]
