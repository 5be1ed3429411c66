"""The example notebook (a Jupytext percent-format script) runs end to end through the API on the
real photos with a tiny budget, and what it reports agrees with the runs it made."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import HYMENOPTERA, ROOT, require_shared

NOTEBOOK = ROOT / "examples" / "nature12k_experiment.py"


def test_the_notebook_runs_the_experiment_on_real_photos(tmp_path: Path) -> None:
    data = require_shared(HYMENOPTERA)
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src"),
        "CUDA_VISIBLE_DEVICES": "",
        "MPLBACKEND": "Agg",
        "INAT_DATA": str(data),
        "INAT_BACKBONE": "mobilenet_v2",
        "INAT_EPOCHS": "1",
        "INAT_FINAL_EPOCHS": "1",
        "INAT_IMG_SIZE": "64",
        "INAT_OUTPUT": str(tmp_path / "runs"),
        # Without augmentation the frozen backbone's features are computed once and reused.
        "INAT_OPTIONS": '{"augment": false}',
    }
    subprocess.run([sys.executable, str(NOTEBOOK)], check=True, env=env, cwd=tmp_path, timeout=300)

    summary = json.loads((tmp_path / "runs" / "experiment.json").read_text())
    assert summary["classes"] == ["ants", "bees"]
    assert sum(summary["counts"]["test"].values()) > 0
    strategies = [row["strategy"] for row in summary["comparison"]]
    assert strategies == ["freeze_last", "freeze_k_percent", "freeze_except_bn_and_fc"]
    # The winner is the validation choice, and it is the strategy trained last.
    best = max(summary["comparison"], key=lambda r: (r["val_acc"], -r["trainable_params"]))
    assert summary["best_strategy"] == best["strategy"]
    final = Path(summary["final_run"])
    results = json.loads((final / "results.json").read_text())
    assert results["strategy"] == summary["best_strategy"]
    assert summary["final_test_acc"] == results["test_acc"]
    assert (final / "report.html").is_file() and (final / "figures" / "curves.png").is_file()
    assert len(summary["predictions"]) == 5
    for prediction in summary["predictions"]:
        assert len(prediction["top"]) == 2  # top_k=3 of two classes
        assert prediction["top"][0][1] >= prediction["top"][1][1]
