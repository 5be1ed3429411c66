"""The self-describing checkpoint, read safely.

Every checkpoint holds, under ``CARD_KEY``, a card that says what the model is (backbone, class
names, head, preprocessing, strategy), so evaluation, predict, export and serve need nothing
else. ``read_checkpoint`` loads with ``weights_only=True`` and turns every way a file can be
bad (missing, truncated, not a checkpoint, holding Python objects that could run code) into one
line naming the file.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from inat_finetune.errors import UserError


def read_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """``torch.load(weights_only=True)`` with a one-line error for every way a file can be bad."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint file")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        unsafe = unsafe_global(str(exc))
        if unsafe is not None:  # a class or function, not a corrupt byte
            raise UserError(
                f"{path}: refused as unsafe; it holds Python objects ({unsafe}) besides tensors "
                "and plain values, and loading those could run code; use a checkpoint written "
                "by inat-finetune"
            ) from None
        raise UserError(f"{path}: not a readable checkpoint (truncated or corrupt?)") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise UserError(
            f"{path}: not a readable checkpoint (truncated or corrupt?): {_first_line(exc)}"
        ) from None
    if not isinstance(checkpoint, dict):
        raise UserError(f"{path}: not a Lightning checkpoint (holds a {type(checkpoint).__name__})")
    return checkpoint


# How torch's weights-only unpickler names a global it will not load: "Unsupported global:
# GLOBAL x.Y was not an allowed global" (torch 2.4-2.13 for classes), "Trying to load
# unsupported GLOBAL posix.system whose module posix is blocked" (torch 2.14). Matched without
# regard to case, on any of these phrasings.
_UNSAFE = re.compile(
    r"unsupported global|not an allowed global|whose module \S+ is blocked", re.IGNORECASE
)


_GLOBAL_NAME = re.compile(r"\bGLOBAL\s+(\w+(?:\.\w+)+)")  # a dotted module.name


def unsafe_global(message: str) -> str | None:
    """The name of the global a weights-only load refused (or "a global"), else None."""
    if not _UNSAFE.search(message):
        return None
    named = _GLOBAL_NAME.search(message)
    return named.group(1) if named else "a global"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


CARD_KEY = "inat_finetune"  # where a checkpoint keeps what is needed to use it
