"""The package layout holds: layers import downward only, no private name crosses modules, and
modules and functions stay short (or say why they are not)."""

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


MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80

# Work in progress: modules other engineers of issue 17 are rewriting (the run as named phases,
# each option declared once, the Python API), still over a limit here. Empty this as they land;
# test_work_in_progress_allowlist_is_current fails for an entry that no longer needs to be here.
WORK_IN_PROGRESS = {}


def oversized(source: str) -> list[str]:
    """What in ``source`` is over the limits: the module's length, then each long function."""
    found = []
    lines = len(source.splitlines())
    if lines > MAX_MODULE_LINES:
        found.append(f"module: {lines} lines")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                found.append(f"{node.name} (line {node.lineno}): {length} lines")
    return found


def states_why_longer(source: str) -> bool:
    """The module docstring has a line starting "Longer than" (saying why it is)."""
    docstring = ast.get_docstring(ast.parse(source)) or ""
    return any(line.strip().startswith("Longer than") for line in docstring.splitlines())


def test_the_size_check_sees_long_modules_and_functions():
    body = "\n".join(f"    x = {i}" for i in range(80))
    assert oversized(f"def f():\n{body}\n") == ["f (line 1): 81 lines"]
    assert oversized(f"def f():\n{body[:-11]}\n") == []
    assert oversized("x = 1\n" * 501) == ["module: 501 lines"]
    assert states_why_longer('"""Tables.\n\nLonger than 500 lines because ..."""\n')
    assert not states_why_longer('"""Tables; not longer than it needs."""\n')


def test_modules_and_functions_stay_short_or_say_why():
    # At most 500 lines a module and 80 a function, unless the module docstring has a line
    # "Longer than ... because ...".
    offenders = {}
    for path in sorted(SRC.rglob("*.py")):
        name = path.relative_to(SRC).as_posix()
        source = path.read_text(encoding="utf-8")
        if name in WORK_IN_PROGRESS or states_why_longer(source):
            continue
        if found := oversized(source):
            offenders[name] = found
    assert offenders == {}, (
        "split these into named steps or cohesive modules, or state why in the module "
        "docstring with a line starting 'Longer than'"
    )


def test_work_in_progress_allowlist_is_current():
    settled = [
        name
        for name in WORK_IN_PROGRESS
        if not (SRC / name).is_file() or not oversized((SRC / name).read_text(encoding="utf-8"))
    ]
    assert settled == [], f"within the limits now: remove {settled} from WORK_IN_PROGRESS"
