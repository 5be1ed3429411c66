"""The package layout holds: layers import downward only, and no private name crosses modules."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "inat_finetune"


def test_import_linter_contracts_are_kept():
    # pyproject.toml [tool.importlinter]: the layers, inference without training, no cycles.
    lint_imports = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run(
        [str(lint_imports), "--config", str(SRC.parents[1] / "pyproject.toml")],
        capture_output=True,
        text=True,
        cwd=SRC.parents[1],
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def private_imports(source: str) -> list[str]:
    """``from inat_finetune.x import _y`` statements in ``source``: names private to x."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("inat_finetune"):
            found += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    return found


def test_no_private_name_is_imported_from_another_module():
    assert private_imports("from inat_finetune.data.images import _gib") == [
        "inat_finetune.data.images._gib"
    ]
    offenders = {
        str(path.relative_to(SRC)): names
        for path in sorted(SRC.rglob("*.py"))
        if (names := private_imports(path.read_text(encoding="utf-8")))
    }
    assert offenders == {}


def test_package_inits_only_re_export():
    for init in sorted(SRC.glob("*/__init__.py")):
        tree = ast.parse(init.read_text(encoding="utf-8"))
        kinds = {type(node).__name__ for node in tree.body[1:]}  # after the docstring
        assert kinds <= {"ImportFrom", "Assign"}, (init, kinds)
