"""W&B in offline mode: what `train --wandb` records, read back from the offline run's file.

The run's ``run-<id>.wandb`` holds every record W&B would upload (the run with its entity and
tags, the config, the history, the artifacts). wandb >= 0.2x no longer ships a Python reader
for it, so ``offline_records`` reads its framing here (LevelDB's log format, as W&B writes it)
and wandb's own protobuf ``Record`` parses each record.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import pytest
from conftest import TINY_TRAIN, ModuleTempFactory, make_class_folders
from typer.testing import CliRunner

from inat_finetune.cli.main import app

BLOCK = 32 * 1024  # the log's block size; no chunk header crosses a block's end
HEADER = 7  # ":W&B", magic, version at the file's start; CRC-32C, length, type per chunk
FULL, LAST = 1, 4


def offline_records(path: Path) -> list[Any]:
    """Every record of an offline run file, as wandb's protobuf ``Record`` messages."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    records, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # the block's zero-padded tail
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0:
            break
        pending += data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind in (FULL, LAST):
            record = Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def of_type(records: list[Any], kind: str) -> list[Any]:
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


@pytest.fixture(scope="module")
def wandb_run(module_tmp_factory: ModuleTempFactory) -> dict[str, Any]:
    root = module_tmp_factory.mktemp("wandb")
    make_class_folders(root / "data", {"ants": 8, "bees": 8})
    options = [f"--{k.replace('_', '-')}={v}" for k, v in TINY_TRAIN.items()]
    args = ["train", "--data", str(root / "data"), "--output", str(root / "runs"), *options]
    args += ["--run-name", "logged", "--wandb", "--wandb-log-model", "--wandb-entity", "my-team"]
    args += ["--wandb-tags", "tiny,offline", "--wandb-tags", "ci"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (run_dir,) = (root / "runs").glob("*-logged")
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    return {
        "run_dir": run_dir,
        "offline": offline,
        "records": offline_records(next(offline.glob("run-*.wandb"))),
        "results": json.loads((run_dir / "results.json").read_text()),
    }


def test_entity_and_tags_are_the_run_s(wandb_run):
    (run,) = of_type(wandb_run["records"], "run")
    assert run.entity == "my-team"
    assert list(run.tags) == ["tiny", "offline", "ci"]


def test_best_checkpoint_is_a_model_artifact(wandb_run):
    (run,) = of_type(wandb_run["records"], "run")
    models = [a for a in of_type(wandb_run["records"], "artifact") if a.type == "model"]
    assert len(models) == 1
    (model,) = models
    assert model.name == f"model-{run.run_id}"
    assert set(model.aliases) == {"best", "latest"}
    best = wandb_run["run_dir"] / wandb_run["results"]["checkpoint"]
    (entry,) = model.manifest.contents
    assert entry.path == "best.ckpt"
    assert entry.digest == base64.b64encode(hashlib.md5(best.read_bytes()).digest()).decode()
    metadata = json.loads(model.metadata)
    assert metadata["class_names"] == ["ants", "bees"]
    assert metadata["best_val_acc"] == wandb_run["results"]["best_val_acc"]


def test_confusion_matrix_is_w_and_b_s_chart_of_the_test_counts(wandb_run):
    charts = {
        tuple(item.nested_key): json.loads(item.value_json)
        for config in of_type(wandb_run["records"], "config")
        for item in config.update
    }
    chart = charts[("_wandb", "visualize", "confusion_matrix")]
    assert chart["panel_config"]["panelDefId"] == "wandb/confusion_matrix/v1"
    (table,) = (wandb_run["offline"] / "files" / "media" / "table").glob(
        "confusion_matrix_table_*.table.json"
    )
    rows = json.loads(table.read_text())["data"]
    counted = {(true, guess): n for true, guess, n in rows}
    names = wandb_run["results"]["class_names"]
    for i, counts in enumerate(wandb_run["results"]["confusion_matrix"]):
        for j, n in enumerate(counts):
            assert counted[(names[i], names[j])] == n


def test_without_the_option_no_model_is_uploaded(tmp_path):
    from inat_finetune.training.config import load_config

    config = load_config(None, data="d", wandb=True)
    assert config.wandb_log_model is False and config.wandb_tags is None
    assert load_config(None, wandb_tags="a, b").wandb_tags == ["a", "b"]
