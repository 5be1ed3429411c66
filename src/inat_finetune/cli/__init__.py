"""The ``inat-finetune`` command line."""

from inat_finetune.cli.main import app

__all__ = ["app"]
