"""check-data and the leakage guard: counts, unreadable files, duplicates, missing classes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import write_image, write_tall_png
from rich.console import Console
from typer.testing import CliRunner

from inat_finetune.cli.main import app
from inat_finetune.data import datacheck
from inat_finetune.data.datacheck import assert_no_leakage, check_data, find_duplicates, render
from inat_finetune.data.folders import make_split
from inat_finetune.errors import UserError


def _defects(base: Path) -> None:
    """A leak across splits, a broken file, a class missing from val/, one missing from train/."""
    shutil.copy(base / "train/Aves/Aves_0.jpg", base / "val/Aves/leak.jpg")
    (base / "val/Fungi/broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    shutil.rmtree(base / "val/Amphibia")
    write_image(base / "val/Reptilia/Reptilia_0.jpg", seed=999)


def test_clean_nature_tree_is_ok(nature_like):
    report = check_data(nature_like)
    assert report.ok and report.warnings == [] and report.duplicates == []
    assert report.layout == "nature12k" and report.classes == ["Amphibia", "Aves", "Fungi"]
    assert report.counts == {
        "train": {"Amphibia": 6, "Aves": 6, "Fungi": 6},
        "val": {"Amphibia": 2, "Aves": 2, "Fungi": 2},
    }
    # .DS_Store files are ignored quietly, not reported as unreadable images
    assert sorted(s.path for s in report.ignored) == ["train/.DS_Store", "val/Aves/.DS_Store"]
    assert report.unreadable == []


def test_finds_leak_unreadable_file_and_missing_classes(nature_like):
    base = nature_like / "inaturalist_12K"
    _defects(base)
    report = check_data(nature_like)

    assert report.duplicates == [["train/Aves/Aves_0.jpg", "val/Aves/leak.jpg"]]
    assert [u.path for u in report.unreadable] == ["val/Fungi/broken.jpg"]
    assert "does not decode" in report.unreadable[0].reason
    assert report.missing == {"train": ["Reptilia"], "val": ["Amphibia"]}
    assert not report.ok
    errors = " | ".join(report.errors)
    assert "train/Aves/Aves_0.jpg == val/Aves/leak.jpg" in errors and "leak" in errors
    assert "train/ has no readable images of Reptilia" in errors
    warnings = " | ".join(report.warnings)
    assert "val/ (test set) has no images of Amphibia" in warnings
    assert "1 image file does not decode" in warnings

    console = Console(record=True, width=200)
    render(report, console)
    text = console.export_text()
    assert "val/Fungi/broken.jpg" in text and "identical: train/Aves/Aves_0.jpg" in text
    assert "2 error(s), 2 warning(s)" in text


def test_duplicates_inside_a_split_are_warnings(image_folder):
    root = image_folder({"ants": 4, "bees": 4})
    shutil.copy(root / "ants/ants_0.jpg", root / "bees/copy_of_ant.jpg")
    report = check_data(root)
    assert report.ok, report.errors
    assert report.duplicates == [["ants/ants_0.jpg", "bees/copy_of_ant.jpg"]]
    assert any("different classes" in w for w in report.warnings)


def test_only_files_sharing_a_size_are_hashed(tmp_path, monkeypatch):
    files = [tmp_path / f"{i}.bin" for i in range(6)]
    for path, data in zip(files, [b"a", b"bb", b"ccc", b"same", b"same", b"diff"], strict=True):
        path.write_bytes(data)
    hashed: list[Path] = []
    real = datacheck._hash_file
    monkeypatch.setattr(datacheck, "_hash_file", lambda p: hashed.append(p) or real(p))
    assert find_duplicates(files) == [[files[3], files[4]]]
    assert sorted(hashed) == files[3:]


def test_assert_no_leakage(nature_like):
    split = make_split(nature_like, seed=0)
    assert_no_leakage(split)  # clean: no error

    base = nature_like / "inaturalist_12K"
    shutil.copy(base / "train/Fungi/Fungi_3.jpg", base / "val/Fungi/again.jpg")
    shutil.copy(base / "train/Aves/Aves_1.jpg", base / "val/Aves/again.jpg")
    leaky = make_split(nature_like, seed=0)
    with pytest.raises(UserError, match="2 test images are identical") as caught:
        assert_no_leakage(leaky)
    message = str(caught.value)
    assert "val/Fungi/again.jpg == train/Fungi/Fungi_3.jpg" in message
    assert "val/Aves/again.jpg == train/Aves/Aves_1.jpg" in message


def test_assert_no_leakage_on_a_carved_flat_split(image_folder):
    # copies inside one folder can be carved onto both sides of the split
    root = image_folder({"ants": 6, "bees": 6})
    for i in range(6):
        shutil.copy(root / f"ants/ants_{i}.jpg", root / f"ants/copy_{i}.jpg")
    split = make_split(root, seed=0)
    with pytest.raises(UserError, match="test images are identical"):
        assert_no_leakage(split)


def test_cli_check_data(nature_like):
    runner = CliRunner()
    clean = runner.invoke(app, ["check-data", str(nature_like)])
    assert clean.exit_code == 0, clean.output
    assert "ok, 0 warning(s)" in clean.output

    _defects(nature_like / "inaturalist_12K")
    bad = runner.invoke(app, ["check-data", str(nature_like)])
    assert bad.exit_code == 1
    assert "error:" in bad.output and "leak" in bad.output

    missing = runner.invoke(app, ["check-data", str(nature_like / "nope")])
    assert missing.exit_code == 2 and "no such directory" in missing.output


@pytest.mark.timeout(60)
def test_refused_images_are_listed_with_their_limit_not_counted(nature_like, named_pipe):
    """A 4 x 20,000,000 px PNG (146 KB, ~80 GB once resized) and a named pipe called x.jpg:
    neither is counted as a readable image, both are listed with why, nothing hangs."""
    base = nature_like / "inaturalist_12K"
    write_tall_png(base / "train/Aves/tall.png")
    named_pipe(base / "val/Fungi/x.jpg")
    report = check_data(nature_like)
    assert report.counts == {
        "train": {"Amphibia": 6, "Aves": 6, "Fungi": 6},
        "val": {"Amphibia": 2, "Aves": 2, "Fungi": 2},
    }
    reasons = {u.path: u.reason for u in report.unreadable}
    assert reasons["train/Aves/tall.png"].startswith(
        "over the image memory budget (4 x 20,000,000 px is 1:5,000,000; the limit is 1:50"
    )
    assert reasons["val/Fungi/x.jpg"] == "not a regular file (named pipe)"
    assert report.warnings == [
        "2 files are refused without decoding (over the pixel limit or the image memory "
        "budget, or not a regular file) and will be skipped"
    ]
    assert named_pipe.opened == []

    result = CliRunner().invoke(app, ["check-data", str(nature_like)])
    assert result.exit_code == 0, result.output
    assert "refused: train/Aves/tall.png: over the image memory budget" in result.output
    assert "refused: val/Fungi/x.jpg: not a regular file (named pipe)" in result.output
    assert "ok, 1 warning(s)" in result.output  # usable data, with the refusals reported
