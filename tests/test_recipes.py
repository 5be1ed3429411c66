"""Recipes: parameter groups, schedules, resume mid-schedule, EMA, TTA, presets and precedence."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from conftest import make_class_folders
from test_stages import TinyResNet
from torch.utils.data import DataLoader, TensorDataset
from typer.testing import CliRunner

from inat_finetune.cli.main import app
from inat_finetune.data.augment import batch_mixer, dominant_labels
from inat_finetune.data.tta import tta_logits
from inat_finetune.errors import UserError
from inat_finetune.inference.evaluation import evaluate, load_checkpoint
from inat_finetune.inference.predict import Predictor
from inat_finetune.models.stages import UnfreezePlan, backbone_stages, parse_schedule
from inat_finetune.tasks.classification import STAGE_KEY, FineTuneModule
from inat_finetune.tasks.optim import (
    TrainingPlan,
    build_optimizer,
    build_scheduler,
    param_groups,
    swap_ema_for_saving,
)
from inat_finetune.training.config import STAGED, load_config
from inat_finetune.training.run import train

CARD = {
    "class_names": ["a", "b", "c"],
    "preprocessing": {"crop_size": 16, "resize_size": 20, "mean": [0.5] * 3, "std": [0.5] * 3},
}
SCHEDULE = "0:head,1:layer4,2:layer3"


def test_lr_per_parameter_group_and_no_decay_on_norms_and_biases():
    model = TinyResNet()
    stages = backbone_stages(model, "fc")
    groups = param_groups(
        model, stages, lr=1e-3, weight_decay=0.05, backbone_lr_scale=0.1, layer_decay=0.5
    )
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs["head"] == pytest.approx(1e-3) and lrs["head (no decay)"] == pytest.approx(1e-3)
    # stem, layer1..layer4: 0.1 * 0.5 ** (distance to the head - 1)
    for distance, name in enumerate(["layer4", "layer3", "layer2", "layer1", "stem"]):
        assert lrs[name] == pytest.approx(1e-3 * 0.1 * 0.5**distance), name
    for group in groups:
        dims = {p.ndim for p in group["params"]}
        if group["name"].endswith("(no decay)"):
            assert dims == {1} and group["weight_decay"] == 0.0  # BatchNorm weights, biases
        else:
            assert min(dims) >= 2 and group["weight_decay"] == 0.05
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len(list(model.parameters()))


def test_frozen_parameters_in_the_optimizer_are_never_touched():
    """Every parameter is in the optimizer from the start; frozen ones must not move."""
    torch.manual_seed(0)
    model = TinyResNet()
    stages = backbone_stages(model, "fc")
    from inat_finetune.models.stages import apply_start

    apply_start(model, stages, 5)  # head only
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = build_optimizer("adamw", param_groups(model, stages, 0.1, 0.5), 0.1)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(4, 3, 16, 16)).sum().backward()
        optimizer.step()
    for name, param in model.named_parameters():
        moved = not torch.equal(param, before[name])
        assert moved == name.startswith("fc."), name  # weight decay included


def test_warmup_cosine_and_rewarmup_of_a_stage_unfrozen_later():
    model = TinyResNet()
    stages = backbone_stages(model, "fc")
    plan = TrainingPlan(
        stages=stages,
        unfreeze=UnfreezePlan.build(stages, parse_schedule("0:head,2:layer4"), "--x"),
        lr_schedule="cosine",
        warmup_epochs=1,
    )
    optimizer = build_optimizer("adamw", param_groups(model, stages, 1.0, 0.0), 1.0)
    scheduler = build_scheduler(optimizer, plan, total_steps=40, max_epochs=4)  # 10 steps/epoch
    head = next(g for g in optimizer.param_groups if g["name"] == "head")
    layer4 = next(g for g in optimizer.param_groups if g["name"] == "layer4")
    stem = next(g for g in optimizer.param_groups if g["name"] == "stem")
    history = []
    for _ in range(40):
        history.append((head["lr"], layer4["lr"], stem["lr"]))
        optimizer.step()
        scheduler.step()
    assert history[0][0] == pytest.approx(0.1)  # linear warmup over the first epoch
    assert history[9][0] == pytest.approx(1.0)
    assert history[39][0] < 0.01  # cosine down to ~0
    assert all(h[1] == 0 for h in history[:20])  # layer4 frozen for epochs 0-1: lr 0
    assert history[20][1] == pytest.approx(0.1 * history[20][0] / 1.0, rel=1e-6)  # warms again
    assert history[29][1] == pytest.approx(history[29][0])
    assert all(h[2] == 0 for h in history)  # the stem never trains


class StepLog(L.Callback):
    """Loss of every optimizer step, the trainable set and lr per group at each epoch start."""

    def __init__(self, stop_after_epoch: int | None = None, save_to: Path | None = None):
        self.losses: dict[int, float] = {}
        self.trainable: dict[int, set[str]] = {}
        self.lrs: dict[int, dict[str, float]] = {}
        self.stop_after_epoch, self.save_to = stop_after_epoch, save_to

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == 0:
            epoch = trainer.current_epoch
            self.trainable[epoch] = {
                n.split(".")[0] for n, p in module.model.named_parameters() if p.requires_grad
            }
            self.lrs[epoch] = {g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = float(outputs["loss"])

    def on_train_epoch_end(self, trainer, module):
        if trainer.current_epoch == self.stop_after_epoch:
            trainer.save_checkpoint(self.save_to)
            trainer.should_stop = True


def _tiny_fit(callback: StepLog, ckpt_path: Path | None = None, ema: float | None = 0.5):
    torch.manual_seed(0)
    model = TinyResNet()
    stages = backbone_stages(model, "fc")
    plan = TrainingPlan(
        stages=stages,
        unfreeze=UnfreezePlan.build(stages, parse_schedule(SCHEDULE), "--unfreeze-schedule"),
        backbone_lr_scale=0.1,
        lr_schedule="cosine",
        warmup_epochs=1,
        label_smoothing=0.1,
        ema_decay=ema,
    )
    module = FineTuneModule(
        model, CARD, lr=0.05, optimizer="adamw", weight_decay=0.01, frozen_bn="eval", plan=plan
    )
    generator = torch.Generator().manual_seed(1)
    images, labels = torch.randn(12, 3, 16, 16, generator=generator), torch.arange(12) % 3
    loader = DataLoader(TensorDataset(images, labels), batch_size=4)  # fixed order
    trainer = L.Trainer(
        max_epochs=4,
        accelerator="cpu",
        precision="32-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[callback],
    )
    trainer.fit(module, loader, loader, ckpt_path=ckpt_path)
    return module, trainer


def test_gradual_unfreezing_in_training_and_resume_mid_schedule(tmp_path):
    whole = StepLog()
    _tiny_fit(whole)
    assert whole.trainable == {
        0: {"fc"},
        1: {"fc", "layer4"},
        2: {"fc", "layer4", "layer3"},
        3: {"fc", "layer4", "layer3"},
    }
    assert whole.lrs[0]["layer4"] == 0 and whole.lrs[1]["layer4"] > 0 and whole.lrs[1]["stem"] == 0

    ckpt = tmp_path / "mid.ckpt"
    first = StepLog(stop_after_epoch=1, save_to=ckpt)
    _tiny_fit(first)
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert saved[STAGE_KEY] == 4  # trainable from layer4 when it was saved
    assert set(first.losses) == {1, 2, 3, 4, 5, 6}

    resumed = StepLog()
    _tiny_fit(resumed, ckpt_path=ckpt)
    assert min(resumed.losses) == 7  # it carried on from the next step
    # Same parameter groups, same learning rates, same trainable set, same losses as the
    # uninterrupted run from the first step after the checkpoint on.
    assert resumed.lrs[2] == pytest.approx(whole.lrs[2]) and resumed.lrs[3] == whole.lrs[3]
    assert resumed.trainable[2] == whole.trainable[2]
    for step, loss in resumed.losses.items():
        assert loss == pytest.approx(whole.losses[step], rel=1e-5, abs=1e-6), step


def test_ema_weights_are_validated_and_saved_as_the_model():
    torch.manual_seed(0)
    module = FineTuneModule(TinyResNet(), CARD, plan=TrainingPlan(ema_decay=0.9))
    with torch.no_grad():
        for param in module.model.parameters():
            param.add_(1.0)  # the raw weights move; the EMA copy does not
    x = torch.randn(2, 3, 16, 16)
    module.eval()
    assert torch.allclose(module(x), module.ema.module(x))
    assert not torch.allclose(module(x), module.model(x))
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    state = checkpoint["state_dict"]
    assert torch.equal(state["model.fc.weight"], module.ema.module.fc.weight)
    assert torch.equal(state["training_model.fc.weight"], module.model.fc.weight)
    assert not any(k.startswith("ema.") for k in state)

    other = FineTuneModule(TinyResNet(), CARD, plan=TrainingPlan(ema_decay=0.9))
    other.on_load_checkpoint(checkpoint)  # what Lightning calls before loading the state
    other.load_state_dict(checkpoint["state_dict"])
    assert torch.equal(other.model.fc.weight, module.model.fc.weight)
    assert torch.equal(other.ema.module.fc.weight, module.ema.module.fc.weight)


def test_swap_keeps_non_model_keys():
    state = {"model.w": torch.ones(1), "ema.module.w": torch.zeros(1), "other": torch.ones(2)}
    swap_ema_for_saving(state)
    assert set(state) == {"model.w", "training_model.w", "other"}
    assert state["model.w"].item() == 0 and state["training_model.w"].item() == 1


def _asymmetric(images: torch.Tensor) -> torch.Tensor:
    """Logits that change when the image is mirrored: the first two pixels of row 0."""
    return images[:, 0, 0, :2].clone()


def test_tta_averages_the_flipped_logits_everywhere():
    images = torch.randn(3, 3, 8, 8)
    expected = (_asymmetric(images) + _asymmetric(images.flip(dims=[-1]))) / 2
    assert not torch.allclose(expected, _asymmetric(images))
    assert torch.allclose(tta_logits(_asymmetric, images, "flip"), expected)
    assert torch.allclose(tta_logits(_asymmetric, images, "none"), _asymmetric(images))

    class Asymmetric(torch.nn.Module):
        def forward(self, x):
            return _asymmetric(x)

    # The test step (used by evaluate and by train's final test) ...
    module = FineTuneModule(
        Asymmetric(), {**CARD, "class_names": ["a", "b"]}, plan=TrainingPlan(tta="flip")
    )
    module.log = lambda *a, **k: None
    _, logits, _ = module._shared_step((images, torch.tensor([0, 1, 0])), "test")
    assert torch.allclose(logits, expected)
    # ... and predict's Predictor share the implementation.
    predictor = Predictor(Asymmetric(), {**CARD, "class_names": ["a", "b"]})
    predictor.bf16 = False
    assert torch.allclose(predictor.logits(images, tta=True), expected)


def test_multicrop_averages_ten_views():
    seen = []

    def forward(images):
        seen.append(images.clone())
        return images.mean(dim=(1, 2, 3)).unsqueeze(1)

    batch = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).reshape(2, 3, 6, 6)
    logits = tta_logits(forward, batch, "multicrop", crop_size=4)
    assert len(seen) == 10 and all(v.shape == (2, 3, 4, 4) for v in seen)
    assert torch.equal(seen[0], batch[..., 1:5, 1:5])  # the centre crop comes first
    assert torch.equal(seen[2], batch[..., :4, :4])  # a corner
    assert torch.allclose(
        logits, torch.stack([v.mean(dim=(1, 2, 3)) for v in seen]).mean(0)[:, None]
    )


def test_mixup_targets_and_train_accuracy_against_the_dominant_class():
    torch.manual_seed(0)
    mixer = batch_mixer(3, mixup_alpha=0.4, cutmix_alpha=0.0)
    images, labels = torch.randn(8, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    mixed, targets = mixer(images, labels)
    assert targets.shape == (8, 3) and torch.allclose(targets.sum(1), torch.ones(8))
    lam = targets[torch.arange(8), labels]  # share of each image's own class
    dominant = dominant_labels(targets)
    own = lam >= 0.5
    assert torch.equal(dominant[own], labels[own])
    assert torch.equal(dominant[~own], labels.roll(1)[~own])  # MixUp pairs with the neighbour


def test_recipe_precedence_cli_over_yaml_over_recipe_over_defaults(tmp_path):
    assert load_config(None).optimizer == "adam"  # built-in default
    assert load_config(None, recipe="strong").optimizer == "adamw"  # recipe over default
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("recipe: strong\nlr: 0.01\nlabel_smoothing: 0.2\n")
    config = load_config(yaml_file)
    assert (config.lr, config.label_smoothing, config.optimizer) == (0.01, 0.2, "adamw")
    config = load_config(yaml_file, lr=0.003, recipe="seed")  # CLI over YAML, CLI's recipe
    assert (config.lr, config.label_smoothing, config.optimizer) == (0.003, 0.2, "adam")
    # A strategy given over a recipe's stage schedule replaces it, and the other way round.
    config = load_config(None, recipe="strong", strategy="freeze_last")
    assert config.strategy == "freeze_last" and config.stage_schedule() is None
    config = load_config(None, recipe="seed", train_from="layer3")
    assert config.strategy == STAGED and config.stage_schedule() == [(0, "layer3")]
    config = load_config(None, recipe="strong", train_from="layer3")
    assert config.stage_schedule() == [(0, "head"), (1, "layer3")]  # keeps the recipe's LP
    # The seed's weights name belongs to the seed's backbone.
    assert load_config(None, recipe="seed").weights == "IMAGENET1K_V1"
    assert load_config(None, recipe="seed", backbone="mobilenet_v2").weights == "DEFAULT"
    with pytest.raises(UserError, match="both say what trains"):
        load_config(None, strategy="freeze_last", train_from="layer3")
    with pytest.raises(UserError, match="lp_epochs 1 leaves no epoch"):
        load_config(None, recipe="strong", epochs=1)


def test_seed_recipe_is_the_original_write_up():
    config = load_config(None, recipe="seed")
    assert (config.backbone, config.strategy, config.frozen_bn) == (
        "resnet50",
        "freeze_except_bn_and_fc",
        "train",
    )
    assert (config.optimizer, config.lr, config.weight_decay, config.lr_schedule) == (
        "adam",
        1e-3,
        0.0,
        "constant",
    )
    assert (config.batch_size, config.img_size, config.epochs, config.augmentation) == (
        32,
        224,
        30,
        "seed",
    )
    assert (config.label_smoothing, config.tta, config.ema_decay) == (0.0, "none", None)


def test_saved_config_repeats_a_recipe_run(tmp_path):
    config = load_config(None, recipe="strong", train_from="layer3", data="x")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config.to_yaml_dict()))
    assert load_config(path) == config


@pytest.fixture(scope="module")
def tiny_data(module_tmp_factory):
    root = module_tmp_factory.mktemp("recipes")
    make_class_folders(root / "data" / "train", {"cat": 8, "dog": 8})
    make_class_folders(root / "data" / "val", {"cat": 3, "dog": 3}, seed=9)
    return root


TINY = dict(backbone="mobilenet_v2", img_size=32, batch_size=8, num_workers=0)


def test_strong_recipe_end_to_end(tiny_data):
    config = load_config(
        None,
        recipe="strong",
        data=str(tiny_data / "data"),
        output=str(tiny_data / "runs"),
        epochs=2,
        ema_decay=0.9,
        mixup_alpha=0.2,
        cutmix_alpha=1.0,
        class_weighted_loss=True,
        tta="multicrop",
        test_img_size=40,
        **TINY,
    )
    result = train(config, progress=False, report=False)
    results = result.results
    assert results["strategy"] == "staged" and results["schedule"] == "0:head,1:all"
    assert results["unfrozen"] == [[0, "head"], [1, "features.0"]]  # LP, then everything
    assert results["trainable_params"] == sum(
        p.numel() for p in load_checkpoint(result.run_dir / "checkpoints/best.ckpt")[0].parameters()
    )
    assert results["ema"] is True and results["tta"] == "multicrop"
    model, card = load_checkpoint(result.run_dir / "checkpoints" / "best.ckpt")
    assert card["preprocessing"]["crop_size"] == 40  # evaluation and predict use the test size
    assert card["train_preprocessing"]["crop_size"] == 32
    assert card["ema"] is True and card["schedule"] == "0:head,1:all"
    rescored = evaluate(result.run_dir, num_workers=0, progress=False, tta="multicrop")
    assert rescored["test_acc"] == pytest.approx(results["test_acc"])
    assert rescored["tta"] == "multicrop"


def test_lr_find_plots_suggests_and_applies_only_when_asked(tiny_data):
    base = dict(
        data=str(tiny_data / "data"),
        output=str(tiny_data / "runs"),
        lr_find=True,
        lr_find_steps=16,
        epochs=1,
        strategy="freeze_last",
        **{**TINY, "batch_size": 2},  # more steps per epoch: fewer epochs in the range test
    )
    shown = train(load_config(None, **base), progress=False, report=False)
    found = shown.results["lr_find"]
    assert found["applied"] is False and found["suggestion"] > 0
    assert (shown.run_dir / "figures" / "lr_find.png").stat().st_size > 0
    assert (
        json.loads((shown.run_dir / "lr_find.json").read_text())["suggestion"]
        == found["suggestion"]
    )
    assert not (shown.run_dir / "checkpoints").exists()  # nothing was trained

    applied = train(load_config(None, **base, lr_find_apply=True), progress=False, report=False)
    suggestion = applied.results["lr"]
    assert suggestion == pytest.approx(
        json.loads((applied.run_dir / "lr_find.json").read_text())["suggestion"]
    )
    saved = yaml.safe_load((applied.run_dir / "config.yaml").read_text())
    assert saved["lr"] == pytest.approx(suggestion) and saved["lr_find"] is False
    assert "test_acc" in applied.results


def test_cli_names_the_valid_stages(tiny_data):
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--data",
            str(tiny_data / "data"),
            "--output",
            str(tiny_data / "runs"),
            "--backbone",
            "mobilenet_v2",
            "--train-from",
            "layer3",
            "--num-workers",
            "0",
        ],
    )
    assert result.exit_code == 2
    assert "--train-from layer3: no such stage" in result.output
    assert "features.0, features.1" in result.output and "features.18, then head" in result.output


def test_the_nature12k_config_resolves_on_resnet50():
    import torchvision

    from inat_finetune.models.backbones import replace_classifier

    config = load_config(Path(__file__).parents[1] / "configs" / "nature12k_resnet50_strong.yaml")
    assert (config.backbone, config.weights, config.img_size, config.test_img_size) == (
        "resnet50",
        "IMAGENET1K_V2",
        352,
        384,
    )
    assert config.stage_schedule() == [(0, "layer4"), (4, "layer3")]  # not the recipe's LP-FT
    assert (config.optimizer, config.lr, config.backbone_lr_scale) == ("adamw", 1e-3, 0.1)
    assert (config.label_smoothing, config.early_stopping_patience, config.tta) == (0.1, 6, "flip")
    model = torchvision.models.resnet50()
    stages = backbone_stages(model, replace_classifier(model, 10))
    plan = UnfreezePlan.build(stages, config.stage_schedule(), "--unfreeze-schedule")
    assert [stages[plan.start_at(e)].name for e in (0, 3, 4)] == ["layer4", "layer4", "layer3"]


def test_run_stopped_mid_schedule_resumes_exactly(tmp_path, monkeypatch):
    """The real pipeline: SIGTERM mid-epoch after an unfreeze, then `train --resume`.

    Stage schedule, warmup+cosine per group, EMA, label smoothing, MixUp and TrivialAugment
    all carry on from the checkpoint: the resumed run ends identical to an uninterrupted one.
    """
    import os
    import signal

    from inat_finetune.models.checkpoints import read_checkpoint
    from inat_finetune.training import run as training
    from inat_finetune.training.resume import resume_run

    data = tmp_path / "data"
    make_class_folders(data, {"ant": 10, "bee": 10, "wasp": 10})  # 18 train images: 5 steps
    options = dict(
        recipe="strong",
        unfreeze_schedule="0:head,1:features.17",
        ema_decay=0.9,
        mixup_alpha=0.4,
        data=str(data),
        run_name="r",
        backbone="mobilenet_v2",
        img_size=32,
        batch_size=4,
        num_workers=0,
        epochs=2,
        precision="32-true",
        seed=7,
        checkpoint_minutes=0,
        image_cache=False,  # the second run would report reusing the first one's cache
    )
    whole = train(
        load_config(None, output=str(tmp_path / "a"), **options), progress=False, report=False
    )
    assert whole.results["unfrozen"] == [[0, "head"], [1, "features.17"]]

    step = training.FineTuneModule.training_step

    def signalled(self, batch, batch_idx):
        if self.global_step == 7:  # epoch 1, after features.17 was unfrozen
            os.kill(os.getpid(), signal.SIGTERM)
        return step(self, batch, batch_idx)

    monkeypatch.setattr(training.FineTuneModule, "training_step", signalled)
    with pytest.raises(SystemExit):
        train(
            load_config(None, output=str(tmp_path / "b"), **options), progress=False, report=False
        )
    monkeypatch.undo()
    (run,) = (tmp_path / "b").iterdir()
    saved = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 8 and saved[STAGE_KEY] == 17  # mid-epoch 1, features.17
    resume_run(run, {}, progress=False)
    # The same results, per-epoch metrics, predictions and best weights (EMA and raw).
    # (Not last.ckpt: Lightning >= 2.5 rewrites it only when best.ckpt improves.)
    timings = ("train_time_s", "test_time_s")
    ra, rb = (json.loads((r / "results.json").read_text()) for r in (whole.run_dir, run))
    assert {k: v for k, v in ra.items() if k not in timings} == {
        k: v for k, v in rb.items() if k not in timings
    }
    for name in ("metrics.csv", "test_predictions.csv"):
        assert (run / name).read_text() == (whole.run_dir / name).read_text(), name
    wa, wb = (
        read_checkpoint(r / "checkpoints/best.ckpt")["state_dict"] for r in (whole.run_dir, run)
    )
    assert wa.keys() == wb.keys() and any(k.startswith("training_model.") for k in wa)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_smoothing_and_class_weights_shape_the_training_loss_only():
    from inat_finetune.tasks.optim import class_weights

    weights = class_weights({"a": 30, "b": 10, "c": 20}, ["a", "b", "c"])
    assert weights == pytest.approx([60 / 90, 60 / 30, 60 / 60])
    torch.manual_seed(0)
    module = FineTuneModule(
        TinyResNet(), CARD, plan=TrainingPlan(label_smoothing=0.1, class_weights=weights)
    )
    module.log = lambda *a, **k: None
    batch = (torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2]))
    module.eval()  # the same logits for both calls
    train_loss, logits, _ = module._shared_step(batch, "train")
    val_loss, _, _ = module._shared_step(batch, "val")
    expected = torch.nn.functional.cross_entropy(
        logits, batch[1], weight=torch.tensor(weights), label_smoothing=0.1
    )
    assert train_loss.item() == pytest.approx(expected.item())
    assert val_loss.item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits, batch[1]).item()
    )


def test_onecycle_keeps_the_discriminative_ratio():
    model = TinyResNet()
    stages = backbone_stages(model, "fc")
    plan = TrainingPlan(stages=stages, lr_schedule="onecycle", backbone_lr_scale=0.1)
    optimizer = build_optimizer("sgd", param_groups(model, stages, 1.0, 0.0, 0.1), 1.0)
    scheduler = build_scheduler(optimizer, plan, total_steps=20, max_epochs=2)
    peaks: dict[str, float] = {}
    for _ in range(20):
        for group in optimizer.param_groups:
            peaks[group["name"]] = max(peaks.get(group["name"], 0.0), group["lr"])
        optimizer.step()
        scheduler.step()
    assert peaks["head"] == pytest.approx(1.0, rel=0.05)
    assert peaks["layer4"] == pytest.approx(0.1, rel=0.05)


@pytest.mark.parametrize(
    ("total_steps", "max_epochs", "warmup_epochs"), [(1, 1, 0), (4, 1, 0), (4, 4, 1), (3, 3, 1)]
)
def test_onecycle_runs_whole_short_schedules(total_steps, max_epochs, warmup_epochs):
    """A warm-up of one step made torch's OneCycleLR divide by zero (4 steps, or a one-epoch
    warm-up of one batch per epoch)."""
    model = TinyResNet()
    stages = backbone_stages(model, "fc")
    plan = TrainingPlan(stages=stages, lr_schedule="onecycle", warmup_epochs=warmup_epochs)
    optimizer = build_optimizer("adam", param_groups(model, stages, 1.0, 0.0, 1.0), 1.0)
    scheduler = build_scheduler(optimizer, plan, total_steps, max_epochs)
    for _ in range(total_steps):
        optimizer.step()
        scheduler.step()
        assert all(0 < group["lr"] <= 1.0 for group in optimizer.param_groups)


def test_policies_run_on_prepared_tensor_images_of_bicubic_models():
    """The image cache hands tensors to the transforms; EfficientNet-Lite0 resizes bicubically."""
    from torchvision import tv_tensors

    from inat_finetune.data.augment import build_recipe_train_transform
    from inat_finetune.models.backbones import Preprocessing

    pre = Preprocessing(32, 36, (0.5,) * 3, (0.5,) * 3, "bicubic")
    image = tv_tensors.Image(torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8))
    for policy in ("trivialaugment", "randaugment"):
        transform = build_recipe_train_transform(pre, policy, random_erasing=0.5)
        torch.manual_seed(0)
        for _ in range(40):  # every operation of the policy gets drawn
            assert transform(image).shape == (3, 32, 32)
