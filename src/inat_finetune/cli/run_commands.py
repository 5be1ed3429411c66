"""The commands that train: train, compare, demo and sweep, and how their results print.

`train` and `compare` take their TrainConfig options from ``options.config_options`` (declared
once, on the fields); what only the command line has (--config, --resume, --strategies...) is
declared here. A UserError from anywhere below is reported by the command group (app.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from inat_finetune.cli.app import out
from inat_finetune.cli.options import COMPARE, TRAIN, config_from, config_options, field_option
from inat_finetune.errors import UserError
from inat_finetune.runfiles import check_output_dir, check_output_file
from inat_finetune.runtime.extras import require_extra

RESULT_ROWS = (
    "backbone",
    "strategy",
    "trainable_params",
    "total_params",
    "epochs",
    "best_epoch",
    "final_train_acc",
    "best_val_acc",
    "test_acc",
    "train_time_s",
)


DataOpt = field_option("data")


WeightsOpt = field_option("weights")


ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", help=escape("YAML file of options (names as below, with _)")),
]


ResumeOpt = Annotated[
    Path | None,
    typer.Option(
        "--resume",
        help=escape(
            "continue the stopped run in RUN_DIR from its last checkpoint, with its config and "
            "split; only --epochs (to extend), --num-workers, --accelerator, --devices, "
            "--precision, --checkpoint-*, the cache options and --compile may change"
        ),
    ),
]


def percent_or_na(value: float | None) -> str:
    """``12.3%``, or ``n/a`` for an accuracy that was not measured (no images of that class)."""
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _format_result(key: str, value: Any) -> str:
    if isinstance(value, float):
        return f"{100 * value:.2f}%" if key.endswith("acc") else f"{value:.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _print_results(results: dict, run_dir: Path | None = None) -> None:
    table = Table(title="Results", show_header=False)
    for key in RESULT_ROWS:
        if key in results:
            table.add_row(key, _format_result(key, results[key]))
    out.print(table)
    per_class = results.get("per_class_test_acc", {})
    if per_class:
        out.print(
            "per-class test accuracy: "
            + ", ".join(f"{k} {percent_or_na(v)}" for k, v in per_class.items())
        )
    if run_dir is not None:
        out.print(f"run directory: {run_dir}")


def _print_lr_find(found: dict[str, Any], run_dir: Path) -> bool:
    """Print the range test's suggestion; True when the run went on to train with it."""
    suggestion = found["suggestion"]
    out.print(
        "learning-rate range test: suggested lr "
        + ("none (the loss never fell)" if suggestion is None else f"{suggestion:.3g}")
        + f"; plot: {run_dir / 'figures' / 'lr_find.png'}",
        soft_wrap=True,
        highlight=False,
    )
    if not found["applied"]:
        out.print("not applied: pass --lr <value>, or --lr-find-apply to train with it")
    return bool(found["applied"])


@config_options(TRAIN)
def train(config: ConfigOpt = None, resume: ResumeOpt = None, **options: Any) -> None:
    """Fine-tune a pretrained backbone, keep the best checkpoint by val accuracy, and test it."""
    from inat_finetune.experiments.auto import train_or_choose
    from inat_finetune.runtime.distributed import is_global_zero

    if resume is not None:
        from inat_finetune.training.resume import resume_run

        result = resume_run(resume, {**options, "config": config}, progress=True)
    else:
        result = train_or_choose(config_from(config, options), progress=True)
    if not is_global_zero():
        return
    found = result.results.get("lr_find")
    if found is not None and not _print_lr_find(found, result.run_dir):
        return
    if "auto" in result.results:
        _print_auto(result.results["auto"])
    _print_results(result.results, result.run_dir)


def _print_auto(auto: dict[str, Any]) -> None:
    """The candidates ``--recipe auto`` tried, their rounds and scores, and why the winner won."""
    table = Table(title=f"Recipe chosen by validation ({auto['scored_on']})")
    for column in ("candidate", "rounds", "epochs x folds", "val acc (last round)", "seconds"):
        table.add_column(column)
    for candidate in auto["candidates"]:
        last = candidate["rounds"][-1]
        mark = " (chosen)" if candidate["name"] == auto["winner"] else ""
        table.add_row(
            f"{candidate['name']}{mark}",
            str(len(candidate["rounds"])),
            " + ".join(f"{r['epochs']}x{r['folds']}" for r in candidate["rounds"]),
            percent_or_na(last["val_acc"]),
            f"{candidate['seconds']:.1f}",
        )
    out.print(table)
    refit = auto["refit"]
    out.print(
        f"why: {auto['why']}; budget {auto['budget']} ({auto['halving_stopped']}); "
        + (
            f"refit on {refit['train_images']} labelled images for {refit['epochs']} epochs"
            if refit["on"]
            else f"trained again for {refit['epochs']} epochs (no refit)"
        ),
        soft_wrap=True,
        highlight=False,
    )


def _print_comparison(result: Any) -> None:
    from inat_finetune.experiments.comparison import comparison_markdown

    out.print(comparison_markdown(result.comparison), markup=False, highlight=False, soft_wrap=True)
    out.print(f"comparison directory: {result.comparison_dir}")
    out.print(f"report: {result.comparison_dir / 'report.html'}")


@config_options(COMPARE)
def compare(
    strategies: Annotated[
        str, typer.Option(help="comma-separated strategies to compare")
    ] = "freeze_last,freeze_k_percent,freeze_except_bn_and_fc",
    then_train_epochs: Annotated[
        int | None, typer.Option(help="then train the winner (by val accuracy) this many epochs")
    ] = None,
    recipes: Annotated[
        str | None,
        typer.Option(
            help="comma-separated recipes to compare instead of strategies (auto,seed,strong)"
        ),
    ] = None,
    config: ConfigOpt = None,
    **options: Any,
) -> None:
    """Train several freezing strategies (or --recipes) on one split, pick the best by val
    accuracy, report."""
    from inat_finetune.experiments.comparison import compare as run_comparison
    from inat_finetune.experiments.comparison import parse_recipes, parse_strategies
    from inat_finetune.runtime.distributed import is_global_zero

    cfg = config_from(config, options)  # checked before --strategies, as it always was
    chosen = parse_recipes(recipes) if recipes is not None else None
    result = run_comparison(cfg, parse_strategies(strategies), then_train_epochs, recipes=chosen)
    if is_global_zero():
        _print_comparison(result)


def _demo_data(data: str | None, dest: Path, url: str | None, subset: int, test_subset: int) -> str:
    """``data`` when given, else the nature_12K subset fetched into ``dest``."""
    if data is not None:
        return data
    check_output_dir(dest, "--dest")
    from inat_finetune.data.download import NATURE12K_URL, download_subset

    try:
        return str(download_subset(url or NATURE12K_URL, dest, subset, test_subset).root)
    except UserError as exc:
        raise UserError(
            f"{exc}. To try the tool offline, pass local images: "
            "--data PATH (make demo DATA=PATH BACKBONE=mobilenet_v2)"
        ) from None


# demo's options are its own (a short run: 3 epochs at 160 px), not TrainConfig's defaults.
def demo(
    data: Annotated[
        str | None,
        typer.Option("--data", help="local data instead of the nature_12K subset download"),
    ] = None,
    backbone: Annotated[
        str, typer.Option("--backbone", help="torchvision or timm model name")
    ] = "resnet50",
    weights: WeightsOpt = None,
    epochs: Annotated[int, typer.Option("--epochs", help="training epochs per strategy")] = 3,
    img_size: Annotated[int, typer.Option("--img-size", help="input size in pixels")] = 160,
    subset: Annotated[
        int, typer.Option("--subset", help="nature_12K training images per class to fetch")
    ] = 40,
    test_subset: Annotated[
        int, typer.Option("--test-subset", help="nature_12K test images per class")
    ] = 10,
    dest: Annotated[Path, typer.Option("--dest", help="where the nature_12K subset goes")] = Path(
        "data"
    ),
    url: Annotated[str | None, typer.Option("--url", help="nature_12K zip URL (a mirror)")] = None,
    output: Annotated[str, typer.Option("--output", help="directory of run directories")] = "runs",
) -> None:
    """The main job in one command: data, the three-strategy comparison, and the report.

    Without --data it fetches a small subset of nature_12K (HTTP range reads, not the 3.6 GB
    archive); with --data it runs on local images.
    """
    from inat_finetune.experiments.comparison import SEED_STRATEGIES
    from inat_finetune.experiments.comparison import compare as run_comparison
    from inat_finetune.training.config import load_config

    check_output_dir(output, "--output")
    cfg = load_config(
        None,
        data=_demo_data(data, dest, url, subset, test_subset),
        backbone=backbone,
        weights=weights,
        epochs=epochs,
        img_size=img_size,
        output=output,
        run_name="demo",
    )
    _print_comparison(run_comparison(cfg, SEED_STRATEGIES))


def _print_sweep(result: Any) -> None:
    table = Table(title=f"Sweep {result.study_name} ({len(result.rows)} trials)")
    for column in ("trial", "state", "val acc", "params"):
        table.add_column(column)
    for row in result.rows:
        value = "" if row["value"] is None else f"{100 * row['value']:.2f}%"
        params = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row["params"].items()
        )
        table.add_row(str(row["number"]), row["state"], value, params)
    out.print(table)
    if result.best is not None:
        out.print(f"best config: {result.sweep_dir / 'best_config.yaml'}", soft_wrap=True)
    out.print(f"report: {result.sweep_dir / 'report.html'}", soft_wrap=True)


def sweep(
    config: Annotated[
        Path, typer.Option("--config", help="sweep.yaml: base options and the search space")
    ],
    trials: Annotated[
        int,
        typer.Option(
            "--trials",
            min=0,
            help="trials in the whole study, all workers together; 0: report only",
        ),
    ] = 20,
    storage: Annotated[
        str | None,
        typer.Option(
            "--storage",
            help=escape(
                "Optuna RDB URL shared by workers on many machines [default: sqlite:///<sweep dir>/study.db]"
            ),
        ),
    ] = None,
    study_name: Annotated[
        str | None,
        typer.Option(
            "--study-name", help=escape("study to create or join [default: from sweep.yaml]")
        ),
    ] = None,
    data: DataOpt = None,
    output: Annotated[
        str | None,
        typer.Option("--output", help=escape("where sweep-<study>/ goes [default: base output]")),
    ] = None,
    export_wandb: Annotated[
        Path | None,
        typer.Option(
            "--export-wandb", help="write the search space as a W&B sweep config and stop"
        ),
    ] = None,
    trial_reports: Annotated[
        bool,
        typer.Option(
            "--trial-reports/--no-trial-reports",
            help="figures and report.html in every trial's run directory",
        ),
    ] = True,
) -> None:
    """Search hyper-parameters with Optuna; run the same command on more workers to share it."""
    require_extra("sweep", "sweep")
    from inat_finetune.experiments.sweep import export_wandb as write_wandb
    from inat_finetune.experiments.sweep import run_sweep

    check_output_file(export_wandb, "--export-wandb", "sweep.yaml")
    check_output_dir(output, "--output")
    if export_wandb is not None:
        path = write_wandb(config, export_wandb, data=data, output=output)
        out.print(f"wrote {path}; then: wandb sweep {path} && wandb agent <sweep id>")
        return
    result = run_sweep(
        config,
        trials,
        storage=storage,
        study_name=study_name,
        trial_reports=trial_reports,
        data=data,
        output=output,
    )
    _print_sweep(result)
