"""Figures (as PNG files for runs, as Figures for notebooks), the HTML run and comparison report,
and the sweep report."""

from inat_finetune.reporting.photo_grids import (
    class_samples_figure,
    confident_mistakes_figure,
    plot_class_samples,
    plot_prediction_grid,
    prediction_grid_figure,
)
from inat_finetune.reporting.plots import (
    comparison_figure,
    confusion_figure,
    curves_figure,
    make_run_figures,
    per_class_accuracy_figure,
    plot_confusion,
    plot_curves,
)
from inat_finetune.reporting.report import write_report
from inat_finetune.reporting.sweep_report import write_sweep_report

__all__ = [
    "class_samples_figure",
    "comparison_figure",
    "confident_mistakes_figure",
    "confusion_figure",
    "curves_figure",
    "make_run_figures",
    "per_class_accuracy_figure",
    "plot_class_samples",
    "plot_confusion",
    "plot_curves",
    "plot_prediction_grid",
    "prediction_grid_figure",
    "write_report",
    "write_sweep_report",
]
