"""Figures drawn from run directories built by hand (no training): written, sized, not blank."""

from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import make_class_folders
from PIL import Image
from typer.testing import CliRunner

from inat_finetune.cli.main import app
from inat_finetune.data.folders import DataSplit, SkippedFile
from inat_finetune.errors import UserError
from inat_finetune.reporting import plots
from inat_finetune.runfiles import write_json_atomic
from inat_finetune.training.config import TrainConfig

CLASSES = ("ants", "bees")
# Solid colours far from red, so every strongly red pixel in a prediction grid is a mistake mark.
SOLID = {"ants": (70, 90, 160), "bees": (200, 190, 90)}


def _solid_images(root: Path, counts: dict[str, int]) -> None:
    for name, count in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.new("RGB", (40, 32), SOLID[name]).save(root / name / f"{name}_{i}.png")


def make_run_dir(
    base: Path,
    name: str = "run",
    wrong: frozenset[int] = frozenset({1, 4}),
    classes: tuple[str, ...] = CLASSES,
    solid: bool = False,
    strategy: str = "freeze_last",
    accs: tuple[float, float] = (0.8, 0.7),
) -> Path:
    """A run directory as `train` writes it, over tiny generated images: 4 train, 1 validation and
    4 test images per class; test images whose index is in ``wrong`` are predicted as another class."""
    data = base / f"{name}-data"
    counts = {c: 9 for c in classes}
    if solid:
        _solid_images(data, counts)
    else:
        make_class_folders(data, counts)
    files = {c: sorted(f"{c}/{p.name}" for p in (data / c).iterdir()) for c in classes}
    split = DataSplit(
        root=str(data.resolve()),
        layout="flat",
        classes=list(classes),
        seed=42,
        val_fraction=0.2,
        test_fraction=0.2,
        train={c: files[c][:4] for c in classes},
        val={c: files[c][4:5] for c in classes},
        test={c: files[c][5:] for c in classes},
        skipped=[SkippedFile(f"{classes[0]}/.DS_Store", "not an image file (no extension)")],
    )
    run = base / name
    run.mkdir(parents=True)
    split.save(run / "split.json")
    write_json_atomic(run / "dataset.json", split.summary())
    config = TrainConfig(data=str(data), backbone="mobilenet_v2", strategy=strategy, epochs=3)
    (run / "config.yaml").write_text(yaml.safe_dump(config.to_yaml_dict(), sort_keys=False))
    train_acc, val_acc = accs
    (run / "metrics.csv").write_text(
        "epoch,step,test/acc,test/loss,train/acc,train/loss,val/acc,val/loss\n"
        f"0,1,,,,,{val_acc - 0.2},0.9\n0,1,,,{train_acc - 0.3},1.1,,\n"
        f"1,3,,,,,{val_acc},0.6\n1,3,,,{train_acc - 0.1},0.7,,\n"
        f"2,5,,,,,{val_acc - 0.05},0.65\n2,5,,,{train_acc},0.5,,\n"
        "3,6,0.75,0.6,,,,\n"
    )
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["path", "true", "predicted", "confidence", *(f"p_{c}" for c in classes)])
    k = len(classes)
    confusion = [[0] * k for _ in range(k)]
    for index, (image, label) in enumerate(split.samples("test")):
        predicted = (label + 1) % k if index in wrong else label
        confidence = 0.6 + 0.05 * (index % 8)
        probs = [(1 - confidence) / (k - 1)] * k
        probs[predicted] = confidence
        confusion[label][predicted] += 1
        writer.writerow(
            [
                image.relative_to(split.root).as_posix(),
                classes[label],
                classes[predicted],
                f"{confidence:.6f}",
                *(f"{p:.6f}" for p in probs),
            ]
        )
    (run / "test_predictions.csv").write_text(buffer.getvalue())
    total = sum(map(sum, confusion))
    write_json_atomic(
        run / "results.json",
        {
            "backbone": "mobilenet_v2",
            "strategy": strategy,
            "trainable_params": 2562,
            "total_params": 2226434,
            "epochs": 3,
            "best_epoch": 1,
            "final_train_acc": train_acc,
            "best_val_acc": val_acc,
            "test_acc": sum(confusion[i][i] for i in range(k)) / total,
            "per_class_test_acc": {
                c: confusion[i][i] / sum(confusion[i]) for i, c in enumerate(classes)
            },
            "confusion_matrix": confusion,
            "class_names": list(classes),
            "num_images": {"train": 4 * k, "val": k, "test": 4 * k},
            "skipped_files": 1,
            "train_time_s": 12.5,
            "test_time_s": 1.5,
            "accelerator": "cpu",
            "precision": "32-true",
            "channels_last": False,
        },
    )
    return run


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(int)


def assert_picture(path: Path, size: tuple[int, int]) -> None:
    """Written, the expected pixel size, and not blank (varied pixels, several colours)."""
    assert path.is_file(), path
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == size, f"{path.name}: {image.size} != {size}"
    array = pixels(path)
    assert array.std() > 10, f"{path.name} looks blank"
    assert len(np.unique(array.reshape(-1, 3), axis=0)) >= 8, f"{path.name} has too few colours"


def red_pixels(path: Path) -> int:
    array = pixels(path)
    r, g, b = array[..., 0], array[..., 1], array[..., 2]
    return int(((r > 170) & (g < 60) & (b < 60)).sum())


def test_make_run_figures_writes_every_figure_at_its_size(tmp_path: Path) -> None:
    run = make_run_dir(tmp_path)
    figures = plots.make_run_figures(run)
    expected = {
        "curves": (1200, 450),
        "confusion": (950, 510),
        "per_class_accuracy": (900, 300),
        # 8 test images: 6 columns x 2 rows of 2.1 x 2.5 inch tiles plus a title strip
        "prediction_grid": (1260, 550),
        # 2 mistakes: 2 tiles in one row
        "confident_mistakes": (420, 300),
        # 4 training images of the class: one row of 1.8 inch tiles
        "class_samples": (720, 230),
    }
    assert set(figures) == set(expected)
    for name, size in expected.items():
        assert figures[name] == run / "figures" / f"{name}.png"
        assert_picture(figures[name], size)
    # No temporary files are left next to the figures (atomic writes).
    assert sorted(p.name for p in (run / "figures").iterdir()) == sorted(
        f"{n}.png" for n in expected
    )


def test_confusion_grows_with_the_number_of_classes(tmp_path: Path) -> None:
    classes = tuple(f"class_{i:02d}_with_a_long_name" for i in range(12))
    run = make_run_dir(tmp_path, classes=classes)
    side = 0.5 * 12 + 2.5
    assert_picture(
        plots.plot_confusion(run), (round((2 * side + 0.5) * 100), round((side + 0.6) * 100))
    )
    assert_picture(plots.plot_per_class_accuracy(run), (900, round((0.45 * 12 + 1.5) * 100)))


def test_prediction_grid_marks_mistakes_in_red(tmp_path: Path) -> None:
    all_right = make_run_dir(tmp_path, "right", wrong=frozenset(), solid=True)
    one_wrong = make_run_dir(tmp_path, "wrong", wrong=frozenset({2}), solid=True)
    right_png = plots.plot_prediction_grid(all_right)
    wrong_png = plots.plot_prediction_grid(one_wrong)
    assert red_pixels(right_png) == 0
    # A 5-point red frame around a ~200 px tile alone is thousands of pixels.
    assert red_pixels(wrong_png) > 2000
    # Every confident-mistake tile is a mistake, so it is framed in red too.
    assert red_pixels(plots.plot_confident_mistakes(one_wrong)) > 2000


def test_photo_tiles_show_the_photos_and_survive_a_moved_dataset(tmp_path: Path) -> None:
    run = make_run_dir(tmp_path, wrong=frozenset({2}), solid=True)
    array = pixels(plots.plot_prediction_grid(run))
    # Each photo is pasted whole: a 194 px square of its solid colour per tile (8 tiles).
    solid = sum(int((array == colour).all(axis=-1).sum()) for colour in SOLID.values())
    assert solid >= 8 * 190 * 190
    shutil.rmtree(tmp_path / "run-data")
    moved = plots.plot_prediction_grid(run, out=tmp_path / "moved.png")
    assert_picture(moved, (1260, 550))
    array = pixels(moved)
    assert not any((array == colour).all(axis=-1).any() for colour in SOLID.values())
    assert int((array == 0xDD).all(axis=-1).sum()) >= 8 * 180 * 180  # grey placeholders
    assert red_pixels(moved) > 2000  # the mistake is still framed


def test_prediction_grid_is_seeded(tmp_path: Path) -> None:
    run = make_run_dir(tmp_path)
    first = plots.plot_prediction_grid(run, n=3, seed=1, out=tmp_path / "a.png").read_bytes()
    again = plots.plot_prediction_grid(run, n=3, seed=1, out=tmp_path / "b.png").read_bytes()
    other = plots.plot_prediction_grid(run, n=3, seed=2, out=tmp_path / "c.png").read_bytes()
    assert first == again
    assert first != other
    assert_picture(tmp_path / "a.png", (630, 300))


def test_no_mistakes_still_gives_a_picture(tmp_path: Path) -> None:
    run = make_run_dir(tmp_path, wrong=frozenset())
    path = plots.plot_confident_mistakes(run)
    with Image.open(path) as image:
        assert image.size == (600, 150)
    assert pixels(path).std() > 5


def test_class_samples_from_a_split_and_from_a_folder(tmp_path: Path) -> None:
    run = make_run_dir(tmp_path)
    split = DataSplit.load(run / "split.json")
    out = plots.plot_class_samples(split, "test", "bees", n=3, seed=0, out=tmp_path / "s.png")
    assert_picture(out, (540, 230))
    # More images asked for than the class has: all of them, in one row.
    out = plots.plot_class_samples(run, "train", "ants", n=50, out=tmp_path / "all.png")
    assert_picture(out, (720, 230))
    # A plain folder of class folders is split the way `train` splits it.
    folder = tmp_path / "folder"
    make_class_folders(folder, {"cats": 5, "dogs": 5})
    out = plots.plot_class_samples(folder, n=2, seed=3, out=tmp_path / "f.png")
    assert_picture(out, (360, 230))
    # The random class is seeded and one of the classes.
    assert plots.choose_class(["a", "b", "c"], None, 7) == plots.choose_class(
        ["a", "b", "c"], None, 7
    )
    assert {plots.choose_class(["a", "b", "c"], None, s) for s in range(20)} == {"a", "b", "c"}


def test_bad_input_is_one_clear_error(tmp_path: Path) -> None:
    run = make_run_dir(tmp_path)
    with pytest.raises(UserError, match="--class wasps.*ants, bees"):
        plots.plot_class_samples(run, class_name="wasps", out=tmp_path / "x.png")
    with pytest.raises(UserError, match="--split"):
        plots.plot_class_samples(run, split="holdout", out=tmp_path / "x.png")
    (run / "metrics.csv").unlink()
    with pytest.raises(UserError, match="metrics.csv"):
        plots.plot_curves(run)
    # A run that lacks an input loses that figure only.
    assert "curves" not in plots.make_run_figures(run)
    assert "confusion" in plots.make_run_figures(run)


def test_comparison_bar_chart(tmp_path: Path) -> None:
    rows = []
    for strategy, val in (("freeze_last", 0.6), ("freeze_k_percent", 0.9), ("none", 0.7)):
        run = make_run_dir(tmp_path / "runs", strategy, strategy=strategy)
        rows.append(
            {
                "strategy": strategy,
                "run_dir": str(run.relative_to(tmp_path)),
                "train_acc": 0.95,
                "val_acc": val,
                "test_acc": 0.8,
                "trainable_params": 10,
                "total_params": 100,
                "wall_time_s": 3.0,
            }
        )
    write_json_atomic(
        tmp_path / "comparison.json",
        {"rows": rows, "best_strategy": "freeze_k_percent", "selected_by": "val_acc"},
    )
    assert_picture(plots.plot_comparison(tmp_path), (870, 500))
    # The selected strategy's label is drawn in its own colour (#c44e52) under its bars.
    array = pixels(tmp_path / "figures" / "comparison.png")
    assert (np.abs(array - (196, 78, 82)).sum(axis=-1) < 40).sum() > 20
    # A bare list of rows is accepted too.
    write_json_atomic(tmp_path / "comparison.json", rows)
    assert plots.load_comparison(tmp_path)["rows"] == rows


def test_show_command(tmp_path: Path) -> None:
    folder = tmp_path / "folder"
    make_class_folders(folder, {"cats": 6, "dogs": 6})
    runner = CliRunner()
    target = tmp_path / "cats.png"
    result = runner.invoke(
        app, ["show", "--data", str(folder), "--class", "cats", "-n", "3", "--output", str(target)]
    )
    assert result.exit_code == 0, result.output
    assert_picture(target, (540, 230))
    result = runner.invoke(app, ["show", "--data", str(folder), "--class", "owls"])
    assert result.exit_code == 2
    assert "--class owls" in result.output
