"""The report's section on ``--recipe auto``: the candidates it ran, for how long, their
validation scores per fold and round, and why the winner won (``results.json``'s ``auto``)."""

from __future__ import annotations

from typing import Any

from inat_finetune.reporting.html_blocks import duration_text, esc, kv_html, pct, table_html

AUTO_ANCHOR = "auto"


AUTO_TITLE = "Recipe chosen by validation"


def auto_section_body(auto: dict[str, Any]) -> str:
    """A sentence on the choice, the table of candidates, and the refit."""
    rows, classes = [], []
    for candidate in auto.get("candidates", []):
        chosen = candidate.get("name") == auto.get("winner")
        name = esc(candidate.get("name")) + ('<span class="badge">chosen</span>' if chosen else "")
        rounds = candidate.get("rounds", [])
        rows.append(
            [
                name,
                esc(candidate.get("about", "")),
                esc(" + ".join(f"{r.get('epochs')}x{r.get('folds')}" for r in rounds)),
                esc(
                    "; ".join(
                        ", ".join(f"{100 * v:.1f}" for v in r.get("fold_val_acc", []))
                        for r in rounds
                    )
                ),
                pct(rounds[-1].get("val_acc") if rounds else None),
                esc(candidate.get("stopped_after_round")),
                duration_text(candidate.get("seconds")),
            ]
        )
        classes.append("best" if chosen else "")
    header = [
        "candidate",
        "what it trains",
        "epochs x folds per round",
        "val acc per fold (%), by round",
        "val acc, last round",
        "last round",
        "time",
    ]
    refit = auto.get("refit", {})
    intro = (
        f"<p><strong>{esc(auto.get('winner'))}</strong> won: {esc(auto.get('why'))}. "
        f"Scored on {esc(auto.get('scored_on'))}, never on the test set; successive halving "
        f"within a budget of {esc(auto.get('budget'))} ({esc(auto.get('halving_stopped'))}).</p>"
    )
    facts = {
        "refit on train + validation": refit.get("on"),
        "final epochs": refit.get("epochs"),
        "final training images": refit.get("train_images"),
        "choice time": duration_text(auto.get("choice_seconds")),
        "candidate runs": auto.get("candidates_dir"),
    }
    return intro + table_html(header, rows, {4, 5, 6}, classes) + kv_html(facts)
