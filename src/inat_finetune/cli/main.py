"""The ``inat-finetune`` command line."""

from __future__ import annotations

import errno
import json
import logging
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from inat_finetune.errors import (
    NO_SPACE,
    UserError,
    describe_write_failure,
    one_line,
    write_failure,
)
from inat_finetune.runfiles import check_output_dir, check_output_file

# --help, usage errors and Ctrl+C: Typer reports these itself. (Typer >= 0.20 vendors its own
# Click, whose exceptions derive from TyperException; older Typer raises Click's.)
_TYPER_EXITS = (
    typer.Exit,
    typer.Abort,
    getattr(typer, "TyperException", typer.Exit),
    click.exceptions.Exit,
    click.ClickException,
    click.Abort,
)


class _Commands(typer.core.TyperGroup):
    """Runs every command so that no error reaches the user as a raw traceback.

    A UserError becomes one line (exit 2), and so does a full disk or a read-only one wherever
    it happens (naming the file when the system says which). Anything unexpected becomes one line naming the
    exception and a hint (exit 1); ``--verbose`` shows the full traceback instead.
    """

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except _TYPER_EXITS:
            raise
        except UserError as exc:
            _fail(str(exc))
        except Exception as exc:
            out_of_space = _out_of_space(exc)
            if out_of_space is not None:
                _fail(out_of_space)
            if ctx.params.get("verbose"):
                raise
            console.print(
                f"[bold red]error:[/] unexpected {type(exc).__name__}: {one_line(str(exc))} "
                "(this is a bug or an unhandled case; rerun with -v for the full traceback)",
                highlight=False,
                soft_wrap=True,
                markup=True,
            )
            raise typer.Exit(code=1) from None


def _out_of_space(exc: BaseException) -> str | None:
    """The one-line message for a write that a full or read-only disk refused, else None."""
    failure = write_failure(exc)
    if failure is None or failure.errno not in NO_SPACE | {errno.EROFS}:
        return None  # permission and I/O errors may come from reading: not called writes here
    return describe_write_failure(failure.filename or "a file being written", failure)


app = typer.Typer(
    cls=_Commands,
    add_completion=False,
    no_args_is_help=True,
    help="Fine-tune ImageNet-pretrained CNNs on iNaturalist nature_12K or any folder of classes.",
)


console = Console(stderr=True)


out = Console()


def _setup_logging(verbose: bool) -> None:
    from inat_finetune.runtime.distributed import is_global_zero

    # Under DDP every process runs the command; only rank 0 tells the user what happens.
    quiet = not verbose and not is_global_zero()
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False, show_time=False)],
        force=True,
    )
    # Lightning installs its own INFO handler when imported (GPU available..., tips); import it
    # now so its messages go through ours instead, and only when they matter.
    import lightning.pytorch  # noqa: F401

    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.DEBUG if verbose else logging.WARNING)
        logger.handlers.clear()
        logger.propagate = True


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False,
) -> None:
    _setup_logging(verbose)


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {one_line(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


def _print_results(results: dict, run_dir: Path | None = None) -> None:
    table = Table(title="Results", show_header=False)
    for key in (
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
    ):
        if key in results:
            value = results[key]
            if isinstance(value, float):
                value = f"{100 * value:.2f}%" if key.endswith("acc") else f"{value:.1f}"
            elif isinstance(value, int):
                value = f"{value:,}"
            table.add_row(key, str(value))
    out.print(table)
    per_class = results.get("per_class_test_acc", {})
    if per_class:
        out.print(
            "per-class test accuracy: "
            + ", ".join(f"{k} {percent_or_na(v)}" for k, v in per_class.items())
        )
    if run_dir is not None:
        out.print(f"run directory: {run_dir}")


def percent_or_na(value: float | None) -> str:
    """``12.3%``, or ``n/a`` for an accuracy that was not measured (no images of that class)."""
    return "n/a" if value is None else f"{100 * value:.1f}%"


# Options shared by `train`, `compare` and `demo`. None means "not given", so a value from the
# --config YAML file is not overridden; the defaults live in config.TrainConfig.
def _opt(*names: str, help: str) -> typer.models.OptionInfo:  # noqa: A002 - Typer's name
    # Typer renders help as rich markup, where "[default: 8]" is a style tag and vanishes.
    return typer.Option(*names, help=escape(help))


DataOpt = Annotated[
    str | None, _opt("--data", help="dataset root: nature_12K, train/+val/ or class folders")
]


ConfigOpt = Annotated[
    Path | None, _opt("--config", help="YAML file of options (names as below, with _)")
]


BackboneOpt = Annotated[
    str | None, _opt("--backbone", help="torchvision or timm model name [default: resnet50]")
]


WeightsOpt = Annotated[
    str | None,
    _opt("--weights", help="weights name (IMAGENET1K_V1), file path, or 'none' [default: DEFAULT]"),
]


StrategyOpt = Annotated[
    str | None,
    _opt(
        "--strategy",
        help="freeze_last, freeze_k_percent, freeze_except_bn_and_fc, none [default: freeze_except_bn_and_fc]",
    ),
]


FreezePercentOpt = Annotated[
    float | None,
    _opt(
        "--freeze-percent",
        help="fraction of backbone tensors frozen by freeze_k_percent [default: 0.25]",
    ),
]


FrozenBnOpt = Annotated[
    str | None,
    _opt(
        "--frozen-bn",
        help="frozen BatchNorm layers: eval (keep ImageNet stats) or train (update, as the seed) [default: eval]",
    ),
]


EpochsOpt = Annotated[int | None, _opt("--epochs", help="training epochs [default: 10]")]


BatchSizeOpt = Annotated[
    int | None, _opt("--batch-size", help="images per step on each device [default: 32]")
]


LrOpt = Annotated[float | None, _opt("--lr", help="learning rate [default: 0.001]")]


OptimizerOpt = Annotated[str | None, _opt("--optimizer", help="adam, adamw or sgd [default: adam]")]


WeightDecayOpt = Annotated[float | None, _opt("--weight-decay", help="[default: 0]")]


ImgSizeOpt = Annotated[
    int | None, _opt("--img-size", help="input size in pixels [default: weights preset, 224]")
]


AugmentOpt = Annotated[
    bool | None, _opt("--augment/--no-augment", help="augment the training subset [default: on]")
]


ValFractionOpt = Annotated[
    float | None,
    _opt("--val-fraction", help="share of train/ held out for validation [default: 0.2]"),
]


TestFractionOpt = Annotated[
    float | None,
    _opt("--test-fraction", help="share held out for test, flat folders only [default: 0.2]"),
]


SeedOpt = Annotated[
    int | None,
    _opt("--seed", help="seeds splits, weights init, augmentation, workers [default: 42]"),
]


WorkersOpt = Annotated[
    int | None,
    _opt(
        "--num-workers",
        help="DataLoader workers [default: CPU count, max 8; none when a CPU of at most 4 cores "
        "trains on prepared images]",
    ),
]


AcceleratorOpt = Annotated[
    str | None, _opt("--accelerator", help="auto, cpu, cuda, mps [default: auto]")
]


DevicesOpt = Annotated[
    str | None,
    _opt(
        "--devices",
        help="devices (processes) per machine: auto (all GPUs), 1, 2, ... or 0,1; DDP when more than one [default: auto]",
    ),
]


NumNodesOpt = Annotated[
    int | None,
    _opt("--num-nodes", help="machines, started by torchrun or srun [default: 1]"),
]


ScaleLrOpt = Annotated[
    str | None,
    _opt(
        "--scale-lr",
        help="none, linear or sqrt: scale --lr by global batch (batch size x devices x nodes) / 32 [default: none]",
    ),
]


PrecisionOpt = Annotated[
    str | None, _opt("--precision", help="auto, 32-true, bf16-mixed, 16-mixed [default: auto]")
]


ChannelsLastOpt = Annotated[
    bool | None, _opt("--channels-last/--no-channels-last", help="[default: auto]")
]


ImageCacheOpt = Annotated[
    bool | None,
    _opt(
        "--image-cache/--no-image-cache",
        help="decode and resize each image once into the cache [default: on]",
    ),
]


FeatureCacheOpt = Annotated[
    bool | None,
    _opt(
        "--feature-cache/--no-feature-cache",
        help="train the head on stored features when the backbone is frozen and the training "
        "images are not augmented [default: on]",
    ),
]


CacheDirOpt = Annotated[
    str | None,
    _opt(
        "--cache-dir", help="cache folder [default: $INAT_FINETUNE_CACHE or ~/.cache/inat-finetune]"
    ),
]


CompileOpt = Annotated[
    bool | None, _opt("--compile/--no-compile", help="torch.compile the network [default: off]")
]


WandbOpt = Annotated[
    bool | None,
    _opt(
        "--wandb/--no-wandb",
        help="log to Weights & Biases (WANDB_MODE=offline works) [default: off]",
    ),
]


WandbProjectOpt = Annotated[str | None, _opt("--wandb-project", help="[default: inat-finetune]")]


OutputOpt = Annotated[
    str | None, _opt("--output", help="directory of run directories [default: runs]")
]


RunNameOpt = Annotated[
    str | None, _opt("--run-name", help="run directory name [default: backbone-strategy]")
]


CheckpointStepsOpt = Annotated[
    int | None,
    _opt("--checkpoint-steps", help="also write last.ckpt every N training steps [default: off]"),
]


CheckpointMinutesOpt = Annotated[
    float | None,
    _opt(
        "--checkpoint-minutes",
        help="also write last.ckpt every N minutes of training, 0 for epoch ends only [default: 10]",
    ),
]


ResumeOpt = Annotated[
    Path | None,
    _opt(
        "--resume",
        help="continue the stopped run in RUN_DIR from its last checkpoint, with its config and "
        "split; only --epochs (to extend), --num-workers, --accelerator, --devices, --precision, "
        "--checkpoint-*, the cache options and --compile may change",
    ),
]


# Fine-tuning recipes (issue 6); see docs/recipes.md.
RecipeOpt = Annotated[
    str | None,
    _opt("--recipe", help="preset: seed (the original write-up) or strong; options override it"),
]


TrainFromOpt = Annotated[
    str | None,
    _opt("--train-from", help="train from this stage on (layer3, features.14, all); see errors"),
]


LpEpochsOpt = Annotated[
    int | None,
    _opt("--lp-epochs", help="LP-FT: head-only epochs before --train-from [default: 0]"),
]


UnfreezeScheduleOpt = Annotated[
    str | None,
    _opt("--unfreeze-schedule", help="gradual unfreezing, e.g. 0:head,2:layer4,4:layer3"),
]


BackboneLrScaleOpt = Annotated[
    float | None, _opt("--backbone-lr-scale", help="backbone lr = lr * this [default: 1]")
]


LayerDecayOpt = Annotated[
    float | None,
    _opt("--layer-decay", help="lr * this per stage further from the head [default: 1]"),
]


LrScheduleOpt = Annotated[
    str | None, _opt("--lr-schedule", help="constant, cosine or onecycle [default: constant]")
]


WarmupEpochsOpt = Annotated[
    float | None, _opt("--warmup-epochs", help="linear lr warmup [default: 0]")
]


LabelSmoothingOpt = Annotated[float | None, _opt("--label-smoothing", help="e.g. 0.1 [default: 0]")]


GradClipOpt = Annotated[
    float | None, _opt("--grad-clip-norm", help="clip the gradient norm [default: off]")
]


EarlyStoppingOpt = Annotated[
    int | None,
    _opt("--early-stopping-patience", help="epochs without better val acc [default: off]"),
]


EmaDecayOpt = Annotated[
    float | None,
    _opt("--ema-decay", help="EMA of the weights, validated/tested/saved (0.999) [default: off]"),
]


ClassWeightedOpt = Annotated[
    bool | None,
    _opt("--class-weighted-loss/--no-class-weighted-loss", help="[default: off]"),
]


AugmentationOpt = Annotated[
    str | None,
    _opt("--augmentation", help="seed, trivialaugment or randaugment [default: seed]"),
]


RandomErasingOpt = Annotated[
    float | None, _opt("--random-erasing", help="probability per image [default: 0]")
]


MixupOpt = Annotated[float | None, _opt("--mixup-alpha", help="MixUp (0.2) [default: off]")]


CutmixOpt = Annotated[float | None, _opt("--cutmix-alpha", help="CutMix (1.0) [default: off]")]


TestImgSizeOpt = Annotated[
    int | None,
    _opt("--test-img-size", help="val/test/inference size [default: --img-size]"),
]


TtaOpt = Annotated[
    str | None,
    _opt("--tta", help="test-time augmentation: none, flip, multicrop [default: none]"),
]


LrFindOpt = Annotated[
    bool | None,
    _opt("--lr-find", help="learning-rate range test: plot and suggestion, then stop"),
]


LrFindApplyOpt = Annotated[
    bool | None,
    _opt("--lr-find-apply", help="with --lr-find: train with the suggested lr"),
]


LrFindStepsOpt = Annotated[
    int | None, _opt("--lr-find-steps", help="batches in the range test [default: 100]")
]


def _config_from(options: dict[str, Any]) -> Any:
    from inat_finetune.training.config import load_config

    config = options.pop("config", None)
    loaded = load_config(config, **options)
    check_output_dir(loaded.output, "--output")  # also when it came from the --config file
    return loaded


@app.command()
def train(
    data: DataOpt = None,
    config: ConfigOpt = None,
    backbone: BackboneOpt = None,
    weights: WeightsOpt = None,
    strategy: StrategyOpt = None,
    freeze_percent: FreezePercentOpt = None,
    frozen_bn: FrozenBnOpt = None,
    epochs: EpochsOpt = None,
    batch_size: BatchSizeOpt = None,
    lr: LrOpt = None,
    optimizer: OptimizerOpt = None,
    weight_decay: WeightDecayOpt = None,
    img_size: ImgSizeOpt = None,
    augment: AugmentOpt = None,
    val_fraction: ValFractionOpt = None,
    test_fraction: TestFractionOpt = None,
    seed: SeedOpt = None,
    num_workers: WorkersOpt = None,
    accelerator: AcceleratorOpt = None,
    devices: DevicesOpt = None,
    num_nodes: NumNodesOpt = None,
    scale_lr: ScaleLrOpt = None,
    precision: PrecisionOpt = None,
    channels_last: ChannelsLastOpt = None,
    image_cache: ImageCacheOpt = None,
    feature_cache: FeatureCacheOpt = None,
    cache_dir: CacheDirOpt = None,
    compile: CompileOpt = None,  # noqa: A002 - the config field's name
    wandb: WandbOpt = None,
    wandb_project: WandbProjectOpt = None,
    output: OutputOpt = None,
    run_name: RunNameOpt = None,
    checkpoint_steps: CheckpointStepsOpt = None,
    checkpoint_minutes: CheckpointMinutesOpt = None,
    resume: ResumeOpt = None,
    recipe: RecipeOpt = None,
    train_from: TrainFromOpt = None,
    lp_epochs: LpEpochsOpt = None,
    unfreeze_schedule: UnfreezeScheduleOpt = None,
    backbone_lr_scale: BackboneLrScaleOpt = None,
    layer_decay: LayerDecayOpt = None,
    lr_schedule: LrScheduleOpt = None,
    warmup_epochs: WarmupEpochsOpt = None,
    label_smoothing: LabelSmoothingOpt = None,
    grad_clip_norm: GradClipOpt = None,
    early_stopping_patience: EarlyStoppingOpt = None,
    ema_decay: EmaDecayOpt = None,
    class_weighted_loss: ClassWeightedOpt = None,
    augmentation: AugmentationOpt = None,
    random_erasing: RandomErasingOpt = None,
    mixup_alpha: MixupOpt = None,
    cutmix_alpha: CutmixOpt = None,
    test_img_size: TestImgSizeOpt = None,
    tta: TtaOpt = None,
    lr_find: LrFindOpt = None,
    lr_find_apply: LrFindApplyOpt = None,
    lr_find_steps: LrFindStepsOpt = None,
) -> None:
    """Fine-tune a pretrained backbone, keep the best checkpoint by val accuracy, and test it."""
    options = dict(locals())
    from inat_finetune.runtime.distributed import is_global_zero
    from inat_finetune.training.run import train as run_training

    resume_dir = options.pop("resume")
    try:
        if resume_dir is not None:
            from inat_finetune.training.resume import resume_run

            result = resume_run(resume_dir, options, progress=True)
        else:
            result = run_training(_config_from(options), progress=True)
    except UserError as exc:
        _fail(str(exc))
        return
    if not is_global_zero():
        return
    found = result.results.get("lr_find")
    if found is not None:
        suggestion = found["suggestion"]
        out.print(
            "learning-rate range test: suggested lr "
            + ("none (the loss never fell)" if suggestion is None else f"{suggestion:.3g}")
            + f"; plot: {result.run_dir / 'figures' / 'lr_find.png'}",
            soft_wrap=True,
            highlight=False,
        )
        if not found["applied"]:
            out.print("not applied: pass --lr <value>, or --lr-find-apply to train with it")
            return
    _print_results(result.results, result.run_dir)


def _print_comparison(result: Any) -> None:
    from inat_finetune.experiments.comparison import comparison_markdown

    out.print(comparison_markdown(result.comparison), markup=False, highlight=False, soft_wrap=True)
    out.print(f"comparison directory: {result.comparison_dir}")
    out.print(f"report: {result.comparison_dir / 'report.html'}")


@app.command()
def compare(
    data: DataOpt = None,
    strategies: Annotated[
        str, typer.Option(help="comma-separated strategies to compare")
    ] = "freeze_last,freeze_k_percent,freeze_except_bn_and_fc",
    then_train_epochs: Annotated[
        int | None, typer.Option(help="then train the winner (by val accuracy) this many epochs")
    ] = None,
    config: ConfigOpt = None,
    backbone: BackboneOpt = None,
    weights: WeightsOpt = None,
    freeze_percent: FreezePercentOpt = None,
    frozen_bn: FrozenBnOpt = None,
    epochs: EpochsOpt = None,
    batch_size: BatchSizeOpt = None,
    lr: LrOpt = None,
    optimizer: OptimizerOpt = None,
    weight_decay: WeightDecayOpt = None,
    img_size: ImgSizeOpt = None,
    augment: AugmentOpt = None,
    seed: SeedOpt = None,
    num_workers: WorkersOpt = None,
    accelerator: AcceleratorOpt = None,
    devices: DevicesOpt = None,
    num_nodes: NumNodesOpt = None,
    scale_lr: ScaleLrOpt = None,
    precision: PrecisionOpt = None,
    image_cache: ImageCacheOpt = None,
    feature_cache: FeatureCacheOpt = None,
    cache_dir: CacheDirOpt = None,
    compile: CompileOpt = None,  # noqa: A002 - the config field's name
    wandb: WandbOpt = None,
    wandb_project: WandbProjectOpt = None,
    output: OutputOpt = None,
) -> None:
    """Train several freezing strategies on one split, pick the best by val accuracy, report."""
    options = dict(locals())
    from inat_finetune.experiments.comparison import compare as run_comparison
    from inat_finetune.experiments.comparison import parse_strategies

    chosen, longer = options.pop("strategies"), options.pop("then_train_epochs")
    from inat_finetune.runtime.distributed import is_global_zero

    try:
        result = run_comparison(_config_from(options), parse_strategies(chosen), longer)
    except UserError as exc:
        _fail(str(exc))
        return
    if is_global_zero():
        _print_comparison(result)


@app.command()
def prepare(
    data: Annotated[str, typer.Option("--data", help="dataset root, as passed to train")],
    size: Annotated[
        int,
        typer.Option(
            "--size",
            help="shorter side in pixels: the resize size of the input size you train with "
            "(256 for 224-px inputs, i.e. img_size x 256/224)",
        ),
    ] = 256,
    interpolation: Annotated[
        str, typer.Option(help="bilinear (torchvision presets) or bicubic (some timm presets)")
    ] = "bilinear",
    cache_dir: CacheDirOpt = None,
) -> None:
    """Decode and resize every image once into the cache that train and compare read from."""
    from rich.filesize import decimal

    from inat_finetune.speed.prepared import prepare as run_prepare

    try:
        result = run_prepare(data, size, interpolation, cache_dir)
    except UserError as exc:
        _fail(str(exc))
        return
    damaged = f" ({result.damaged:,} of them damaged in the cache)" if result.damaged else ""
    out.print(
        f"{result.images:,} images: {result.prepared:,} prepared{damaged}, "
        f"{result.images - result.prepared:,} already there; {decimal(result.data_bytes)} in "
        f"{result.directory}",
        soft_wrap=True,
        highlight=False,
    )


@app.command()
def evaluate(
    run_or_ckpt: Annotated[Path, typer.Argument(help="a run directory or a .ckpt file")],
    data: DataOpt = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    num_workers: Annotated[int | None, typer.Option(min=0)] = None,
    accelerator: Annotated[str, typer.Option()] = "auto",
    precision: Annotated[str, typer.Option()] = "auto",
    save: Annotated[
        Path | None, typer.Option("--save", help="write the result as JSON here")
    ] = None,
    tta: Annotated[
        bool, typer.Option("--tta", help="average with the mirrored image (2x the compute)")
    ] = False,
    multi_crop: Annotated[
        bool,
        typer.Option("--multi-crop", help="centre + 4 corner crops, each mirrored (10x)"),
    ] = False,
) -> None:
    """Re-score a saved model on a test set (default: the run's own test split)."""
    from inat_finetune.inference.evaluation import evaluate as run_evaluation
    from inat_finetune.inference.evaluation import save_evaluation

    mode = "multicrop" if multi_crop else "flip" if tta else "none"
    try:
        check_output_file(save, "--save", "evaluation.json")
        result = run_evaluation(
            run_or_ckpt, data, batch_size, num_workers, accelerator, precision, tta=mode
        )
    except UserError as exc:
        _fail(str(exc))
        return
    if save is not None:
        save_evaluation(result, save)
    out.print(
        f"test accuracy: {100 * result['test_acc']:.2f}% on {result['num_test_images']} images"
        + ("" if mode == "none" else f" (test-time augmentation: {mode})")
    )
    out.print(json.dumps(result["per_class_test_acc"], indent=2))


@app.command("models")
def list_backbones(
    all_models: Annotated[
        bool, typer.Option("--all", help="list every torchvision and timm model")
    ] = False,
) -> None:
    """List backbones and whether their ImageNet weights are available on this machine."""
    from inat_finetune.models.backbones import (
        FEATURED_BACKBONES,
        list_models,
        resolve_source,
        weights_availability,
    )

    if all_models:
        for name in list_models(include_all=True):
            out.print(name)
        return
    table = Table(title="Backbones (any torchvision or timm classifier name also works)")
    for column in ("backbone", "source", "default weights", "weights here"):
        table.add_column(column)
    for name in list_models():
        source, _ = resolve_source(name)
        table.add_row(name, source, FEATURED_BACKBONES[name], weights_availability(name))
    out.print(table)


@app.command()
def demo(
    data: Annotated[
        str | None, _opt("--data", help="local data instead of the nature_12K subset download")
    ] = None,
    backbone: Annotated[
        str, _opt("--backbone", help="torchvision or timm model name")
    ] = "resnet50",
    weights: WeightsOpt = None,
    epochs: Annotated[int, _opt("--epochs", help="training epochs per strategy")] = 3,
    img_size: Annotated[int, _opt("--img-size", help="input size in pixels")] = 160,
    subset: Annotated[
        int, _opt("--subset", help="nature_12K training images per class to fetch")
    ] = 40,
    test_subset: Annotated[
        int, _opt("--test-subset", help="nature_12K test images per class")
    ] = 10,
    dest: Annotated[Path, _opt("--dest", help="where the nature_12K subset goes")] = Path("data"),
    url: Annotated[str | None, _opt("--url", help="nature_12K zip URL (a mirror)")] = None,
    output: Annotated[str, _opt("--output", help="directory of run directories")] = "runs",
) -> None:
    """The main job in one command: data, the three-strategy comparison, and the report.

    Without --data it fetches a small subset of nature_12K (HTTP range reads, not the 3.6 GB
    archive); with --data it runs on local images.
    """
    from inat_finetune.experiments.comparison import SEED_STRATEGIES
    from inat_finetune.experiments.comparison import compare as run_comparison
    from inat_finetune.training.config import load_config

    try:
        check_output_dir(output, "--output")
        if data is None:
            check_output_dir(dest, "--dest")
            from inat_finetune.data.download import NATURE12K_URL, download_subset

            try:
                data = str(download_subset(url or NATURE12K_URL, dest, subset, test_subset).root)
            except UserError as exc:
                raise UserError(
                    f"{exc}. To try the tool offline, pass local images: "
                    "--data PATH (make demo DATA=PATH BACKBONE=mobilenet_v2)"
                ) from None
        cfg = load_config(
            None,
            data=data,
            backbone=backbone,
            weights=weights,
            epochs=epochs,
            img_size=img_size,
            output=output,
            run_name="demo",
        )
        result = run_comparison(cfg, SEED_STRATEGIES)
    except UserError as exc:
        _fail(str(exc))
        return
    _print_comparison(result)


@app.command()
def download(
    dest: Annotated[Path, typer.Option("--dest", help="folder to put the dataset in")] = Path(
        "data"
    ),
    url: Annotated[
        str | None, typer.Option("--url", help=escape("zip archive [default: nature_12K's URL]"))
    ] = None,
    subset: Annotated[
        int | None,
        typer.Option("--subset", help="fetch only N training images per class (HTTP Range reads)"),
    ] = None,
    test_subset: Annotated[
        int | None,
        typer.Option(
            "--test-subset", help=escape("test images per class with --subset [default: N/5]")
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="seeds which images --subset picks")] = 42,
) -> None:
    """Download nature_12K (resumable, verified) and extract it; --subset for a quick start."""
    from rich.filesize import decimal

    from inat_finetune.data.download import NATURE12K_URL, download_dataset, download_subset

    try:
        check_output_dir(dest, "--dest")
        if subset is None:
            if test_subset is not None:
                raise UserError("--test-subset needs --subset N (the training images per class)")
            result = download_dataset(url or NATURE12K_URL, dest)
        else:
            test_n = test_subset if test_subset is not None else max(1, round(subset / 5))
            result = download_subset(url or NATURE12K_URL, dest, subset, test_n, seed)
    except UserError as exc:
        _fail(str(exc))
        return
    if result.already_complete:
        message = f"already complete: {result.root} ({result.files:,} files); nothing fetched"
    else:
        message = (
            f"ready: {result.root} ({result.files:,} files, {decimal(result.bytes_fetched)} "
            f"fetched, {result.skipped_members} junk entries skipped)"
        )
    # soft_wrap: paths are printed whole so they can be copied
    out.print(message, soft_wrap=True, highlight=False)
    out.print(f"next: inat-finetune check-data {result.root}", soft_wrap=True, highlight=False)


@app.command("check-data")
def check_data_command(
    path: Annotated[Path, typer.Argument(help="dataset root, as passed to --data")],
) -> None:
    """Count images per class and split; find unreadable files, duplicates, missing classes."""
    from inat_finetune.data.datacheck import check_data, render

    try:
        report = check_data(path, progress=True)
    except UserError as exc:
        _fail(str(exc))
        return
    render(report, out)
    if not report.ok:
        raise typer.Exit(code=1)


@app.command()
def show(
    data: Annotated[
        str,
        typer.Option("--data", help="dataset root, or a run directory (its split.json is used)"),
    ],
    split: Annotated[str, typer.Option("--split", help="train, val or test")] = "train",
    class_name: Annotated[
        str | None, typer.Option("--class", help=escape("class to show [default: a random one]"))
    ] = None,
    n: Annotated[int, typer.Option("-n", min=1, help="number of images")] = 10,
    seed: Annotated[int, typer.Option(help="seeds the class and image choice")] = 0,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", help=escape("PNG file to write [default: samples-<split>-<class>.png]")
        ),
    ] = None,
) -> None:
    """Save a row of random images of one class, titled with the class (seeded)."""
    from inat_finetune.reporting.plots import choose_class, plot_class_samples, resolve_split

    try:
        check_output_file(output, "--output", f"samples-{split}.png")
        data_split = resolve_split(data)
        name = choose_class(data_split.classes, class_name, seed)
        target = output or Path(f"samples-{split}-{name}.png")
        path = plot_class_samples(data_split, split, name, n, seed, out=target)
    except UserError as exc:
        _fail(str(exc))
        return
    out.print(f"wrote {path}")


@app.command("report")
def report_command(
    run_dir: Annotated[Path, typer.Argument(help="a run directory or a comparison directory")],
) -> None:
    """Write RUN_DIR/report.html: one self-contained page with the config, data, and results."""
    from inat_finetune.reporting.report import write_report

    try:
        path = write_report(run_dir)
    except UserError as exc:
        _fail(str(exc))
        return
    out.print(f"wrote {path}")


@app.command()
def predict(
    run_or_ckpt: Annotated[Path, typer.Argument(help="a run directory or a .ckpt file")],
    paths: Annotated[
        list[Path], typer.Argument(help="image files and folders (searched recursively)")
    ],
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="classes listed per image")] = 5,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="also write the predictions as JSON here")
    ] = None,
    csv_out: Annotated[
        Path | None, typer.Option("--csv", help="also write the predictions as CSV here")
    ] = None,
    tta: Annotated[
        bool, typer.Option("--tta", help="average with the mirrored image (2x the compute)")
    ] = False,
    batch_size: Annotated[int, typer.Option(min=1, help="images per forward pass")] = 32,
) -> None:
    """Classify photos: top-k classes with probabilities for every image found."""
    from inat_finetune.inference.predict import predict_paths, write_csv, write_json

    try:
        check_output_file(json_out, "--json", "predictions.json")
        check_output_file(csv_out, "--csv", "predictions.csv")
        report = predict_paths(run_or_ckpt, paths, top_k=top_k, batch_size=batch_size, tta=tta)
    except UserError as exc:
        _fail(str(exc))
        return
    table = Table(title=f"Predictions ({len(report.predictions)} images)")
    table.add_column("path", overflow="fold")
    table.add_column("top class")
    table.add_column("probability", justify="right")
    if top_k > 1:
        table.add_column("next")
    for p in report.predictions:
        row = [p.path, p.top[0][0], f"{100 * p.top[0][1]:.1f}%"]
        if top_k > 1:
            row.append(", ".join(f"{c} {100 * prob:.1f}%" for c, prob in p.top[1:]))
        table.add_row(*row)
    out.print(table)
    if report.skipped:
        skipped = Table(title=f"Skipped ({len(report.skipped)} files)")
        skipped.add_column("path", overflow="fold")
        skipped.add_column("reason")
        for s in report.skipped:
            skipped.add_row(s.path, s.reason)
        out.print(skipped)
    for target, writer in ((json_out, write_json), (csv_out, write_csv)):
        if target is not None:
            out.print(f"wrote {writer(report, target)}")


@app.command("export")
def export_model(
    run_or_ckpt: Annotated[Path, typer.Argument(help="a run directory or a .ckpt file")],
    format: Annotated[str, typer.Option("--format", help="onnx or torchscript")] = "onnx",
    output: Annotated[
        Path | None,
        typer.Option("--output", help=escape("folder to write to [default: <run>/export]")),
    ] = None,
) -> None:
    """Export for other runtimes (dynamic batch), with preprocessing.json beside the model."""
    from inat_finetune.inference.export import export

    try:
        check_output_dir(output, "--output")
        result = export(run_or_ckpt, format=format, out_dir=output)
    except UserError as exc:
        _fail(str(exc))
        return
    out.print(f"wrote {result.model_path}", soft_wrap=True)
    out.print(f"wrote {result.preprocessing_path}", soft_wrap=True)
    out.print(f"checked against PyTorch: max abs difference on logits {result.max_abs_diff:.2e}")


@app.command()
def serve(
    run_or_ckpt: Annotated[Path, typer.Argument(help="a run directory or a .ckpt file")],
    host: Annotated[
        str, typer.Option(help="address to bind; anything but loopback exposes the model")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (0: any free port)")] = 7860,
    max_upload_mb: Annotated[
        float, typer.Option("--max-upload-mb", min=0.001, help="largest upload accepted")
    ] = 10.0,
    max_megapixels: Annotated[
        float, typer.Option("--max-megapixels", min=0.001, help="largest image accepted")
    ] = 40.0,
) -> None:
    """A web page to try the model on a photo (upload or drop), and a JSON API at /api/predict."""
    from inat_finetune.inference.serve import bind, create_app, is_loopback, run_server

    try:
        # Bound before the checkpoint loads and before "serving on" is printed: an invalid or
        # busy port is one line at once.
        sock = bind(host, port)
    except UserError as exc:
        _fail(str(exc))
        return
    try:
        web_app = create_app(run_or_ckpt, max_upload_mb, max_megapixels)
    except UserError as exc:
        sock.close()
        _fail(str(exc))
        return
    if not is_loopback(host):
        console.print(
            f"[yellow]warning:[/] --host {host} is not loopback: anyone who can reach this "
            "machine can use the model"
        )
    out.print(f"serving on http://{host}:{sock.getsockname()[1]}/ (Ctrl+C to stop)")
    run_server(web_app, sock)


@app.command()
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
        str | None, _opt("--output", help="where sweep-<study>/ goes [default: base output]")
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
    from inat_finetune.experiments.sweep import export_wandb as write_wandb
    from inat_finetune.experiments.sweep import run_sweep

    try:
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
    except UserError as exc:
        _fail(str(exc))
        return
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
