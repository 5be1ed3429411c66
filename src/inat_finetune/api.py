"""The Python API, for notebooks and scripts: ``train``, ``compare`` and ``load``.

    from inat_finetune import train, load
    run = train(data="hymenoptera", backbone="mobilenet_v2", strategy="freeze_last", epochs=2)
    run.results["test_acc"], run.figures.curves()          # a dict, a matplotlib Figure
    run.predict(["bee.jpg"], top_k=3)                      # per image: [LabelScore(label, score), ...]
    load("runs/mobilenet_v2-freeze_last").predict([image])  # a path or a PIL image

The contract:

- ``train`` and ``compare`` take every ``TrainConfig`` field as a keyword, with the same defaults,
  recipes, YAML layering (``config="file.yaml"``) and validation as the command line
  (``training.config.load_config``); an unknown keyword is a ``UserError`` naming it. They run
  exactly what ``inat-finetune train`` and ``compare`` run (``training.train``,
  ``experiments.compare``) and leave the same run directory, results files and report.
- What they return reads that directory: the model is loaded from ``checkpoints/best.ckpt`` on
  first use (the checkpoint the test results describe), figures are drawn from its files.
- ``load`` gives the ``inference.Predictor`` that ``inat-finetune predict`` uses, so the same
  checkpoint gives the same labels and scores on the same device; ``device`` is resolved as the
  command line's ``--device`` is (auto: the GPU if there is one, else the CPU). Its answers are
  ``LabelScore(label, score)`` tuples, the names of ``predict --json``.
- Importing this module is cheap: torch, Lightning and matplotlib load on the first call.
- Log lines go to stderr through one handler on the ``inat_finetune`` logger, added once per
  process and only when nothing else (the command line, the user) configured logging, so a
  second ``train`` in a notebook does not print every line twice.

This is the top layer: nothing in the package imports it but ``inat_finetune/__init__``.
"""

from __future__ import annotations

import difflib
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inat_finetune.errors import UserError

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from torch import nn

    from inat_finetune.inference.predict import LabelScore, Predictor
    from inat_finetune.training.config import TrainConfig

LOG_HANDLER_NAME = "inat_finetune.api"  # marks the one handler this module adds


def train(
    data: str | Path,
    backbone: str | None = None,
    strategy: str | None = None,
    *,
    progress: bool = True,
    report: bool = True,
    config: str | Path | None = None,
    **options: Any,
) -> Run:
    """Fine-tune one model, as ``inat-finetune train`` does, and return the finished ``Run``.

    The default recipe is ``auto`` (``experiments/auto.py``): with no ``strategy`` or stage
    schedule it chooses among candidate recipes by validation, then trains the winner.

    ``options`` are ``TrainConfig`` fields (``epochs=2``, ``img_size=128``, ``recipe="strong"``);
    ``config`` a YAML file of them, which keywords override. ``report=False`` skips the
    figures and the HTML report.
    """
    from inat_finetune.experiments.auto import train_or_choose

    settings = build_config(config, data=str(data), backbone=backbone, strategy=strategy, **options)
    log_to_stderr_once()
    result = train_or_choose(settings, progress=progress, report=report)
    return Run(Path(result.run_dir), dict(result.results))


def compare(
    data: str | Path,
    strategies: str | Sequence[str] | None = None,
    *,
    then_train_epochs: int | None = None,
    progress: bool = True,
    report: bool = True,
    config: str | Path | None = None,
    recipes: str | Sequence[str] | None = None,
    **options: Any,
) -> Comparison:
    """Train each freezing strategy on one shared split, as ``inat-finetune compare`` does.

    ``strategies`` is a list or a comma-separated string (default: the write-up's three);
    ``then_train_epochs`` trains the strategy validation chose again for that many epochs.
    ``recipes`` (``"auto,seed,strong"`` or a list) compares recipes instead of strategies.
    """
    from inat_finetune.experiments.comparison import (
        SEED_STRATEGIES,
        parse_recipes,
        parse_strategies,
    )
    from inat_finetune.experiments.comparison import compare as run_comparison

    if strategies is None:
        chosen = list(SEED_STRATEGIES)
    else:
        text = strategies if isinstance(strategies, str) else ",".join(strategies)
        chosen = parse_strategies(text)
    compared = None
    if recipes is not None:
        compared = parse_recipes(recipes if isinstance(recipes, str) else ",".join(recipes))
    settings = build_config(config, data=str(data), **options)
    log_to_stderr_once()
    result = run_comparison(
        settings,
        chosen,
        then_train_epochs=then_train_epochs,
        progress=progress,
        report=report,
        recipes=compared,
    )
    return Comparison(Path(result.comparison_dir), dict(result.comparison))


def load(checkpoint_or_run_dir: str | Path, device: str | None = "auto") -> Predictor:
    """A ready predictor: the model in eval mode on ``device`` (auto, cpu, cuda, cuda:N or mps;
    auto: the GPU if there is one, else the CPU), with bf16/fp16 autocast where that device
    computes it natively; its ``class_names``, ``preprocessing``, and ``predict(images, top_k=1)``.
    A device this machine lacks is a ``UserError`` naming the ones it has.

    Takes a run directory, a ``.ckpt`` file, or a folder ``export --format safetensors`` wrote
    (``model.safetensors`` and ``config.json``): the same weights give the same logits."""
    from inat_finetune.inference.predict import Predictor
    from inat_finetune.runtime.devices import resolve_device

    chosen = resolve_device(device or "auto", "device=")
    return Predictor.from_checkpoint(checkpoint_or_run_dir, device=chosen)


def build_config(config: str | Path | None = None, **options: Any) -> TrainConfig:
    """A ``TrainConfig`` from keywords, refusing any that is not one of its fields by name."""
    from inat_finetune.training.config import TrainConfig, load_config

    fields = sorted(TrainConfig.model_fields)
    for name in options:
        if name not in TrainConfig.model_fields:
            close = difflib.get_close_matches(name, fields, n=1)
            hint = f"did you mean {close[0]}=...? " if close else ""
            raise UserError(
                f"{name}=...: no such option; {hint}the options are TrainConfig's fields: "
                f"{', '.join(fields)}"
            )
    return load_config(config, **options)


def log_to_stderr_once() -> None:
    """Show the package's INFO lines in a notebook, with one handler however often it is called."""
    package = logging.getLogger("inat_finetune")
    if logging.getLogger().handlers or any(
        h.get_name() == LOG_HANDLER_NAME for h in package.handlers
    ):
        return  # configured already: by the command line, the user, or an earlier call
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(LOG_HANDLER_NAME)
    handler.setFormatter(logging.Formatter("%(message)s"))
    package.addHandler(handler)
    if package.level == logging.NOTSET:
        package.setLevel(logging.INFO)


@dataclass
class RunFigures:
    """The figures of one run directory as matplotlib Figures, for a notebook to show inline."""

    run_dir: Path

    def curves(self) -> Figure:
        """Train and validation accuracy and loss per epoch."""
        from inat_finetune.reporting import curves_figure

        return curves_figure(self.run_dir)

    def confusion(self) -> Figure:
        """The test confusion matrix, counts and row-normalised."""
        from inat_finetune.reporting import confusion_figure

        return confusion_figure(self.run_dir)

    def per_class_accuracy(self) -> Figure:
        from inat_finetune.reporting import per_class_accuracy_figure

        return per_class_accuracy_figure(self.run_dir)

    def prediction_grid(self, n: int = 30, seed: int = 0) -> Figure:
        """``n`` random test images with prediction and truth; wrong ones framed in red."""
        from inat_finetune.reporting import prediction_grid_figure

        return prediction_grid_figure(self.run_dir, n=n, seed=seed)

    def confident_mistakes(self, n: int = 12) -> Figure:
        from inat_finetune.reporting import confident_mistakes_figure

        return confident_mistakes_figure(self.run_dir, n=n)

    def class_samples(
        self, class_name: str | None = None, split: str = "train", n: int = 10, seed: int = 0
    ) -> Figure:
        """``n`` random images of one class of this run's split (a random class if none named)."""
        from inat_finetune.reporting import class_samples_figure

        return class_samples_figure(self.run_dir, split, class_name, n, seed)


@dataclass
class Run:
    """A finished run: its directory, its ``results.json`` values, and its best model."""

    run_dir: Path
    results: dict[str, Any]
    _predictor: Predictor | None = field(default=None, init=False, repr=False)

    @property
    def predictor(self) -> Predictor:
        """The run's ``best.ckpt`` loaded for prediction (once), as ``load(run_dir)`` gives it."""
        if self._predictor is None:
            self._predictor = load(self.run_dir)
        return self._predictor

    @property
    def model(self) -> nn.Module:
        """The trained network of ``best.ckpt``, in eval mode."""
        return self.predictor.model

    @property
    def figures(self) -> RunFigures:
        return RunFigures(self.run_dir)

    def predict(
        self, images: Any, top_k: int = 1, tta: str | bool = "none"
    ) -> list[list[LabelScore]]:
        """Per image (paths or PIL images), its ``top_k`` ``LabelScore(label, score)`` pairs;
        ``tta``: none, flip or multicrop."""
        return self.predictor.predict(images, top_k=top_k, tta=tta)


@dataclass
class Comparison:
    """A finished strategy comparison: its directory, ``comparison.json`` and one Run each."""

    comparison_dir: Path
    comparison: dict[str, Any]

    @property
    def best_strategy(self) -> str:
        """The strategy validation accuracy chose (never the test accuracy)."""
        return str(self.comparison["best_strategy"])

    @property
    def rows(self) -> list[dict[str, Any]]:
        """One row per strategy: train, val and test accuracy, parameters, wall time."""
        return list(self.comparison["rows"])

    @property
    def runs(self) -> dict[str, Run]:
        """Strategy name to its Run (results read from its ``results.json``)."""
        return {row["strategy"]: self._run(row["run_dir"]) for row in self.rows}

    @property
    def best(self) -> Run:
        return self.runs[self.best_strategy]

    @property
    def final(self) -> Run | None:
        """The selected strategy trained again (``then_train_epochs``), if it was."""
        then = self.comparison.get("then_trained")
        return self._run(then) if then else None

    @property
    def table(self) -> str:
        """The comparison as the Markdown table ``comparison.md`` holds."""
        from inat_finetune.experiments.comparison import comparison_markdown

        return comparison_markdown(self.comparison)

    def figure(self) -> Figure:
        """Train, validation and test accuracy per strategy, the selected one marked."""
        from inat_finetune.reporting import comparison_figure

        return comparison_figure(self.comparison_dir)

    def _run(self, relative: str) -> Run:
        from inat_finetune.runfiles import read_json

        run_dir = self.comparison_dir / relative
        return Run(run_dir, read_json(run_dir / "results.json"))
