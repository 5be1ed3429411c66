"""What a run leaves on disk besides its checkpoints, and the one way a report is written.

* ``write_run_files``: config.yaml, split.json and dataset.json, written when a new run starts
  (a resumed run rewrites them once its model, data and caches are ready; see ``run``).
* ``write_lr_find``: ``lr_find.json`` and ``figures/lr_find.png`` of a range test; with
  ``--lr-find-apply`` also config.yaml with the lr the run then trains with.
* ``write_outputs``: on rank 0 after the test, test_predictions.csv, results.json, the
  figures and report.html (unless ``report=False``) and the final W&B summary: test metrics,
  figures, the predictions table, W&B's own confusion-matrix chart and, with
  ``--wandb-log-model``, best.ckpt as a model artifact (``model-<run id>``, aliases best and
  latest, with the backbone, classes and accuracies as its metadata).
* ``write_figures_and_report``: the figures and report.html of a run or of a comparison
  directory. ``train`` and ``compare`` both write their report through it.

Every file is written atomically (``runfiles``): a run stopped half-way never leaves half a file.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.loggers import Logger, WandbLogger

from inat_finetune.data.folders import DataSplit
from inat_finetune.runfiles import write_json_atomic, write_text_atomic, write_yaml_atomic
from inat_finetune.training.config import TrainConfig

LR_FIND_FIGURE = "figures/lr_find.png"


def write_run_files(run_dir: Path, config: TrainConfig, split: DataSplit) -> None:
    """config.yaml, split.json and dataset.json (results.json: see BestAndLastCheckpoint)."""
    write_yaml_atomic(run_dir / "config.yaml", config.to_yaml_dict())
    split.save(run_dir / "split.json")
    write_json_atomic(run_dir / "dataset.json", split.summary())


def write_lr_find(run_dir: Path, found: dict[str, Any]) -> dict[str, Any]:
    """Draw the range test and save its numbers; return them with the figure's path added.

    A test that found nothing (Lightning returned no finder) writes nothing.
    """
    if "lr" not in found:
        return found
    from inat_finetune.reporting.lr_find import plot_lr_find

    found = {**found, "figure": LR_FIND_FIGURE}
    plot_lr_find(found, run_dir / LR_FIND_FIGURE)
    write_json_atomic(run_dir / "lr_find.json", found)
    return found


def write_applied_lr(run_dir: Path, config: TrainConfig, lr: float) -> None:
    """config.yaml repeats the run as trained: with the range test's lr and no range test."""
    applied = config.model_copy(update={"lr": lr, "lr_find": False})
    write_yaml_atomic(run_dir / "config.yaml", applied.to_yaml_dict())


def write_outputs(
    run_dir: Path,
    split: DataSplit,
    results: dict[str, Any],
    probabilities: torch.Tensor | None,
    loggers: list[Logger],
    report: bool,
    log_model: bool = False,
) -> None:
    """Rank 0's files after the test: predictions, results, figures and report, W&B summary
    (with the best checkpoint as a model artifact when ``log_model``). No predictions file
    without ``probabilities`` (nothing tested: an auto candidate's run)."""
    if probabilities is not None:
        write_predictions(run_dir / "test_predictions.csv", split, probabilities)
    write_json_atomic(run_dir / "results.json", results)
    figures = write_figures_and_report(run_dir) if report else {}
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            best = run_dir / results["checkpoint"] if log_model else None
            log_final_to_wandb(logger, results, figures, run_dir / "test_predictions.csv", best)


def write_figures_and_report(directory: Path) -> dict[str, Path]:
    """The figures, then report.html, of a run directory or a comparison directory.

    A comparison directory (it holds comparison.json) gets its strategy chart; a run directory
    every per-run figure its files allow. Returns the figures drawn, by name.
    """
    from inat_finetune.reporting.plots import make_run_figures, plot_comparison
    from inat_finetune.reporting.report import write_report

    if (directory / "comparison.json").is_file():
        figures = {"comparison": plot_comparison(directory)}
    else:
        figures = make_run_figures(directory)
    write_report(directory)
    return figures


def log_final_to_wandb(
    logger: WandbLogger,
    results: dict[str, Any],
    figures: dict[str, Path],
    predictions: Path,
    best_checkpoint: Path | None = None,
) -> None:
    """Final test metrics in the run summary; figures as images; predictions as a table; the
    confusion matrix as W&B's chart; ``best_checkpoint`` (if given) as a model artifact."""
    import wandb

    run = logger.experiment
    run.summary.update(
        {
            f"final/{k}": v
            for k, v in results.items()
            if isinstance(v, (int, float)) and v is not None
        }
    )
    run.summary.update(
        {f"test_acc/{k}": v for k, v in results["per_class_test_acc"].items() if v is not None}
    )
    images = {f"figures/{name}": wandb.Image(str(path)) for name, path in figures.items()}
    if images:
        run.log(images)
    with predictions.open(newline="") as handle:
        rows = list(csv.reader(handle))
    if rows:
        run.log({"test_predictions": wandb.Table(columns=rows[0], data=rows[1:])})
    run.log({"confusion_matrix": confusion_chart(results)})
    if best_checkpoint is not None:
        run.log_artifact(
            model_artifact(run.id, results, best_checkpoint), aliases=["best", "latest"]
        )
    run.finish()


def confusion_chart(results: dict[str, Any]) -> Any:
    """``wandb.plot.confusion_matrix`` of the test set, from results.json's counts.

    W&B's chart takes one (true, predicted) pair per image, so the counts are expanded back
    into those pairs (rows: true class, columns: predicted, as in results.json).
    """
    import wandb

    truth: list[int] = []
    predicted: list[int] = []
    for true, counts in enumerate(results["confusion_matrix"]):
        for guess, count in enumerate(counts):
            truth += [true] * int(count)
            predicted += [guess] * int(count)
    return wandb.plot.confusion_matrix(
        y_true=truth, preds=predicted, class_names=list(results["class_names"])
    )


MODEL_METADATA = ("backbone", "strategy", "class_names", "best_epoch", "best_val_acc", "test_acc")


def model_artifact(run_id: str, results: dict[str, Any], checkpoint: Path) -> Any:
    """A W&B model artifact holding ``checkpoint`` (as best.ckpt) and what it was trained as."""
    import wandb

    artifact = wandb.Artifact(
        name=f"model-{run_id}",
        type="model",
        metadata={key: results.get(key) for key in MODEL_METADATA},
    )
    artifact.add_file(str(checkpoint), name="best.ckpt")
    return artifact


def write_predictions(path: Path, split: DataSplit, probabilities: torch.Tensor) -> Path:
    """One row per test image: path (relative to the data root), truth, prediction, probabilities."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["path", "true", "predicted", "confidence", *(f"p_{c}" for c in split.classes)])
    root = Path(split.root)
    for (image, label), probs in zip(split.samples("test"), probabilities.tolist(), strict=True):
        best = max(range(len(probs)), key=probs.__getitem__)
        writer.writerow(
            [
                image.relative_to(root).as_posix(),
                split.classes[label],
                split.classes[best],
                f"{probs[best]:.6f}",
                *(f"{p:.6f}" for p in probs),
            ]
        )
    return write_text_atomic(path, buffer.getvalue())


def best_epoch(metrics_csv: Path) -> int | None:
    """The first epoch with the highest val/acc in metrics.csv: the one best.ckpt holds."""
    if not metrics_csv.exists():
        return None
    best, found = -1.0, None
    with metrics_csv.open(newline="") as handle:
        for row in csv.DictReader(handle):
            value = row.get("val/acc")
            if value and float(value) > best:
                best, found = float(value), int(row["epoch"])
    return found
