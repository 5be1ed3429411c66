"""The speed paths: the prepared-image and feature caches over one checked array store, and
the fast depthwise backward."""

from inat_finetune.speed.caching import ArrayStore, cache_root
from inat_finetune.speed.depthwise_grad import use_fast_depthwise_grad
from inat_finetune.speed.features import cached_features
from inat_finetune.speed.prepared import prepare, prepared_images_for

__all__ = [
    "ArrayStore",
    "cache_root",
    "cached_features",
    "prepare",
    "prepared_images_for",
    "use_fast_depthwise_grad",
]
