"""`inat-finetune demo` end to end: nature_12K subset over HTTP, three strategies, report."""

from __future__ import annotations

import json

from test_download import archive, images, serve, server  # noqa: F401 - pytest fixtures
from typer.testing import CliRunner

from inat_finetune.cli.main import app


def test_demo_fetches_a_subset_compares_three_strategies_and_reports(server, archive, tmp_path):  # noqa: F811
    url = serve(server, archive)
    result = CliRunner().invoke(
        app,
        [
            "demo",
            "--url",
            url,
            "--dest",
            str(tmp_path / "data"),
            "--output",
            str(tmp_path / "runs"),
            "--backbone",
            "mobilenet_v2",
            "--epochs",
            "1",
            "--img-size",
            "32",
            "--subset",
            "4",
            "--test-subset",
            "2",
        ],
    )
    assert result.exit_code == 0, result.output
    assert server.bytes_served < len(archive) / 2  # a subset, not the archive
    (comparison_dir,) = (tmp_path / "runs").iterdir()
    comparison = json.loads((comparison_dir / "comparison.json").read_text())
    assert [r["strategy"] for r in comparison["rows"]] == [
        "freeze_last",
        "freeze_k_percent",
        "freeze_except_bn_and_fc",
    ]
    results = json.loads(
        (comparison_dir / comparison["rows"][0]["run_dir"] / "results.json").read_text()
    )
    assert results["num_images"]["test"] == 10 * 2  # 10 classes x --test-subset
    assert results["num_images"]["train"] + results["num_images"]["val"] == 10 * 4
    assert (comparison_dir / "report.html").is_file()
    assert "Selected by validation accuracy" in result.output


def test_demo_without_network_says_how_to_run_offline(tmp_path):
    result = CliRunner().invoke(
        app, ["demo", "--url", "http://127.0.0.1:9/nature_12K.zip", "--dest", str(tmp_path)]
    )
    assert result.exit_code == 2
    assert "--data PATH" in " ".join(result.output.split())
