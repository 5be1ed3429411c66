"""results.json's ``auto`` of a ``--recipe auto`` run (``experiments/auto.py``): every candidate's
rounds (epochs, folds, validation scores, seconds, how far an interrupted run got), the winner
and the one sentence that says why it won. Reads what the choice did; decides nothing.
"""

from __future__ import annotations

from typing import Any

from inat_finetune.data.folders import DataSplit
from inat_finetune.experiments.auto_plan import Halving

CANDIDATES_DIR = "candidates"  # where the candidates' runs are kept, inside the final run


def auto_summary(
    runner: Any,  # auto.CandidateRunner
    halving: Halving,
    budget: Any,
    refit: bool,
    epochs: int,
    refit_seconds: float,
    final_split: DataSplit,
) -> dict[str, Any]:
    """results.json's ``auto``: every candidate's rounds, the winner and why it won."""
    candidates = []
    for candidate in runner.table.values():
        rounds = [
            {
                "round": index,
                "epochs": scores[candidate.name].epochs,
                "folds": len(scores[candidate.name].fold_val_acc),
                "fold_val_acc": scores[candidate.name].fold_val_acc,
                "val_acc": scores[candidate.name].val_acc,
                "best_epochs": scores[candidate.name].best_epochs,
                "seconds": round(scores[candidate.name].seconds, 2),
                "runs": scores[candidate.name].extra.get("runs", []),
                "not_run": scores[candidate.name].extra.get("not_run"),
                "interrupted": scores[candidate.name].extra.get("interrupted"),
                "scored_on": scores[candidate.name].extra.get("scored_on"),
            }
            for index, scores in enumerate(halving.rounds)
            if candidate.name in scores
        ]
        candidates.append(
            {
                "name": candidate.name,
                "about": candidate.about,
                "recipe": candidate.recipe,
                "options": runner.options[candidate.name],
                "rounds": rounds,
                "epochs_trained": sum(r["epochs"] * r["folds"] for r in rounds),
                "stopped_after_round": halving.stopped_after[candidate.name],
                "seconds": round(sum(r["seconds"] for r in rounds), 2),
            }
        )
    return {
        "candidates": candidates,
        "ruled_out": runner.ruled_out,
        "winner": halving.winner,
        "why": why_winner(halving),
        "selected_by": "val_acc",
        "scored_on": f"{len(runner.folds)}-fold stratified cross-validation of train+val"
        if len(runner.folds) > 1
        else "the validation split",
        "folds": len(runner.folds),
        "budget": budget.describe(),
        "budget_covers": "the choice (measuring and every candidate's runs), not the final run",
        "budget_epochs_used": halving.budget_epochs_used,
        "halving_stopped": halving.why_stopped,
        "choice_seconds": round(halving.seconds, 2),
        "candidates_dir": CANDIDATES_DIR,
        "refit": {
            "on": refit,
            "epochs": epochs,
            "train_images": sum(map(len, final_split.train.values())),
            "val_is_train": refit,  # the refit's best_val_acc is in-sample
            "seconds": round(refit_seconds, 2),
        },
    }


def why_winner(halving: Halving) -> str:
    """One sentence: the winner's score in the last round, against the best of the others."""
    last = halving.rounds[-1]
    winner = halving.winner
    text = (
        f"{winner}: highest mean validation accuracy in round {len(halving.rounds) - 1} "
        f"({100 * last[winner].val_acc:.2f}% over {len(last[winner].fold_val_acc)} fold(s))"
    )
    others = [(n, s) for n, s in last.items() if n != winner]
    if not others:  # it was the last one standing: name the best it beat in the round before
        earlier = halving.rounds[-2] if len(halving.rounds) > 1 else {}
        others = [(n, s) for n, s in earlier.items() if n != winner]
    if others:
        name, scored = max(others, key=lambda item: item[1].val_acc)
        text += f", ahead of {name} ({100 * scored.val_acc:.2f}%)"
    return text
