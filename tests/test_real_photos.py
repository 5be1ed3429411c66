"""Pretrained MobileNetV2 on the real hymenoptera photographs (tens of seconds each on 2 cores)."""

from __future__ import annotations

import json

from conftest import HYMENOPTERA, require_shared
from typer.testing import CliRunner

from inat_finetune.cli.main import app
from inat_finetune.training.config import load_config
from inat_finetune.training.run import train


def test_linear_probe_on_hymenoptera_reaches_88_percent(tmp_path):
    cfg = load_config(
        None,
        data=str(require_shared(HYMENOPTERA)),
        output=str(tmp_path),
        backbone="mobilenet_v2",
        strategy="freeze_last",
        img_size=160,
        epochs=4,
        augment=False,
        seed=1,
    )
    results = train(cfg, progress=False).results
    assert results["trainable_params"] == 1280 * 2 + 2
    assert results["num_images"]["test"] == 153  # val/ is the test set, all of it
    assert results["skipped_files"] == 1  # the imageNotFound.gif placeholder
    assert results["test_acc"] >= 0.88, results


def test_train_command_writes_a_complete_run_directory(tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--data",
            str(require_shared(HYMENOPTERA)),
            "--backbone",
            "mobilenet_v2",
            "--strategy",
            "freeze_except_bn_and_fc",
            "--epochs",
            "3",
            "--output",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    (run_dir,) = tmp_path.iterdir()
    for name in (
        "config.yaml",
        "split.json",
        "metrics.csv",
        "results.json",
        "checkpoints/best.ckpt",
    ):
        assert (run_dir / name).is_file(), name
    results = json.loads((run_dir / "results.json").read_text())
    assert results["strategy"] == "freeze_except_bn_and_fc" and results["epochs"] == 3
    assert results["test_acc"] > 0.8  # BatchNorm + head adapt fast on ants vs bees
