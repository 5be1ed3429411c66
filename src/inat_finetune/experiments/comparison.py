"""Compare freezing strategies (or recipes) on one split, pick the best by validation accuracy.

This is the original write-up's Steps 6 and 7 as one call. Every strategy sees the same split
and the same seed, so the only difference between the runs is what trains. The winner is chosen
on validation accuracy only: choosing on test accuracy would make the reported test accuracy
an optimistic estimate.

    runs/<timestamp>-compare/
        comparison.json   rows (one per strategy), best_strategy, selected_by, then_trained
        comparison.md     the same table for humans
        figures/comparison.png, report.html
        runs/<strategy>/  one ordinary run directory per strategy (and final-<strategy>/)

``--recipes auto,seed,strong`` compares recipes the same way (same split, same test set, one
table): ``compared`` is then ``recipe``, each row's ``strategy`` is the recipe's name (the key
every reader of comparison.json labels rows by) and ``trained_strategy`` what that run trained;
``auto`` runs ``experiments/auto.py``'s choice and reports the run of its winner.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inat_finetune.data.folders import DataSplit
from inat_finetune.errors import UserError
from inat_finetune.experiments.auto import train_or_choose
from inat_finetune.models.freezing import STRATEGIES
from inat_finetune.runfiles import new_run_dir, write_json_atomic, write_text_atomic
from inat_finetune.runtime.distributed import broadcast_from_zero, shared_directory
from inat_finetune.training.config import TrainConfig
from inat_finetune.training.outputs import write_figures_and_report
from inat_finetune.training.recipe_configs import with_recipe
from inat_finetune.training.recipes import AUTO, RECIPES
from inat_finetune.training.run import train
from inat_finetune.training.setup import prepare_processes, split_for_run

log = logging.getLogger(__name__)


SEED_STRATEGIES = ("freeze_last", "freeze_k_percent", "freeze_except_bn_and_fc")


SELECTED_BY = "val_acc"


@dataclass
class ComparisonResult:
    comparison_dir: Path
    comparison: dict[str, Any]


def parse_names(text: str, known: Sequence[str], option: str, kind: str) -> list[str]:
    """A comma-separated list of known names, each once; else one line naming ``option``."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise UserError(
            f"{option} {text}: unknown {unknown or 'empty list'}; use a comma-separated list "
            f"of {', '.join(known)}"
        )
    if len(set(names)) != len(names):
        raise UserError(f"{option} {text}: a {kind} is listed twice")
    return names


def parse_strategies(text: str) -> list[str]:
    """``--strategies freeze_last,none``: known strategy names, each once."""
    return parse_names(text, STRATEGIES, "--strategies", "strategy")


def parse_recipes(text: str) -> list[str]:
    """``--recipes auto,seed,strong``: known recipe names, each once."""
    return parse_names(text, [AUTO, *RECIPES], "--recipes", "recipe")


def select_best(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Highest validation accuracy; ties go to the run with fewer trainable parameters."""
    return max(rows, key=lambda row: (row[SELECTED_BY], -row["trainable_params"]))


def comparison_markdown(comparison: dict[str, Any]) -> str:
    compared = comparison.get("compared", "strategy")
    lines = [
        f"| {compared} | train acc | val acc | test acc | trainable params | wall time (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in comparison["rows"]:
        mark = " **(selected)**" if row["strategy"] == comparison["best_strategy"] else ""
        lines.append(
            f"| {row['strategy']}{mark} | {100 * row['train_acc']:.2f}% | "
            f"{100 * row['val_acc']:.2f}% | {100 * row['test_acc']:.2f}% | "
            f"{row['trainable_params']:,} | {row['wall_time_s']:.1f} |"
        )
    lines.append("")
    lines.append(f"Selected by validation accuracy: **{comparison['best_strategy']}**.")
    if compared == "recipe":
        lines.append(
            "Each recipe's val acc is on the shared validation split, except auto's and the "
            "refit's, which train on it: their val acc is the refit's in-sample score."
        )
    final = comparison.get("final")
    if final:
        lines.append(
            f"Then trained for {final['epochs']} epochs: val {100 * final['val_acc']:.2f}%, "
            f"test {100 * final['test_acc']:.2f}%."
        )
    return "\n".join(lines) + "\n"


def _row(strategy: str, run_dir: Path, base: Path, results: dict[str, Any], wall: float) -> dict:
    return {
        "strategy": strategy,
        "run_dir": run_dir.relative_to(base).as_posix(),
        "train_acc": results["final_train_acc"],
        "val_acc": results["best_val_acc"],
        "test_acc": results["test_acc"],
        "trainable_params": results["trainable_params"],
        "total_params": results["total_params"],
        "wall_time_s": round(wall, 2),
    }


def compare(
    config: TrainConfig,
    strategies: list[str] | tuple[str, ...] = SEED_STRATEGIES,
    then_train_epochs: int | None = None,
    progress: bool = True,
    report: bool = True,
    recipes: Sequence[str] | None = None,
) -> ComparisonResult:
    """Train each strategy (or each of ``recipes``) with ``config`` on one shared split; see the
    module docstring."""
    if config.data is None:
        raise UserError("--data is required: the folder that holds the images")
    if then_train_epochs is not None and then_train_epochs < 1:
        raise UserError(f"--then-train-epochs {then_train_epochs}: must be at least 1")
    if recipes and then_train_epochs:
        raise UserError("--then-train-epochs trains a strategy longer; drop it with --recipes")
    # Under DDP every process runs this loop; rank 0 alone scans and writes (see distributed).
    processes = prepare_processes(config)
    split = split_for_run(config, progress and processes.zero)
    comparison_dir = shared_directory(
        lambda: new_run_dir(config.output, config.run_name or "compare"),
        processes.world.processes,
    )
    if recipes:
        rows = _train_each_recipe(config, recipes, split, comparison_dir, progress, report)
    else:
        rows = _train_each_strategy(config, strategies, split, comparison_dir, progress, report)
    best = broadcast_from_zero(lambda: select_best(rows))
    comparison: dict[str, Any] = {
        "compared": "recipe" if recipes else "strategy",
        "rows": rows,
        "best_strategy": best["strategy"],
        "selected_by": SELECTED_BY,
        "then_trained": None,
        "final": None,
        "data": split.root,
        "seed": config.seed,
        "epochs": config.epochs,
    }
    if then_train_epochs:
        comparison.update(
            _train_the_best_longer(
                config, best["strategy"], then_train_epochs, split, comparison_dir, progress, report
            )
        )
    if not processes.zero:
        return ComparisonResult(comparison_dir, comparison)
    write_json_atomic(comparison_dir / "comparison.json", comparison)
    write_text_atomic(comparison_dir / "comparison.md", comparison_markdown(comparison))
    if report:
        write_figures_and_report(comparison_dir)
    return ComparisonResult(comparison_dir, comparison)


def _run_config(
    config: TrainConfig, comparison_dir: Path, strategy: str, **changes: Any
) -> TrainConfig:
    """``config`` for one run of the comparison: its strategy, under ``runs/``, one W&B group."""
    update = {
        "strategy": strategy,
        "output": str(comparison_dir / "runs"),
        "run_name": strategy,
        "wandb_group": comparison_dir.name,
        **changes,
    }
    return config.model_copy(update=update)


def _timed_rows(
    kind: str,
    names: Sequence[str],
    comparison_dir: Path,
    run_one: Callable[[str, int], Any],
    name_strategy: bool = False,
) -> list[dict[str, Any]]:
    """One run per name, in order (``run_one(name, index)``), timed; a row of the table each
    (``name_strategy``: the row also says which strategy the run trained)."""
    rows: list[dict[str, Any]] = []
    for index, name in enumerate(names):
        log.info("%s %s (%d of %d)", kind, name, index + 1, len(names))
        started = time.perf_counter()
        result = run_one(name, index)
        elapsed = time.perf_counter() - started
        rows.append(_row(name, result.run_dir, comparison_dir, result.results, elapsed))
        if name_strategy:
            rows[-1]["trained_strategy"] = result.results["strategy"]
    return rows


def _train_each_strategy(
    config: TrainConfig,
    strategies: Sequence[str],
    split: DataSplit,
    comparison_dir: Path,
    progress: bool,
    report: bool,
) -> list[dict[str, Any]]:
    """One run per strategy on the shared split, in order."""

    def run_one(strategy: str, index: int) -> Any:
        # The linear probe's one pass over the backbone also stores what the strategies after
        # it reuse (the output of their frozen prefix).
        return train(
            _run_config(config, comparison_dir, strategy),
            split=split,
            progress=progress,
            report=report,
            share_features_with=strategies[index + 1 :],
        )

    return _timed_rows("Strategy", strategies, comparison_dir, run_one)


def _train_each_recipe(
    config: TrainConfig,
    recipes: Sequence[str],
    split: DataSplit,
    comparison_dir: Path,
    progress: bool,
    report: bool,
) -> list[dict[str, Any]]:
    """One run per recipe on the shared split (``auto``: its choice, then its winner's run)."""

    def run_one(recipe: str, index: int) -> Any:
        run_config = with_recipe(
            config,
            recipe,
            output=str(comparison_dir / "runs"),
            run_name=recipe,
            wandb_group=comparison_dir.name,
        )
        return train_or_choose(run_config, split=split, progress=progress, report=report)

    return _timed_rows("Recipe", recipes, comparison_dir, run_one, name_strategy=True)


def _train_the_best_longer(
    config: TrainConfig,
    strategy: str,
    epochs: int,
    split: DataSplit,
    comparison_dir: Path,
    progress: bool,
    report: bool,
) -> dict[str, Any]:
    """``--then-train-epochs``: the selected strategy trained again for longer; what
    comparison.json says of that run."""
    final_config = _run_config(
        config, comparison_dir, strategy, epochs=epochs, run_name=f"final-{strategy}"
    )
    final = train(final_config, split=split, progress=progress, report=report)
    return {
        "then_trained": final.run_dir.relative_to(comparison_dir).as_posix(),
        "final": {
            "strategy": strategy,
            "epochs": epochs,
            "val_acc": final.results["best_val_acc"],
            "test_acc": final.results["test_acc"],
        },
    }
