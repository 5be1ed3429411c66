"""The learning-rate range test's figure, drawn from the numbers ``tasks.optim.run_lr_find`` returns.

``lr_find_figure`` returns the ``matplotlib.figure.Figure`` (shown inline by a notebook);
``plot_lr_find`` writes it as a PNG like every other figure (``plots.save_figure``). The
finder itself draws nothing: the training layer calls this with what it found.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from inat_finetune.reporting.plots import save_figure


def lr_find_figure(found: dict[str, Any]) -> Figure:
    """Loss against learning rate (log scale), the suggestion marked when there is one.

    ``found`` holds ``lr`` and ``loss`` (equal-length lists) and ``suggestion`` (or None).
    """
    fig = Figure(figsize=(7, 4.5), dpi=100)
    ax = fig.add_subplot()
    ax.plot(found["lr"], found["loss"], color="#4c72b0")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss (smoothed)")
    suggestion = found["suggestion"]
    if suggestion is not None:
        ax.axvline(suggestion, color="#d00000", linestyle="--", label=f"suggested {suggestion:.2e}")
        ax.legend()
    ax.set_title("Learning-rate range test")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_lr_find(found: dict[str, Any], out: str | Path) -> Path:
    """Write ``lr_find_figure(found)`` to ``out`` as a PNG and return its path."""
    return save_figure(lr_find_figure(found), out)
