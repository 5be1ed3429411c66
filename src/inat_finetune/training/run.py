"""One fine-tuning run: ``train(config)``.

``train`` is the whole experiment for one configuration: scan and split the data, build the
backbone with a new head, freeze by strategy, fit with the best checkpoint kept by validation
accuracy, test that checkpoint, and write everything to a fresh run directory:

    runs/<timestamp>-<name>/
        config.yaml        the resolved configuration (pass it back with --config)
        split.json         which image is in train / val / test, and what was skipped
        dataset.json       images per class per split, skipped files and why
        metrics.csv        per-epoch train/val loss and accuracy (Lightning's CSVLogger)
        checkpoints/       best.ckpt (by val accuracy) and last.ckpt, self-describing
        results.json       test accuracy of best.ckpt, per-class accuracy, parameter counts, times
        test_predictions.csv  per test image: path, true and predicted class, probabilities
        run.lock           while the run trains: held by its process (runlock), then removed

results.json agrees with best.ckpt: ``best_epoch`` is the epoch best.ckpt holds, the first with
the highest val/acc in metrics.csv, ``best_val_acc`` that value, ``test_acc`` best.ckpt's on the
test split. A resumed run (``run_dir`` given) writes its files only once its model, data and
caches are ready, right before training restarts (see ``resume``).

``train`` reads as the run's phases, each a function named for what it decides, passing state
in small dataclasses (``state``):

    prepare_processes     accelerator, precision, channels-last, the process world, the seed  (setup)
    split_for_run         the data's split (scanned once, by rank 0), its test set guarded    (setup)
    check_before_building the settings that cannot run here (preflight), shards per process  (setup)
    build_model_and_plan  backbone, freezing by strategy or schedule, the recipe's plan
    open_run_directory    new or resumed; its lock; config/split/dataset files of a new run
    build_module          the card; the global batch and the lr scaled to it (decide_batch_and_lr)
    choose_speed_paths    image cache, feature cache, compile, depthwise backward: and why
    build_trainer         checkpoints, callbacks, loggers, the Lightning Trainer             (fitting)
    fit_and_test          the optional lr range test, fit (SIGTERM: a stopped run), test     (fitting)
    collect_results       results.json's keys                                                (fitting)
    write_outputs         predictions, results, figures and report, W&B                      (outputs)

``prepare_processes`` and ``split_for_run`` are also what ``compare`` and ``sweep`` use, so the
split and its guard are made one way for every entry point.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback

from inat_finetune.data.augment import build_recipe_train_transform
from inat_finetune.data.datamodule import FineTuneDataModule, default_num_workers
from inat_finetune.data.folders import DataSplit
from inat_finetune.data.tta import tta_eval_transform
from inat_finetune.errors import UserError
from inat_finetune.models.backbones import get_model
from inat_finetune.models.freezing import FreezeSummary
from inat_finetune.runfiles import new_run_dir
from inat_finetune.runtime.allocator import freed_memory_kept
from inat_finetune.runtime.distributed import World, rank_zero_first, scaled_lr, shared_directory
from inat_finetune.runtime.hardware import resolve_accelerator
from inat_finetune.speed.depthwise_grad import use_fast_depthwise_grad
from inat_finetune.speed.features import cached_features
from inat_finetune.speed.prepared import prepared_images_for
from inat_finetune.tasks.classification import FineTuneModule
from inat_finetune.tasks.optim import plan_from_config
from inat_finetune.training.config import TrainConfig
from inat_finetune.training.fitting import build_trainer, collect_results, fit_and_test
from inat_finetune.training.outputs import write_outputs, write_run_files
from inat_finetune.training.probe_run import PROBE_RECIPE, probe_and_test
from inat_finetune.training.recipes import recipe_card
from inat_finetune.training.runlock import run_lock
from inat_finetune.training.setup import check_before_building, prepare_processes, split_for_run
from inat_finetune.training.state import (
    BatchAndLr,
    ModelAndPlan,
    PreparedRun,
    Processes,
    RunDirectory,
    SpeedPaths,
)

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_dir: Path
    results: dict[str, Any]


def train(
    config: TrainConfig,
    split: DataSplit | None = None,
    progress: bool = True,
    report: bool = True,
    run_dir: Path | None = None,
    ckpt_path: Path | None = None,
    callbacks: list[Callback] | None = None,
    share_features_with: Sequence[str] = (),
    choice_only: bool = False,
) -> RunResult:
    """Run one fine-tuning experiment end to end; see the module docstring for its outputs.

    ``run_dir`` and ``ckpt_path`` continue a stopped run in place (``resume.resume_run``).
    With several processes (``--devices``/``--num-nodes``, torchrun, srun) every process calls
    this; rank 0 alone scans the data, creates the run directory and writes files (see
    ``distributed``). ``callbacks`` are extra Lightning callbacks (the sweep's pruning).
    ``share_features_with`` names the strategies that later runs with this config will train
    (``compare``): a feature pass over the whole backbone stores their frozen prefixes too.
    ``choice_only``: a candidate run of ``--recipe auto``, whose split holds no test image: no
    checkpoint file is written and no test runs; results.json has the validation scores, and
    its test keys are None.
    """
    from inat_finetune.training.preflight import check_machine

    # On the CPU, freed memory is kept for reuse while the run lasts (runtime/allocator.py).
    keep = config.reuse_freed_memory and resolve_accelerator(config.accelerator) == "cpu"
    with freed_memory_kept(keep) as allocator, contextlib.ExitStack() as held:
        if config.data is None and split is None:
            raise UserError("--data is required: the folder that holds the images")
        check_machine(config)  # before planning processes: their errors would hide this one
        processes = prepare_processes(config)
        split = split_for_run(config, progress and processes.zero, given=split)
        check_before_building(config, split, processes.world)
        model = build_model_and_plan(config, split)
        run = open_run_directory(config, split, processes, run_dir, held)
        module, batch = build_module(config, split, model, processes)
        speed = choose_speed_paths(
            config, split, model, module, processes, share_features_with, allocator, progress
        )
        prepared = PreparedRun(config, split, processes, model, run, module, batch, speed)
        log_run_plan(prepared)
        trainer, checkpoint = build_trainer(prepared, callbacks, progress, choice_only)
        if config.recipe == PROBE_RECIPE:
            images = build_datamodule(config, split, model, processes.accelerator)
            fitted = probe_and_test(prepared, trainer, checkpoint, images, progress)
        else:
            fitted = fit_and_test(prepared, trainer, checkpoint, ckpt_path, test=not choice_only)
        if fitted.lr_find_only is not None:
            return RunResult(run_dir=run.path, results={"lr_find": fitted.lr_find_only})
        results = collect_results(prepared, trainer, checkpoint, fitted)
        if fitted.probe is not None:
            results.update(epochs=1, best_epoch=0, linear_probe=fitted.probe)
        if processes.zero:
            probabilities = module.test_report.get("probabilities")  # None: nothing tested
            write_outputs(
                run.path,
                split,
                results,
                probabilities,
                trainer.loggers,
                report,
                log_model=config.wandb_log_model,
            )
        return RunResult(run_dir=run.path, results=results)


def build_model_and_plan(config: TrainConfig, split: DataSplit) -> ModelAndPlan:
    """The backbone with a head for the split's classes, frozen by strategy or stage schedule
    for the first epoch, and the rest of the recipe (tasks/optim.py)."""
    built = get_model(config.backbone, num_classes=len(split.classes), weights=config.weights)
    preprocessing = built.preprocessing.at_size(config.img_size)
    plan, summary = plan_from_config(config, built.model, built.head, split)
    return ModelAndPlan(
        built=built,
        preprocessing=preprocessing,
        test_preprocessing=preprocessing.at_size(config.test_img_size),
        plan=plan,
        summary=summary,
    )


def open_run_directory(
    config: TrainConfig,
    split: DataSplit,
    processes: Processes,
    run_dir: Path | None,
    held: contextlib.ExitStack,
) -> RunDirectory:
    """A new run directory (rank 0 creates it; every rank gets its path), or the one resumed.

    Rank 0 holds its lock until ``held`` closes and writes a new run's config, split and
    dataset files now; a resumed run's are rewritten only right before fit (``fit_and_test``).
    """
    resuming = run_dir is not None
    if run_dir is None:
        run_dir = shared_directory(
            lambda: new_run_dir(
                config.output, config.run_name or f"{config.backbone}-{config.strategy}"
            ),
            processes.world.processes,
        )
    if processes.zero:
        held.enter_context(run_lock(run_dir))  # resume_run holds it already: re-entrant
        if not resuming:
            write_run_files(run_dir, config, split)
    return RunDirectory(path=run_dir, resuming=resuming)


def model_card(
    config: TrainConfig, split: DataSplit, built: Any, preprocessing: Any, summary: FreezeSummary
) -> dict[str, Any]:
    card = {
        "backbone": config.backbone,
        "source_weights": built.weights,
        "class_names": split.classes,
        "head": built.head,
        "preprocessing": preprocessing.to_dict(),
        "strategy": config.strategy,
        "freeze_percent": config.freeze_percent,
        "frozen_bn": config.frozen_bn,
        "trainable_params": summary.trainable_params,
        "total_params": summary.total_params,
    }
    if built.members is not None:  # a feature ensemble: which members, normalised how
        card["members"] = built.members
    return card


def decide_batch_and_lr(config: TrainConfig, world: World) -> BatchAndLr:
    """The global batch (``--batch-size`` on each of the world's processes) and the lr for it."""
    global_batch = config.batch_size * world.processes
    return BatchAndLr(global_batch, scaled_lr(config.lr, global_batch, config.scale_lr))


def build_module(
    config: TrainConfig, split: DataSplit, model: ModelAndPlan, processes: Processes
) -> tuple[FineTuneModule, BatchAndLr]:
    """The Lightning module: the model, its card, and the lr scaled to the global batch."""
    # The card's preprocessing is what evaluate/predict/export apply: the test-time one.
    card = model_card(config, split, model.built, model.test_preprocessing, model.summary)
    card.update(recipe_card(config, model.plan, model.preprocessing))
    batch = decide_batch_and_lr(config, processes.world)
    module = FineTuneModule(
        model.built.model,
        card,
        lr=batch.lr,
        optimizer=config.optimizer,
        weight_decay=config.weight_decay,
        frozen_bn=config.frozen_bn,
        channels_last=processes.channels_last,
        plan=model.plan,
    )
    return module, batch


def build_datamodule(
    config: TrainConfig,
    split: DataSplit,
    model: ModelAndPlan,
    accelerator: str,
    image_store: Any = None,
) -> FineTuneDataModule:
    """Images for every split: decoded from the files, or read from ``image_store``."""
    workers = config.num_workers
    if workers is None:
        workers = default_num_workers(accelerator, prepared=image_store is not None)
    return FineTuneDataModule(
        split,
        model.preprocessing,
        config.batch_size,
        workers,
        config.augment,
        config.seed,
        image_store=image_store,
        train_transform=build_recipe_train_transform(
            model.preprocessing, config.augmentation, config.random_erasing, normalise=False
        )
        if config.augment
        else None,
        eval_preprocessing=model.test_preprocessing,
        test_transform=tta_eval_transform(model.test_preprocessing, config.tta, normalise=False),
        augment_on=config.augment_on,
        policy=config.augmentation,
        random_erasing=config.random_erasing,
    )


def choose_speed_paths(
    config: TrainConfig,
    split: DataSplit,
    model: ModelAndPlan,
    module: FineTuneModule,
    processes: Processes,
    share_features_with: Sequence[str],
    allocator: str,
    progress: bool,
) -> SpeedPaths:
    """Decide which faster paths this run takes; build or open the caches they need.

    Caches: rank 0 builds, the other ranks then read what it wrote. The feature cache comes
    first, on images decoded from the files: when it is used (``cached_features`` decides:
    frozen backbone or frozen prefix, and --feature-cache), the images are needed for that one
    pass only, and preparing them first would decode them once more (the cached images are bit
    for bit the decoded ones, so the features are the same either way). In a comparison the
    runs after this one may train on images: then they are prepared first and the feature pass
    reads them, so that no photo is decoded twice (as fast for this run). Compiling applies to
    a model that trains on images; the fast depthwise backward to one on the CPU, not compiled.
    """
    show = progress and processes.zero
    image_store, image_cache = None, "off"

    def prepare_images() -> tuple[Any, str]:
        with rank_zero_first():
            return prepared_images_for(
                split, model.preprocessing, config.image_cache, config.cache_dir, show
            )

    if share_features_with:
        image_store, image_cache = prepare_images()
    with rank_zero_first():
        cached = cached_features(
            config,
            module,
            model.built.head,
            build_datamodule(config, split, model, processes.accelerator, image_store),
            processes.accelerator,
            processes.precision,
            show,
            also_for=share_features_with,
        )
    if cached.datamodule is not None:
        datamodule, module.feature_tail = cached.datamodule, cached.tail
        module.feature_prefix = cached.prefix
        # Unless this run's feature pass read the images it prepared for the runs after it.
        if config.image_cache and (image_store is None or not cached.computed):
            image_cache = "not needed (features cached)"
    else:
        if image_store is None:
            image_store, image_cache = prepare_images()
        datamodule = build_datamodule(config, split, model, processes.accelerator, image_store)
    compiled = config.compile and cached.datamodule is None
    if compiled:
        module.model.compile()  # in place: the state dict keeps its names, checkpoints stay usable
    return SpeedPaths(
        datamodule=datamodule,
        image_cache=image_cache,
        feature_cache=cached.summary,
        compile=compiled,
        depthwise_grad=choose_depthwise_grad(
            config, module, processes, bool(cached.tail), compiled
        ),
        allocator=allocator,
    )


def choose_depthwise_grad(
    config: TrainConfig,
    module: FineTuneModule,
    processes: Processes,
    trains_tail_only: bool,
    compiled: bool,
) -> str:
    """The fast depthwise backward (--fast-depthwise-grad) on the CPU, unless only a feature
    tail trains or the model is compiled: torch.compile traces the plain convolution and makes
    its own backward."""
    if processes.accelerator != "cpu" or not config.fast_depthwise_grad:
        return "native"
    if trains_tail_only or compiled:
        return "native"
    switched = use_fast_depthwise_grad(module.model)
    return f"fast ({switched} layers)" if switched else "native (no depthwise layers)"


def log_run_plan(prepared: PreparedRun) -> None:
    """One line of what this run does (two with several processes or a scaled lr)."""
    config, world, batch = prepared.config, prepared.processes.world, prepared.batch
    if prepared.processes.zero and (world.processes > 1 or config.scale_lr != "none"):
        log.info(
            "%d process(es) (%d device(s) x %d node(s)) | global batch %d = batch size %d x %d"
            " | lr %.3g (%s scaling from %.3g)",
            world.processes,
            world.per_node,
            world.num_nodes,
            batch.global_batch,
            config.batch_size,
            world.processes,
            batch.lr,
            config.scale_lr,
            config.lr,
        )
    split, speed, processes = prepared.split, prepared.speed, prepared.processes
    log.info(
        "%s | %s | accelerator=%s precision=%s channels_last=%s workers=%d "
        "image_cache=%s feature_cache=%s compile=%s depthwise_grad=%s allocator=%s "
        "augmentation=%s | run: %s",
        prepared.model.summary.describe(),
        f"{sum(map(len, split.train.values()))}/{sum(map(len, split.val.values()))}/"
        f"{sum(map(len, split.test.values()))} train/val/test images",
        processes.accelerator,
        processes.precision,
        processes.channels_last,
        speed.datamodule.num_workers,
        speed.image_cache,
        speed.feature_cache,
        speed.compile,
        speed.depthwise_grad,
        speed.allocator,
        speed.augmentation,
        prepared.run.path,
    )
