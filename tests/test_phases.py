"""A run reads as named phases: one split with its test-set guard and one process set-up for
every entry point, phases of readable length, and an lr finder that only returns numbers."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from matplotlib.figure import Figure

SRC = Path(__file__).resolve().parents[1] / "src" / "inat_finetune"
# The modules that start runs: the run itself and the experiments made of runs.
RUN_STARTERS = sorted([*SRC.glob("training/*.py"), *SRC.glob("experiments/*.py")])


def calls(path: Path) -> set[str]:
    """The names ``path`` calls or refers to (``f(...)``, ``mod.f(...)``, ``f`` passed on)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
    return names


def modules_using(name: str) -> list[str]:
    return [str(p.relative_to(SRC)) for p in RUN_STARTERS if name in calls(p)]


@pytest.mark.parametrize("name", ["make_split", "guard_test_set"])
def test_the_split_and_its_guard_are_made_in_one_place(name):
    # train, compare and sweep all split through training.setup.split_for_run.
    assert modules_using(name) == ["training/setup.py"]


@pytest.mark.parametrize("name", ["plan_world", "join_launched_group", "seed_everything"])
def test_processes_are_set_up_in_one_place(name):
    # train and compare both call training.setup.prepare_processes.
    assert modules_using(name) == ["training/setup.py"]


def test_compare_and_train_write_their_report_through_one_helper():
    assert sorted(modules_using("write_report")) == ["training/outputs.py"]
    assert "write_figures_and_report" in calls(SRC / "experiments" / "comparison.py")


def test_the_optimisation_module_draws_nothing():
    tree = ast.parse((SRC / "tasks" / "optim.py").read_text(encoding="utf-8"))
    imported = {
        node.module if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }
    drawing = {m for m in imported if m and m.startswith(("inat_finetune.reporting", "matplotlib"))}
    assert drawing == set()


@pytest.mark.parametrize("module", ["run", "setup", "fitting", "outputs", "state"])
def test_every_phase_is_a_short_function(module):
    tree = ast.parse((SRC / "training" / f"{module}.py").read_text(encoding="utf-8"))
    long = {
        node.name: node.end_lineno - node.lineno + 1
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno + 1 > 80
    }
    assert long == {}


def test_the_lr_find_figure_is_drawn_from_the_finders_numbers(tmp_path):
    from inat_finetune.reporting.lr_find import lr_find_figure, plot_lr_find

    found = {"lr": [1e-5, 1e-4, 1e-3, 1e-2], "loss": [2.0, 1.5, 1.0, 3.0], "suggestion": 1e-4}
    fig = lr_find_figure(found)
    assert isinstance(fig, Figure)
    assert (
        fig.axes[0].get_xscale() == "log"
        and "suggested" in fig.axes[0].get_legend_handles_labels()[1][0]
    )
    assert plot_lr_find({**found, "suggestion": None}, tmp_path / "lr.png").stat().st_size > 0
