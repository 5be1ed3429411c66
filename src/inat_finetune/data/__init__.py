"""Photos to batches: dataset layouts and splits, safe image reading, transforms and the
datamodule, resumable sampling, augmentation, TTA, data checks and downloads."""

from inat_finetune.data.folders import DataSplit, SkippedFile, detect_layout, make_split
from inat_finetune.data.images import ImageRefused, check_image, load_image, memory_refusal
from inat_finetune.data.datamodule import FineTuneDataModule, build_eval_transform, build_train_transform
from inat_finetune.data.datacheck import check_data
from inat_finetune.data.download import download_dataset, download_subset

__all__ = ["DataSplit", "FineTuneDataModule", "ImageRefused", "SkippedFile", "build_eval_transform", "build_train_transform", "check_data", "check_image", "detect_layout", "download_dataset", "download_subset", "load_image", "make_split", "memory_refusal"]
