"""Using a trained model: evaluation, prediction, export and the web server."""

from inat_finetune.inference.evaluation import evaluate, find_checkpoint, load_checkpoint
from inat_finetune.inference.export import export
from inat_finetune.inference.predict import LabelScore, Predictor, predict_paths
from inat_finetune.inference.serve import create_app

__all__ = [
    "LabelScore",
    "Predictor",
    "create_app",
    "evaluate",
    "export",
    "find_checkpoint",
    "load_checkpoint",
    "predict_paths",
]
