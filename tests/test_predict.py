"""``predict`` agrees with ``evaluate``, survives bad files, and averages mirrored views for TTA."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import HYMENOPTERA, ModuleTempFactory, require_shared, write_image, write_tall_png
from typer.testing import CliRunner

from inat_finetune.cli.main import app
from inat_finetune.inference import predict
from inat_finetune.inference.evaluation import evaluate
from inat_finetune.inference.predict import Predictor, predict_paths, write_csv, write_json
from inat_finetune.models.backbones import get_model
from inat_finetune.training.config import load_config
from inat_finetune.training.run import train


@pytest.fixture(scope="module")
def trained_run(module_tmp_factory: ModuleTempFactory) -> Path:
    """One epoch of mobilenet_v2 on hymenoptera at 64 px (about a minute on 2 cores)."""
    data = require_shared(HYMENOPTERA)
    cfg = load_config(
        None,
        data=str(data),
        backbone="mobilenet_v2",
        strategy="freeze_last",
        epochs=1,
        img_size=64,
        batch_size=32,
        output=str(module_tmp_factory.mktemp("runs")),
    )
    return train(cfg, progress=False).run_dir


@pytest.fixture(scope="module")
def small_predictor() -> Predictor:
    """mobilenet_v2 with random weights and two classes at 64 px: no training, no download."""
    built = get_model("mobilenet_v2", num_classes=2, weights=None)
    card = {
        "backbone": "mobilenet_v2",
        "class_names": ["ants", "bees"],
        "preprocessing": built.preprocessing.at_size(64).to_dict(),
    }
    return Predictor(built.model, card, precision="32-true")


def test_predict_accuracy_equals_evaluate(trained_run: Path) -> None:
    val = HYMENOPTERA / "val"
    report = predict_paths(trained_run, [val], top_k=1, batch_size=64, progress=False)
    # hymenoptera's val/ is this run's test split, so evaluate scores the same images.
    # Both at their defaults: the same precision (bf16 autocast on CPUs that have it).
    result = evaluate(trained_run, num_workers=0, progress=False)

    assert report.skipped == []
    assert len(report.predictions) == result["num_test_images"] == 153
    correct = [Path(p.path).parent.name == p.top[0][0] for p in report.predictions]
    accuracy = sum(correct) / len(correct)
    assert 0.5 < accuracy < 1.0  # trained, and not a degenerate all-correct comparison
    assert accuracy == pytest.approx(result["test_acc"], abs=1e-6)
    for name, acc in result["per_class_test_acc"].items():
        of_class = [
            c for p, c in zip(report.predictions, correct, strict=True) if f"/{name}/" in p.path
        ]
        assert sum(of_class) / len(of_class) == pytest.approx(acc, abs=1e-6)


def test_unreadable_files_are_reported_not_fatal(trained_run: Path, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    good = [
        write_image(folder / "a.png", 1),
        write_image(folder / "deep" / "er" / "b.jpg", 2),  # folders are searched recursively
    ]
    (folder / "notes.txt").write_text("not a photo")
    (folder / "empty.jpg").write_bytes(b"")
    truncated = folder / "truncated.jpg"
    truncated.write_bytes(write_image(tmp_path / "full.jpg", 3, (200, 200)).read_bytes()[:300])
    (folder / "fake.png").write_text("<html>not found</html>")
    real = shutil.copy(next((HYMENOPTERA / "val" / "ants").iterdir()), tmp_path / "ant.jpg")
    missing = tmp_path / "nowhere.jpg"

    report = predict_paths(trained_run, [folder, real, missing], top_k=5, progress=False)

    assert sorted(p.path for p in report.predictions) == sorted(map(str, [*good, real]))
    for p in report.predictions:
        assert [c for c, _ in p.top] in (["ants", "bees"], ["bees", "ants"])  # top-5 of 2 classes
        assert sum(prob for _, prob in p.top) == pytest.approx(1.0, abs=1e-5)
    reasons = {Path(s.path).name: s.reason for s in report.skipped}
    assert reasons["notes.txt"] == "not an image file (.txt)"
    assert reasons["empty.jpg"] == "empty file"
    assert reasons["truncated.jpg"].startswith("does not decode")
    assert reasons["fake.png"].startswith("does not decode")
    assert reasons["nowhere.jpg"] == "no such file or directory"
    assert len(report.skipped) == 5

    # JSON: a list of {path, predictions: [{label, score}]}, the skipped files last with
    # empty predictions and their error.
    data = json.loads(write_json(report, tmp_path / "out" / "p.json").read_text())
    assert isinstance(data, list) and len(data) == 3 + 5
    assert [p["path"] for p in data[:3]] == [p.path for p in report.predictions]
    assert all(p.keys() == {"path", "predictions"} for p in data[:3])
    assert data[0]["predictions"] == [
        {"label": t.label, "score": t.score} for t in report.predictions[0].top
    ]
    assert {(p["path"], p["error"]) for p in data[3:]} == {
        (s.path, s.reason) for s in report.skipped
    }
    assert all(p["predictions"] == [] for p in data[3:])
    # CSV: path, label_i/score_i, then the error of a skipped file.
    with write_csv(report, tmp_path / "out" / "p.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["path", "label_1", "score_1", "label_2", "score_2", "error"]
    assert len(rows) == 3 + 5
    assert rows[0]["label_1"] == report.predictions[0].top[0].label
    assert float(rows[0]["score_1"]) == pytest.approx(report.predictions[0].top[0].score, abs=1e-6)
    assert {r["error"] for r in rows[:3]} == {""}
    assert {r["error"] for r in rows[3:]} == {s.reason for s in report.skipped}
    assert {r["label_1"] + r["score_1"] for r in rows[3:]} == {""}


def test_tta_averages_logits_of_the_image_and_its_mirror(trained_run: Path) -> None:
    photo = sorted((HYMENOPTERA / "val" / "bees").iterdir())[0]
    predictor = Predictor.from_checkpoint(trained_run)
    x = predictor.load(photo)[None]
    plain = predictor.logits(x)  # the predictor's own arithmetic (bf16 where the CPU has it)
    mirrored = predictor.logits(torch.flip(x, dims=[3]))
    expected = ((plain + mirrored) / 2).softmax(dim=1)[0]
    assert float((plain - mirrored).abs().max()) > 1e-3  # the mirror really changes the logits

    with_tta = predict_paths(predictor, [photo], top_k=2, tta="flip", progress=False)
    without = predict_paths(predictor, [photo], top_k=2, tta="none", progress=False)
    got = dict(with_tta.predictions[0].top)
    for index, name in enumerate(predictor.class_names):
        assert got[name] == pytest.approx(float(expected[index]), abs=1e-5)
    assert dict(without.predictions[0].top)["ants"] == pytest.approx(
        float(plain.softmax(dim=1)[0, 0]), abs=1e-5
    )
    assert (with_tta.tta, without.tta) == ("flip", "none")


def test_cli_predict_prints_a_table_and_writes_files(trained_run: Path, tmp_path: Path) -> None:
    photos = sorted((HYMENOPTERA / "val" / "ants").iterdir())[:3]  # few: the CLI is the subject
    json_out, csv_out = tmp_path / "p.json", tmp_path / "p.csv"
    result = CliRunner().invoke(
        app,
        ["predict", str(trained_run), *map(str, photos), "--top-k", "2", "--tta", "flip",
         "--batch-size", "2", "--json", str(json_out), "--csv", str(csv_out), "--device", "cpu"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Predictions (" in result.output and "top class" in result.output
    n = len(photos)
    assert len(json.loads(json_out.read_text())) == n
    assert len(csv_out.read_text().splitlines()) == n + 1

    bad = CliRunner().invoke(app, ["predict", str(tmp_path / "no_run"), str(photos[0])])
    assert bad.exit_code == 2
    assert "no such checkpoint file or run directory" in bad.output


def test_a_too_tall_image_is_skipped_and_its_batch_still_predicted(
    small_predictor: Predictor, tmp_path: Path
) -> None:
    """4 x 20,000,000 px: 146 KB, under the pixel limit, ~80 GB once its short side is resized
    to 73 px. Refused from its header; the good images of the same batch are predicted."""
    folder = tmp_path / "photos"
    good = [write_image(folder / "a.png", 1), write_image(folder / "c.jpg", 2)]
    write_tall_png(folder / "b_tall.png")
    report = predict_paths(small_predictor, [folder], batch_size=32, progress=False)
    assert [p.path for p in report.predictions] == [str(path) for path in good]
    assert [(s.path, s.reason) for s in report.skipped] == [
        (
            str(folder / "b_tall.png"),
            "over the image memory budget (4 x 20,000,000 px is 1:5,000,000; the limit is 1:50 "
            "long side to short side, which keeps resizing it under 1 GiB)",
        )
    ]


@pytest.mark.timeout(60)
def test_named_pipes_are_skipped_without_being_opened(
    small_predictor: Predictor, tmp_path: Path, named_pipe
) -> None:
    """A named pipe called x.jpg, in a folder and named on the command line: opening it would
    wait forever for a writer (the watchdog frees such a reader and records it)."""
    folder = tmp_path / "photos"
    good = write_image(folder / "a.png", 1)
    in_folder = named_pipe(folder / "x.jpg")
    given = named_pipe(tmp_path / "y.jpg")
    report = predict_paths(small_predictor, [folder, given], progress=False)
    assert [p.path for p in report.predictions] == [str(good)]
    assert {s.path: s.reason for s in report.skipped} == {
        str(in_folder): "not a regular file (named pipe)",
        str(given): "not a regular file (named pipe)",
    }
    assert named_pipe.opened == []


def test_a_file_gone_between_listing_and_reading_is_skipped_alone(
    small_predictor: Predictor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "photos"
    good = [write_image(folder / "a.png", 1), write_image(folder / "c.png", 3)]
    doomed = write_image(folder / "b.png", 2)
    listed = predict.collect_images

    def list_then_delete(paths):
        found = listed(paths)
        doomed.unlink()  # another program removes it after the folder was listed
        return found

    monkeypatch.setattr(predict, "collect_images", list_then_delete)
    report = predict_paths(small_predictor, [folder], progress=False)
    assert [p.path for p in report.predictions] == [str(path) for path in good]
    assert [(s.path, s.reason) for s in report.skipped] == [
        (str(doomed), "vanished (no such file when it was read)")
    ]
