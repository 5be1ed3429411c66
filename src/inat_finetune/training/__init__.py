"""One run: configuration and recipes, the run itself, checkpoints that survive crashes,
preflight checks, resume, loggers."""

from inat_finetune.training.config import TrainConfig, load_config
from inat_finetune.training.resume import resume_run
from inat_finetune.training.run import RunResult, train

__all__ = ["RunResult", "TrainConfig", "load_config", "resume_run", "train"]
