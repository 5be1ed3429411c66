"""Each `train` option is declared once, on its TrainConfig field (cli/options.py generates the rest).

Parity between the fields and the commands: every field is a `train` option (or on the short
list of fields set only in a --config file), every option of `train` and `compare` is a field
(or on the short list of command-line-only options), and the default each help text shows is the
field's default. The options' own default stays None, so a --config file is not overridden.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from typer.testing import CliRunner

from inat_finetune.cli.main import app
from inat_finetune.errors import UserError
from inat_finetune.training.config import TrainConfig

# Options that only the command line has: they are not run settings.
CLI_ONLY = {
    "train": {"config", "resume"},
    "compare": {"config", "strategies", "then_train_epochs", "recipes"},
}
# Fields deliberately set only in a --config file (the reason stands beside each field).
CONFIG_FILE_ONLY = {"wandb_group", "fast_depthwise_grad", "reuse_freed_memory"}


def _params(command: str) -> dict[str, Any]:
    group = typer.main.get_command(app)
    return {p.name: p for p in group.commands[command].params}


def _shown(value: Any) -> str:
    """A field default as the help should show it, written out here independently."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _help_default(param: Any) -> str | None:
    # The help is rich markup, so its brackets are escaped: "\[default: 32]".
    found = re.findall(r"\\?\[default: ([^\]]*)\]", param.help or "")
    assert len(found) <= 1, f"{param.name}: more than one default in {param.help!r}"
    return found[0] if found else None


def test_every_field_is_a_train_option():
    options = _params("train")
    missing = [
        name
        for name in TrainConfig.model_fields
        if name not in options and name not in CONFIG_FILE_ONLY
    ]
    assert not missing, f"TrainConfig fields without a `train` option: {missing}"
    assert not CONFIG_FILE_ONLY & set(options), "a config-file-only field became an option"


@pytest.mark.parametrize("command", ["train", "compare"])
def test_every_option_is_a_field_with_its_flag(command):
    for name, param in _params(command).items():
        if name in CLI_ONLY[command]:
            continue
        assert name in TrainConfig.model_fields, f"{command} --{name}: no TrainConfig field"
        flag = "--" + name.replace("_", "-")
        assert param.opts == [flag], (command, name, param.opts)
        assert param.default is None, f"{command} {flag}: would override the --config file"


@pytest.mark.parametrize("command", ["train", "compare"])
def test_help_shows_the_field_default(command):
    for name, param in _params(command).items():
        if name in CLI_ONLY[command]:
            continue
        field = TrainConfig.model_fields[name]
        shown = _help_default(param)
        if field.default is None:
            extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
            assert shown == extra.get("unset"), (command, name, param.help)
        else:
            assert shown == _shown(field.default), (command, name, param.help, field.default)


def test_compare_offers_a_subset_of_train_with_the_same_help():
    train, compare = _params("train"), _params("compare")
    for name, param in compare.items():
        if name not in CLI_ONLY["compare"]:
            assert param.help == train[name].help, name


def test_rendered_help_names_the_default():
    result = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert re.search(
        r"--batch-size .*images per step on each device \[default: 32\]", result.output
    )


def _capture_config(monkeypatch, target: str) -> list[TrainConfig]:
    seen: list[TrainConfig] = []

    def stop(config: TrainConfig, *args: Any, **kwargs: Any) -> None:
        seen.append(config)
        raise UserError("stopped before training")

    monkeypatch.setattr(target, stop)
    return seen


@pytest.mark.parametrize(
    ("command", "target"),
    [
        ("train", "inat_finetune.training.run.train"),
        ("compare", "inat_finetune.experiments.comparison.compare"),
    ],
)
def test_given_options_override_the_config_file_and_others_do_not(
    tmp_path: Path, monkeypatch, command, target
):
    seen = _capture_config(monkeypatch, target)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"batch_size": 9, "lr": 0.5}), encoding="utf-8")
    args = [command, "--data", str(tmp_path), "--output", str(tmp_path / "runs")]
    args += ["--config", str(config), "--lr", "0.25", "--no-augment"]
    if command == "train":  # one run, not auto's choice (which first scans the data)
        args += ["--recipe", "bn_head"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "stopped before training" in result.output
    (cfg,) = seen
    assert (cfg.batch_size, cfg.lr, cfg.augment, cfg.epochs) == (9, 0.25, False, 10)
