"""Configuration: defaults, YAML, command-line precedence, round trip and errors."""

from __future__ import annotations

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from inat_finetune.errors import UserError
from inat_finetune.models.freezing import STRATEGIES
from inat_finetune.training.config import TrainConfig, load_config


def test_defaults_are_the_original_write_up():
    cfg = load_config()
    assert (cfg.backbone, cfg.optimizer, cfg.lr, cfg.batch_size) == ("resnet50", "adam", 1e-3, 32)
    assert cfg.strategy == "freeze_except_bn_and_fc" and cfg.freeze_percent == 0.25
    assert cfg.img_size is None  # the weights preset's 224


def test_yaml_then_command_line_precedence(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 7\nlr: 0.01\nfreeze-percent: 0.5\nbackbone: mobilenet_v2\n")
    cfg = load_config(path, lr=0.1, epochs=None)
    assert cfg.epochs == 7  # from YAML: None means "option not given"
    assert cfg.lr == 0.1  # command line wins
    assert cfg.freeze_percent == 0.5 and cfg.backbone == "mobilenet_v2"


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(None, data="somewhere", epochs=3, img_size=128, wandb=True, strategy="none")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg.to_yaml_dict()))
    assert load_config(path) == cfg


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("epoch: 3\n", "unknown option 'epoch'"),
        ("freeze_percent: 1.5\n", "freeze_percent=1.5"),
        ("strategy: freeze_all\n", "unknown strategy 'freeze_all'"),
        ("batch_size: 0\n", "batch_size=0"),
        ("- just\n- a list\n", "must be a mapping"),
        ("epochs: [\n", "not valid YAML"),
    ],
)
def test_bad_config_files_give_one_line_errors(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message) as info:
        load_config(path)
    assert "\n" not in str(info.value)
    assert str(path) in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_config(tmp_path / "nope.yaml")


@settings(max_examples=60, deadline=None)
@given(
    epochs=st.integers(1, 500),
    lr=st.floats(1e-6, 1.0),
    freeze_percent=st.floats(0.0, 1.0),
    strategy=st.sampled_from(STRATEGIES),
    img_size=st.none() | st.integers(16, 1024),
    augment=st.booleans(),
)
def test_any_valid_config_round_trips(epochs, lr, freeze_percent, strategy, img_size, augment):
    cfg = TrainConfig(
        epochs=epochs,
        lr=lr,
        freeze_percent=freeze_percent,
        strategy=strategy,
        img_size=img_size,
        augment=augment,
    )
    assert TrainConfig(**yaml.safe_load(yaml.safe_dump(cfg.to_yaml_dict()))) == cfg


def test_help_shows_the_defaults_written_in_brackets():
    # Typer renders option help as rich markup, in which "[default: resnet50]" is a style tag.
    from typer.testing import CliRunner

    from inat_finetune.cli.main import app

    result = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "[default: resnet50]" in result.output
    assert "[default: auto]" in result.output
