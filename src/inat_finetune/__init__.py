"""inat-finetune: fine-tune ImageNet-pretrained CNNs on iNaturalist nature_12K."""

from inat_finetune.errors import UserError
from inat_finetune.models import get_model, list_models

__version__ = "0.1.0"
__all__ = ["UserError", "get_model", "list_models", "__version__"]
