"""Bad input: each case ends in a one-line error naming the thing and the fix, or a counted skip.

Cases already covered elsewhere (listed in docs/reliability.md): empty data dir, one class,
empty class folder, test classes not in train, junk and broken files (test_data.py); unknown
backbone/strategy, freeze_percent, unknown CLI option (test_training.py); bad config files
(test_config.py); bad checkpoints (test_checkpointing.py, test_resume.py).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY_TRAIN, make_class_folders, write_image, write_tall_png
from PIL import Image, ImageFile
from typer.testing import CliRunner

from inat_finetune.cli.main import app
from inat_finetune.data.datamodule import FineTuneDataModule
from inat_finetune.data.folders import DataSplit, make_split
from inat_finetune.errors import UserError, one_line
from inat_finetune.inference.evaluation import evaluate
from inat_finetune.models.backbones import IMAGENET_PREPROCESSING
from inat_finetune.training import run as training
from inat_finetune.training.config import load_config
from inat_finetune.training.run import train

TINY = dict(TINY_TRAIN)


def _odd_image(path: Path, kind: str, seed: int) -> None:
    """One of the image flavours scraped datasets hold, all named like ordinary photos."""
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8), "RGB")
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "cmyk":
        rgb.convert("CMYK").save(path, "JPEG")
    elif kind == "16bit":
        Image.fromarray(rng.integers(0, 65536, (40, 48), dtype=np.uint16)).save(path, "PNG")
    elif kind == "palette":
        rgb.convert("P").save(path, "PNG")
    elif kind == "palette_transparent":
        rgb.convert("P").save(path, "PNG", transparency=0)
    elif kind == "grayscale":
        rgb.convert("L").save(path, "JPEG")
    elif kind == "rgba":
        rgba = rgb.convert("RGBA")
        rgba.putalpha(Image.fromarray(rng.integers(0, 256, (40, 48), dtype=np.uint8)))
        rgba.save(path, "PNG")
    elif kind == "la":
        rgb.convert("LA").save(path, "PNG")
    elif kind == "bilevel":
        rgb.convert("1").save(path, "PNG")
    elif kind == "cmyk_tiff":
        rgb.convert("CMYK").save(path, "TIFF")


KINDS = ["cmyk", "16bit", "palette", "palette_transparent", "grayscale", "rgba", "la", "bilevel"]
KINDS += ["cmyk_tiff", "grayscale"]


def test_every_image_flavour_and_odd_names_train(tmp_path):
    """CMYK, 16-bit, palette, grayscale, alpha and 1-bit images, in folders and files whose
    names have spaces and non-ASCII letters: all are used, none skipped, and training works."""
    root = tmp_path / "données"
    for c, name in enumerate(["red ant", "épeire diadème"]):
        for i, kind in enumerate(KINDS):
            ext = (
                ".tif"
                if kind == "cmyk_tiff"
                else ".jpg"
                if kind in ("cmyk", "grayscale")
                else ".png"
            )
            _odd_image(root / name / f"photo {i} ü写真{ext}", kind, seed=100 * c + i)
    modes = {Image.open(p).mode for p in root.rglob("*.*")}
    assert {"CMYK", "I;16", "P", "L", "RGBA", "LA", "1"} <= modes
    cfg = load_config(None, data=str(root), output=str(tmp_path / "runs"), **TINY)
    result = train(cfg, progress=False)
    assert result.results["skipped_files"] == 0
    assert sum(result.results["num_images"].values()) == 2 * len(KINDS)
    assert math.isfinite(result.results["test_loss"])
    rows = (result.run_dir / "test_predictions.csv").read_text(encoding="utf-8")
    assert "ü写真" in rows and "épeire diadème" in rows


def test_images_over_the_pixel_limit_are_skipped_and_counted(image_folder, monkeypatch):
    root = image_folder({"a": 30, "b": 30})  # 48x40 = 1,920 pixels each
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)
    # Over the limit (PIL warns) and over twice the limit (PIL refuses), many at once: the
    # scan runs in threads, and none of them may slip through.
    for i in range(30):
        write_image(root / "a" / f"big_{i}.png", 1000 + i, size=(60, 50))
    write_image(root / "b" / "huge.png", 1, size=(100, 100))
    filters_before = list(warnings.filters)
    split = make_split(root)
    reasons = {s.path: s.reason for s in split.skipped}
    assert len(reasons) == 31
    assert set(reasons.values()) == {"over the pixel limit (2000 pixels)"}
    assert sum(sum(c.values()) for c in split.counts().values()) == 60
    assert warnings.filters == filters_before  # nothing leaked into the process


def test_too_elongated_images_are_skipped_and_counted_before_decoding(image_folder, monkeypatch):
    """A 146 KB PNG of 4 x 20,000,000 px is under the pixel limit, but resizing its short side
    to the network's size would take ~80 GB: the scan refuses it from its header alone."""
    root = image_folder({"a": 4, "b": 4})
    write_tall_png(root / "a" / "tall.png")
    write_image(root / "b" / "strip.png", 1, size=(357, 7))  # 1:51, just over the 1:50 limit
    write_image(root / "b" / "banner.png", 2, size=(350, 7))  # 1:50 is kept
    decoded: list[tuple[int, int]] = []
    real_load = ImageFile.ImageFile.load

    def recording_load(self):
        decoded.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", recording_load)
    split = make_split(root)
    reasons = {s.path: s.reason for s in split.skipped}
    assert reasons == {
        "a/tall.png": "over the image memory budget (4 x 20,000,000 px is 1:5,000,000; the "
        "limit is 1:50 long side to short side, which keeps resizing it under 1 GiB)",
        "b/strip.png": "over the image memory budget (357 x 7 px is 1:51; the limit is 1:50 "
        "long side to short side, which keeps resizing it under 1 GiB)",
    }
    assert sum(sum(c.values()) for c in split.counts().values()) == 9  # the 8 and the banner
    assert (4, 20_000_000) not in decoded and (357, 7) not in decoded  # never decoded
    assert (350, 7) in decoded  # the check really ran on the others
    assert split.summary()["skipped_by_reason"] == {"over the image memory budget": 2}


def test_train_and_prepare_skip_a_too_tall_image_and_say_so(image_folder, tmp_path):
    """Before the guard, train cached 240 MB for this 146 KB file and crashed when the test
    phase resized it; prepare stored it too."""
    root = image_folder({"a": 5, "b": 5})
    write_tall_png(root / "a" / "tall.png")
    cfg = load_config(None, data=str(root), output=str(tmp_path / "runs"), **TINY)
    result = train(cfg, progress=False)
    assert result.results["skipped_files"] == 1
    assert sum(result.results["num_images"].values()) == 10
    dataset = json.loads((result.run_dir / "dataset.json").read_text())
    assert dataset["skipped_by_reason"] == {"over the image memory budget": 1}

    prepared = CliRunner().invoke(
        app, ["prepare", "--data", str(root), "--size", "37", "--cache-dir", str(tmp_path / "c")]
    )
    assert prepared.exit_code == 0, prepared.output
    text = " ".join(prepared.output.split())  # the log line may wrap
    assert "Skipped 1 file (1 over the image memory budget)" in text
    assert "10 images: 10 prepared" in text


@pytest.mark.timeout(60)
def test_named_pipes_and_devices_are_skipped_without_opening_them(image_folder, named_pipe):
    """A named pipe called x.jpg would block whoever opens it until a writer comes."""
    root = image_folder({"a": 4, "b": 4})
    named_pipe(root / "a" / "x.jpg")
    (root / "b" / "null.png").symlink_to(os.devnull)  # a character device behind a link
    split = make_split(root)
    reasons = {s.path: s.reason for s in split.skipped}
    assert reasons == {
        "a/x.jpg": "not a regular file (named pipe)",
        "b/null.png": "not a regular file (character device)",
    }
    assert named_pipe.opened == []
    assert sum(sum(c.values()) for c in split.counts().values()) == 8


def test_an_image_gone_before_evaluate_is_reported_as_missing(image_folder, tmp_path):
    root = image_folder({"a": 6, "b": 6})
    cfg = load_config(None, data=str(root), output=str(tmp_path / "runs"), **TINY)
    run = train(cfg, progress=False).run_dir
    split = DataSplit.load(run / "split.json")
    gone = Path(split.root) / split.test["a"][0]
    gone.unlink()
    with pytest.raises(UserError) as info:
        evaluate(run, num_workers=0, progress=False)
    line = one_line(str(info.value))
    assert line.startswith(f"{gone}: no longer exists (it was there when the data was scanned)")
    assert "restore it, or scan the data again" in line
    assert "training" not in line and "decode" not in line

    cli = CliRunner().invoke(app, ["evaluate", str(run), "--num-workers", "0"])
    assert cli.exit_code == 2
    assert cli.output.strip() == f"error: {line}"


def test_symlink_loops_are_reported_and_not_followed(image_folder):
    root = image_folder({"a": 5, "b": 5})
    (root / "a" / "loop").symlink_to(root / "a", target_is_directory=True)  # to its parent
    (root / "b" / "up").symlink_to(root, target_is_directory=True)  # to the data root
    (root / "c").symlink_to(root, target_is_directory=True)  # a "class" that is the root
    split = make_split(root)
    assert split.classes == ["a", "b"]
    assert {s.path: s.reason for s in split.skipped} == {
        "a/loop": "symlinked folder, not followed",
        "b/up": "symlinked folder, not followed",
        "c": "symlink to a parent folder",
    }
    files = [f for part in (split.train, split.val, split.test) for v in part.values() for f in v]
    assert len(files) == len(set(files)) == 10


SCAN = """
import json, sys
from pathlib import Path
from inat_finetune.data.folders import scan_class_folders
root = Path(sys.argv[1])
found, skipped = scan_class_folders(root, root)
print(json.dumps({"found": found, "skipped": {s.path: s.reason for s in skipped}}))
"""


def test_unreadable_files_and_folders_are_counted(tmp_path):
    """chmod 000 on a file and on a sub-folder. Tests run as root here, which reads anything;
    the scan then runs without the two capabilities that let root ignore permissions (setpriv),
    so it meets the same EACCES an ordinary user would."""
    root = tmp_path / "data"
    make_class_folders(root, {"a": 3, "b": 3})
    write_image(root / "b" / "sub" / "hidden.jpg", 7)
    locked = [root / "a" / "a_0.jpg", root / "b" / "sub"]
    command = [sys.executable, "-c", SCAN, str(root)]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: permissions cannot be enforced")
        caps = "-dac_override,-dac_read_search"
        command = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}", *command]
    for path in locked:
        path.chmod(0)
    try:
        done = subprocess.run(
            command,
            env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        for path in locked:
            path.chmod(0o755)
    result = json.loads(done.stdout)
    assert result["skipped"] == {
        "a/a_0.jpg": "not readable (permission denied)",
        "b/sub": "folder not readable (Permission denied)",
    }
    assert result["found"] == {
        "a": ["a/a_1.jpg", "a/a_2.jpg"],
        "b": ["b/b_0.jpg", "b/b_1.jpg", "b/b_2.jpg"],
    }


def test_a_file_broken_after_the_scan_is_a_one_line_error_from_a_worker(image_folder):
    split = make_split(image_folder({"a": 6, "b": 6}))
    (Path(split.root) / split.train["a"][0]).write_bytes(b"gone bad")
    dm = FineTuneDataModule(split, IMAGENET_PREPROCESSING.at_size(32), 64, num_workers=1)
    with pytest.raises(UserError) as info:
        next(iter(dm.train_dataloader()))
    assert "Traceback" in str(info.value)  # how DataLoader re-raises a worker's error...
    line = one_line(str(info.value))  # ...and what the CLI prints of it
    assert line.startswith(f"{split.root}/{split.train['a'][0]}: could not be decoded (")
    assert "it changed after the data was scanned: replace it" in line
    assert "\n" not in line


@pytest.mark.parametrize(
    ("options", "warning"),
    [
        ({"batch_size": 64}, "--batch-size 64 is larger than the 10 training images"),
        # 10 images in batches of 3 leave a batch of 1: BatchNorm in training mode (this
        # strategy trains them) cannot take it; without the fix this was a ValueError.
        ({"batch_size": 3, "strategy": "freeze_except_bn_and_fc"}, "leave a last batch of 1"),
    ],
)
def test_awkward_batch_sizes_train_with_a_warning(tmp_path, caplog, options, warning):
    make_class_folders(tmp_path / "data", {"a": 8, "b": 8})  # 5 + 5 training images
    cfg = load_config(
        None, data=str(tmp_path / "data"), output=str(tmp_path), **{**TINY, **options}
    )
    result = train(cfg, progress=False, report=False)
    assert result.results["epochs"] == 1 and math.isfinite(result.results["test_loss"])
    assert warning in caplog.text


def test_accelerator_missing_on_this_machine_is_refused_early(tmp_path, monkeypatch):
    make_class_folders(tmp_path / "data", {"a": 4, "b": 4})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = str(tmp_path / "runs")
    result = CliRunner().invoke(
        app, ["train", "--data", str(tmp_path / "data"), "--output", out, "--accelerator", "cuda"]
    )
    assert result.exit_code == 2
    assert "--accelerator cuda: not available on this machine" in " ".join(result.output.split())
    assert not (tmp_path / "runs").exists()


def test_unexpected_errors_are_one_line_unless_verbose(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("something odd\nwith a second line")

    monkeypatch.setattr(training, "train", broken)
    args = ["train", "--data", str(tmp_path), "--recipe", "bn_head"]  # one run, not auto's
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    text = " ".join(result.output.split())
    assert "error: unexpected RuntimeError: something odd with a second line" in text
    assert "rerun with -v for the full traceback" in text and len(lines) <= 3  # wrapped, 1 line
    assert "Traceback" not in result.output
    verbose = CliRunner().invoke(app, ["-v", *args])
    assert verbose.exit_code == 1 and isinstance(verbose.exception, RuntimeError)
