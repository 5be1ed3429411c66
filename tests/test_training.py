"""End to end on generated images: a run directory, its checkpoint, evaluate, and the CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_class_folders
from typer.testing import CliRunner

from inat_finetune.cli.main import app
from inat_finetune.errors import UserError
from inat_finetune.inference.evaluation import evaluate, load_checkpoint
from inat_finetune.models.checkpoints import CARD_KEY
from inat_finetune.training.config import load_config
from inat_finetune.training.run import train

TINY = dict(backbone="mobilenet_v2", img_size=32, batch_size=8, num_workers=0, epochs=2)


@pytest.fixture(scope="module")
def tiny_run(module_tmp_factory):
    root = module_tmp_factory.mktemp("tiny")
    make_class_folders(root / "data" / "train", {"cat": 10, "dog": 10, "fox": 10})
    make_class_folders(root / "data" / "val", {"cat": 3, "dog": 3, "fox": 3}, seed=9)
    cfg = load_config(
        None, data=str(root / "data"), output=str(root / "runs"), strategy="freeze_last", **TINY
    )
    return train(cfg, progress=False)


def test_run_directory_holds_everything(tiny_run):
    run = tiny_run.run_dir
    for name in (
        "config.yaml",
        "split.json",
        "dataset.json",
        "metrics.csv",
        "results.json",
        "test_predictions.csv",
        "checkpoints/best.ckpt",
        "checkpoints/last.ckpt",
    ):
        assert (run / name).is_file(), name
    results = json.loads((run / "results.json").read_text())
    assert results == tiny_run.results
    assert results["trainable_params"] == 1280 * 3 + 3  # freeze_last: only the new head
    assert results["num_images"] == {"train": 24, "val": 6, "test": 9}
    assert results["epochs"] == 2 and 0 <= results["test_acc"] <= 1
    assert set(results["per_class_test_acc"]) == {"cat", "dog", "fox"}
    assert sum(map(sum, results["confusion_matrix"])) == 9
    assert yaml.safe_load((run / "config.yaml").read_text())["strategy"] == "freeze_last"


def test_metrics_csv_has_per_epoch_train_and_val(tiny_run):
    rows = list(csv.DictReader((tiny_run.run_dir / "metrics.csv").open()))
    val_epochs = [int(r["epoch"]) for r in rows if r["val/acc"]]
    train_epochs = [int(r["epoch"]) for r in rows if r["train/acc"]]
    assert val_epochs == train_epochs == [0, 1]
    assert all(float(r["train/loss"]) > 0 for r in rows if r["train/loss"])


def test_predictions_file_agrees_with_test_accuracy(tiny_run):
    rows = list(csv.DictReader((tiny_run.run_dir / "test_predictions.csv").open()))
    assert len(rows) == 9
    accuracy = sum(r["true"] == r["predicted"] for r in rows) / len(rows)
    assert accuracy == pytest.approx(tiny_run.results["test_acc"])
    assert all(abs(sum(float(r[f"p_{c}"]) for c in ("cat", "dog", "fox")) - 1) < 1e-3 for r in rows)


def test_checkpoint_is_self_describing_and_loads_weights_only(tiny_run):
    path = tiny_run.run_dir / "checkpoints" / "best.ckpt"
    raw = torch.load(path, map_location="cpu", weights_only=True)
    card = raw[CARD_KEY]
    assert card["backbone"] == "mobilenet_v2" and card["class_names"] == ["cat", "dog", "fox"]
    assert card["preprocessing"]["crop_size"] == 32 and card["strategy"] == "freeze_last"
    model, loaded_card = load_checkpoint(path)
    assert loaded_card == card and model.classifier[1].out_features == 3


def test_uint8_images_given_straight_to_the_model_get_a_clear_error(tiny_run):
    from inat_finetune.tasks.classification import FineTuneModule

    model, card = load_checkpoint(tiny_run.run_dir / "checkpoints" / "best.ckpt")
    module = FineTuneModule(model, card).eval()
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with pytest.raises(TypeError, match="on_after_batch_transfer.*datamodule="):
        module(images)
    assert module(images.float()).shape == (2, 3)


def test_evaluate_rescores_the_run_identically(tiny_run):
    result = evaluate(tiny_run.run_dir, num_workers=0, progress=False)
    assert result["test_acc"] == pytest.approx(tiny_run.results["test_acc"])
    assert result["num_test_images"] == 9


def test_evaluate_on_other_data_and_bad_checkpoints(tiny_run, tmp_path):
    make_class_folders(tmp_path / "other" / "train", {"cat": 3, "dog": 3})
    make_class_folders(tmp_path / "other" / "test", {"cat": 2, "dog": 2}, seed=4)
    result = evaluate(tiny_run.run_dir, data=tmp_path / "other", num_workers=0, progress=False)
    assert result["num_test_images"] == 4
    make_class_folders(tmp_path / "alien" / "train", {"cat": 3, "emu": 3})
    make_class_folders(tmp_path / "alien" / "test", {"cat": 2, "emu": 2}, seed=4)
    with pytest.raises(UserError, match=r"classes \['emu'\] are unknown to the checkpoint"):
        evaluate(tiny_run.run_dir, data=tmp_path / "alien", num_workers=0, progress=False)
    truncated = tmp_path / "truncated.ckpt"
    data = (tiny_run.run_dir / "checkpoints" / "best.ckpt").read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    with pytest.raises(UserError, match="not a readable checkpoint"):
        load_checkpoint(truncated)
    with pytest.raises(UserError, match="no such checkpoint"):
        evaluate(tmp_path / "nothing.ckpt")


def test_cli_train_with_config_file_and_evaluate(tmp_path):
    make_class_folders(tmp_path / "data", {"a": 8, "b": 8})
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump({**TINY, "epochs": 1, "strategy": "freeze_except_bn_and_fc"}))
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "train",
            "--config",
            str(config),
            "--data",
            str(tmp_path / "data"),
            "--output",
            str(tmp_path / "runs"),
            "--run-name",
            "cli",
            "--seed",
            "3",
        ],
    )
    assert result.exit_code == 0, result.output
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.endswith("-cli")
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["strategy"] == "freeze_except_bn_and_fc" and saved["seed"] == 3
    assert saved["img_size"] == 32  # from the YAML file
    assert "test_acc" in result.output
    evaluated = runner.invoke(app, ["evaluate", str(run_dir), "--num-workers", "0"])
    assert evaluated.exit_code == 0, evaluated.output
    assert "test accuracy:" in evaluated.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "/nonexistent/data"], "--data /nonexistent/data: no such directory"),
        (["--strategy", "freeze_all"], "unknown strategy 'freeze_all'"),
        (["--freeze-percent", "2"], "freeze_percent=2.0"),
        (["--backbone", "resnet9000"], "--backbone resnet9000: unknown backbone"),
        (["--freeze-percent", "-0.1"], "freeze_percent=-0.1: Input should be greater than"),
        (["--optimizer", "rmsprop"], "optimizer='rmsprop': Input should be 'adam'"),
        (["--precision", "15"], "--precision 15: unknown; use one of auto, 32-true"),
        (["--accelerator", "tpu9"], "--accelerator tpu9: unknown; use one of auto"),
        (["--devices", "two"], "--devices two: use auto, a count"),
        (["--lr-rate", "3"], "No such option: --lr-rate"),
    ],
)
def test_cli_bad_input_is_one_line_error(tmp_path, args, message):
    make_class_folders(tmp_path / "data", {"a": 4, "b": 4})
    base = ["train", "--data", str(tmp_path / "data"), "--output", str(tmp_path / "runs")]
    result = CliRunner().invoke(app, base + args)
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()  # refused before any run directory is made


def test_same_seed_gives_same_results(tmp_path):
    make_class_folders(tmp_path / "data", {"a": 8, "b": 8})
    results = []
    for run in ("one", "two"):
        cfg = load_config(
            None,
            data=str(tmp_path / "data"),
            output=str(tmp_path / run),
            strategy="freeze_except_bn_and_fc",
            seed=5,
            precision="32-true",
            **{**TINY, "epochs": 1},
        )
        results.append(train(cfg, progress=False).results)
    for key in ("best_val_acc", "test_acc", "test_loss"):
        assert results[0][key] == results[1][key], key
    split_files = [
        json.loads(next(Path(tmp_path / r).iterdir()).joinpath("split.json").read_text())
        for r in ("one", "two")
    ]
    assert split_files[0] == split_files[1]
