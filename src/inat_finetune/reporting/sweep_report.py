"""The sweep report: figures, ``sweep.md`` and a self-contained ``report.html``.

Drawn from the study's trials only (``sweep.trial_rows``), so any worker can write it at any
time. Figures follow ``plots``: Agg-rendered ``Figure`` objects of a fixed size, saved
atomically.

    figures/history.png      each trial's best validation accuracy by trial number, pruned
                             trials marked, and the best so far
    figures/importance.png   parameter importance (Optuna's PED-ANOVA), when computable
    figures/curves.png       validation accuracy per epoch of every trial: where pruning cut in
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter

from inat_finetune.reporting.html_blocks import (
    cards_html,
    esc,
    figure_html,
    page_html,
    pct,
    section_html,
    table_html,
)
from inat_finetune.reporting.plots import FIGURES_DIR, save_figure
from inat_finetune.runfiles import write_text_atomic

STATE_STYLE = {
    "complete": ("#4c72b0", "o"),
    "pruned": ("#8c8c8c", "x"),
    "fail": ("#d00000", "v"),
    "running": ("#dd8452", "s"),
}


def plot_history(rows: list[dict[str, Any]], out: Path) -> Path:
    fig = Figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    for state, (colour, marker) in STATE_STYLE.items():
        points = [
            (r["number"], r["value"] if r["value"] is not None else _last(r["curve"]))
            for r in rows
            if r["state"] == state
        ]
        points = [(n, v) for n, v in points if v is not None]
        if points:
            ax.scatter(*zip(*points, strict=True), c=colour, marker=marker, label=state, zorder=3)
    best, steps = None, []
    for row in rows:
        if row["state"] == "complete" and row["value"] is not None:
            best = row["value"] if best is None else max(best, row["value"])
        if best is not None:
            steps.append((row["number"], best))
    if steps:
        ax.step(*zip(*steps, strict=True), where="post", color="#1a7f37", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("best validation accuracy")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=9)
    ax.set_title("Optimisation history (pruned trials at their last reported epoch)")
    fig.tight_layout()
    return save_figure(fig, out)


def plot_importance(importances: dict[str, float], out: Path) -> Path:
    names = list(importances)[::-1]
    fig = Figure(figsize=(8, 1.2 + 0.45 * len(names)))
    ax = fig.add_subplot()
    ax.barh(names, [importances[n] for n in names], color="#4c72b0")
    ax.set_xlabel("importance (share of the total)")
    ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_title("Parameter importance (PED-ANOVA)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, out)


def plot_curves(rows: list[dict[str, Any]], out: Path) -> Path:
    fig = Figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    for row in rows:
        if not row["curve"]:
            continue
        colour, _ = STATE_STYLE.get(row["state"], ("#000000", "."))
        epochs, values = zip(*sorted(row["curve"].items()), strict=True)
        style = "--" if row["state"] == "pruned" else "-"
        ax.plot(epochs, values, style, color=colour, alpha=0.8, marker="o", markersize=4)
        ax.annotate(str(row["number"]), (epochs[-1], values[-1]), fontsize=8, color=colour)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.grid(alpha=0.3)
    ax.set_title("Validation accuracy per epoch (dashed: pruned; labels: trial numbers)")
    fig.tight_layout()
    return save_figure(fig, out)


def _last(curve: dict[int, float]) -> float | None:
    return curve[max(curve)] if curve else None


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def sweep_markdown(summary: dict[str, Any]) -> str:
    rows = summary["rows"]
    names = sorted({n for r in rows for n in r["params"]})
    counts = {s: sum(r["state"] == s for r in rows) for s in ("complete", "pruned", "fail")}
    lines = [
        f"# Sweep {summary['study_name']}",
        "",
        f"{len(rows)} trials ({counts['complete']} complete, {counts['pruned']} pruned, "
        f"{counts['fail']} failed); objective: {summary['objective']}; storage: "
        f"`{summary['storage']}`.",
        "",
    ]
    best = summary["best"]
    if best is not None:
        lines += [
            f"Best: trial {best['number']}, validation accuracy {100 * best['value']:.2f}% "
            f"({', '.join(f'{k}={_value(v)}' for k, v in best['params'].items())}). "
            "Its configuration is in `best_config.yaml`: "
            "`inat-finetune train --config best_config.yaml`.",
            "",
        ]
    importances = summary["importances"]
    if isinstance(importances, dict):
        lines += ["## Parameter importance", "", "| parameter | importance |", "|---|---:|"]
        lines += [f"| {k} | {100 * v:.1f}% |" for k, v in importances.items()]
    else:
        lines += [f"Parameter importance: {importances}."]
    lines += ["", "## Trials (best first)", ""]
    lines.append("| trial | state | val acc | epochs | " + " | ".join(names) + " |")
    lines.append("|---:|---|---:|---:|" + "---|" * len(names))
    ordered = sorted(rows, key=lambda r: (r["value"] is None, -(r["value"] or 0.0), r["number"]))
    for r in ordered:
        value = "" if r["value"] is None else f"{100 * r['value']:.2f}%"
        params = " | ".join(_value(r["params"].get(n, "")) for n in names)
        lines.append(f"| {r['number']} | {r['state']} | {value} | {r['epochs']} | {params} |")
    return "\n".join(lines) + "\n"


def _html(summary: dict[str, Any], figures: dict[str, Path]) -> str:
    rows = summary["rows"]
    best = summary["best"]
    names = sorted({n for r in rows for n in r["params"]})
    cards = [("trials", str(len(rows)))]
    if best is not None:
        cards += [("best val acc", pct(best["value"])), ("best trial", str(best["number"]))]
    header = (
        f"<header><h1>Sweep report: {esc(summary['study_name'])}</h1>"
        f'<p class="meta">objective: {esc(summary["objective"])} · storage '
        f"<code>{esc(summary['storage'])}</code></p>{cards_html(cards)}</header>"
    )
    sections = []
    best_html = "<p>No trial has completed yet.</p>"
    if best is not None:
        best_html = (
            f"<p>Trial {best['number']}: "
            + ", ".join(
                f"<code>{esc(k)}={esc(_value(v))}</code>" for k, v in best["params"].items()
            )
            + ". Its whole configuration is in <code>best_config.yaml</code>; repeat it with "
            "<code>inat-finetune train --config best_config.yaml</code>. Chosen on validation "
            f"accuracy; its test accuracy was {esc(pct(best['test_acc']))} (not used to choose)."
            "</p>"
        )
    sections.append(("best", "Best trial", best_html))
    sections.append(
        (
            "history",
            "Optimisation history",
            figure_html(figures.get("history"), "optimisation history")
            + figure_html(figures.get("curves"), "validation accuracy per epoch"),
        )
    )
    importances = summary["importances"]
    if isinstance(importances, dict):
        complete = sum(r["state"] == "complete" for r in rows)
        caption = (
            f"From {complete} completed trials: the share of the variation in validation "
            "accuracy that each parameter explains. Read it with care until there are dozens."
        )
        importance_html = figure_html(
            figures.get("importance"), "parameter importance", caption
        ) + table_html(
            ["parameter", "importance"],
            [[esc(k), esc(f"{100 * v:.1f}%")] for k, v in importances.items()],
            numeric={1},
        )
    else:
        importance_html = f"<p>Parameter importance {esc(importances)}.</p>"
    sections.append(("importance", "Parameter importance", importance_html))
    ordered = sorted(rows, key=lambda r: (r["value"] is None, -(r["value"] or 0.0), r["number"]))
    table = table_html(
        ["trial", "state", "val acc", "epochs", "time (s)", *names, "run directory"],
        [
            [
                esc(r["number"]),
                esc(r["state"]),
                esc(pct(r["value"]) if r["value"] is not None else "—"),
                esc(r["epochs"]),
                esc(r["duration_s"] if r["duration_s"] is not None else "—"),
                *(esc(_value(r["params"].get(n, "—"))) for n in names),
                f"<code>{esc(r['run_dir'] or '—')}</code>",
            ]
            for r in ordered
        ],
        numeric={0, 2, 3, 4},
        row_classes=["best" if best and r["number"] == best["number"] else "" for r in ordered],
    )
    sections.append(("trials", "Trials", table))
    body = "".join(section_html(a, t, h) for a, t, h in sections)
    nav = [(a, t) for a, t, _ in sections]
    return page_html(f"Sweep report: {summary['study_name']}", header, nav, body)


def write_sweep_report(sweep_dir: Path, summary: dict[str, Any], figures: bool = True) -> Path:
    """Write ``sweep.md``, the figures (unless ``figures`` is False) and ``report.html``."""
    write_text_atomic(sweep_dir / "sweep.md", sweep_markdown(summary))
    drawn: dict[str, Path] = {}
    rows = summary["rows"]
    if figures and rows:
        fig_dir = sweep_dir / FIGURES_DIR
        drawn["history"] = plot_history(rows, fig_dir / "history.png")
        drawn["curves"] = plot_curves(rows, fig_dir / "curves.png")
        if isinstance(summary["importances"], dict) and summary["importances"]:
            drawn["importance"] = plot_importance(
                summary["importances"], fig_dir / "importance.png"
            )
    return write_text_atomic(sweep_dir / "report.html", _html(summary, drawn))
