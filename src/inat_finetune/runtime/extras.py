"""Optional features and the extra that installs each: one line naming the fix when it is missing.

The core install trains, compares, evaluates, predicts and reports. Four features need packages
that only they use, installed by the extra of pyproject.toml's ``[project.optional-dependencies]``
of the same name (``all`` installs the four):

    wandb    --wandb logging                          wandb
    sweep    the `sweep` command                      optuna
    export   `export --format onnx` and its check     onnx, onnxruntime
    serve    the `serve` command                      fastapi, uvicorn, python-multipart

The code that uses these packages imports them inside functions (or in modules that only the
feature imports), after ``require_extra`` has checked them, so every command's ``--help`` and
every core command runs without any extra. ``require_extra`` raises a ``UserError``, which the
command line reports as one line with exit status 2:

    error: serve needs the 'serve' extra (fastapi is not installed): pip install 'inat-finetune[serve]'
"""

from __future__ import annotations

import importlib

from inat_finetune.errors import UserError

# The modules each extra provides, as imported (python-multipart imports as python_multipart).
EXTRAS: dict[str, tuple[str, ...]] = {
    "wandb": ("wandb",),
    "sweep": ("optuna",),
    "export": ("onnx", "onnxruntime"),
    "serve": ("fastapi", "uvicorn", "python_multipart"),
}


def install_hint(extra: str) -> str:
    """The command that installs ``extra``: ``pip install 'inat-finetune[extra]'``."""
    return f"pip install 'inat-finetune[{extra}]'"


def missing_module(extra: str) -> str | None:
    """The first module of ``extra`` that cannot be imported, or None when all can."""
    for module in EXTRAS[extra]:
        try:
            importlib.import_module(module)
        except ImportError:
            return module
    return None


def require_extra(extra: str, feature: str) -> None:
    """Raise a one-line ``UserError`` naming the install command when ``extra`` is missing.

    ``feature`` is what the user asked for, as they typed it: ``serve``, ``--wandb``,
    ``export --format onnx``.
    """
    if extra not in EXTRAS:
        raise ValueError(f"no extra named {extra!r}; known: {', '.join(EXTRAS)}")
    module = missing_module(extra)
    if module is not None:
        raise UserError(
            f"{feature} needs the '{extra}' extra ({module} is not installed): "
            f"{install_hint(extra)}"
        )
