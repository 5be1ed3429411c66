"""A fresh machine's set-up: the browser the tests drive, and the optional features' extras.

``scripts/ensure_browser.sh`` runs here on a PATH without Chromium (and with stand-ins for
``apt-get`` and ``id``), so nothing is installed or removed. The extras are checked by hiding
their modules (``sys.modules[name] = None`` makes ``import name`` fail) and running the real
command line; pyproject.toml must declare the extras runtime/extras.py names.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from inat_finetune.cli.main import app
from inat_finetune.runtime.extras import EXTRAS, install_hint

ROOT = Path(__file__).resolve().parents[1]
ENSURE_BROWSER = ROOT / "scripts" / "ensure_browser.sh"
BASH = "/bin/bash"
HINT = (
    "Chromium for the browser tests is missing: run 'sudo apt-get update && "
    "sudo apt-get install -y chromium chromium-driver' (or make test as root)"
)


def fake_bin(tmp_path: Path, uid: int, browser: bool = False) -> Path:
    """A PATH folder with stand-ins: ``id -u`` says ``uid``, ``apt-get`` records its call."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tools = {
        "id": f"echo {uid}",
        "apt-get": f'echo "DEBIAN_FRONTEND=$DEBIAN_FRONTEND apt-get $*" >> {tmp_path / "apt.log"}',
    }
    if browser:
        tools |= {"chromium": "true", "chromedriver": "true"}
    for name, body in tools.items():
        (bin_dir / name).write_text(f"#!{BASH}\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return bin_dir


def ensure_browser(bin_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "DEBIAN_FRONTEND"}
    env["PATH"] = str(bin_dir)  # no /usr/bin: Chromium is "not installed"
    return subprocess.run(
        [BASH, str(ENSURE_BROWSER), *args], env=env, capture_output=True, text=True, check=False
    )


def test_root_installs_chromium_through_apt_non_interactively(tmp_path):
    result = ensure_browser(fake_bin(tmp_path, uid=0))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "apt.log").read_text().splitlines() == [
        "DEBIAN_FRONTEND=noninteractive apt-get update -qq",
        "DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver",
    ]


def test_without_root_one_line_names_the_command_and_the_tests_report_it(tmp_path):
    bin_dir = fake_bin(tmp_path, uid=1000)
    result = ensure_browser(bin_dir)
    assert (result.returncode, result.stdout) == (0, HINT + "\n")  # make test goes on
    assert not (tmp_path / "apt.log").exists()
    check = ensure_browser(bin_dir, "--check")  # what the browser tests fail with
    assert (check.returncode, check.stdout) == (1, HINT + "\n")


def test_installed_chromium_is_left_alone(tmp_path):
    bin_dir = fake_bin(tmp_path, uid=0, browser=True)
    assert ensure_browser(bin_dir).stdout == ensure_browser(bin_dir, "--check").stdout == ""
    assert not (tmp_path / "apt.log").exists()


# What each feature hides, and the command line that uses it (none needs a real run: the
# check comes before any file is read).
FEATURES = [
    ("serve", "fastapi", ["serve", "no-such-run"]),
    ("serve", "python_multipart", ["serve", "no-such-run"]),
    ("sweep", "optuna", ["sweep", "--config", str(ROOT / "examples" / "sweep.yaml")]),
    ("export", "onnxruntime", ["export", "no-such-run", "--format", "onnx"]),
    ("wandb", "wandb", ["train", "--data", "no-such-data", "--wandb"]),
]


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # starlette falls back
@pytest.mark.parametrize(("extra", "module", "args"), FEATURES)
def test_a_missing_extra_is_one_line_naming_the_install(monkeypatch, extra, module, args):
    monkeypatch.setitem(sys.modules, module, None)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].endswith(f"({module} is not installed): pip install 'inat-finetune[{extra}]'")


HIDDEN = sorted({m for modules in EXTRAS.values() for m in modules} | {"starlette", "sqlalchemy"})


def test_every_command_s_help_and_the_core_packages_need_no_extra():
    # A fresh interpreter: the extras' modules are hidden before anything is imported.
    script = textwrap.dedent(
        f"""
        import sys
        for name in {HIDDEN!r}:
            sys.modules[name] = None
        import typer
        from typer.testing import CliRunner
        import inat_finetune.api, inat_finetune.experiments, inat_finetune.inference
        import inat_finetune.reporting, inat_finetune.training
        from inat_finetune.cli.main import app
        for name in typer.main.get_command(app).commands:
            result = CliRunner().invoke(app, [name, "--help"])
            assert result.exit_code == 0, (name, result.output)
            print(name)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert set(result.stdout.split()) == set(typer.main.get_command(app).commands)


def project_table() -> dict[str, Any]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with (ROOT / "pyproject.toml").open("rb") as handle:
        return tomllib.load(handle)["project"]


def requirement_name(requirement: str) -> str:
    return requirement.split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower()


def test_pyproject_declares_each_extra_and_the_core_install_has_none():
    project = project_table()
    extras = project["optional-dependencies"]
    distribution = {"python_multipart": "python-multipart"}
    for extra, modules in EXTRAS.items():
        names = {requirement_name(r) for r in extras[extra]}
        assert {distribution.get(m, m) for m in modules} <= names, extra
        assert all(">=" in r for r in extras[extra]), f"[{extra}] without floors"
    assert extras["all"] == [f"inat-finetune[{','.join(EXTRAS)}]"]
    core = {requirement_name(r) for r in project["dependencies"]}
    optional = {requirement_name(r) for extra in EXTRAS for r in extras[extra]}
    assert not core & optional, core & optional
    assert install_hint("serve") == "pip install 'inat-finetune[serve]'"
