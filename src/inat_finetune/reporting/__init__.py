"""Figures, the HTML run and comparison report, and the sweep report."""

from inat_finetune.reporting.plots import (
    make_run_figures,
    plot_class_samples,
    plot_confusion,
    plot_curves,
    plot_prediction_grid,
)
from inat_finetune.reporting.report import write_report
from inat_finetune.reporting.sweep_report import write_sweep_report

__all__ = [
    "make_run_figures",
    "plot_class_samples",
    "plot_confusion",
    "plot_curves",
    "plot_prediction_grid",
    "write_report",
    "write_sweep_report",
]
