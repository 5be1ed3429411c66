"""Using a trained model: evaluation, prediction and export.

The web server (``inference.serve``) is imported from its module, not from here: it needs the
'serve' extra (FastAPI), and importing this package must not (runtime/extras.py).
"""

from inat_finetune.inference.evaluation import evaluate, find_checkpoint, load_checkpoint
from inat_finetune.inference.export import export
from inat_finetune.inference.predict import LabelScore, Predictor, predict_paths

__all__ = [
    "LabelScore",
    "Predictor",
    "evaluate",
    "export",
    "find_checkpoint",
    "load_checkpoint",
    "predict_paths",
]
