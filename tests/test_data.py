"""Layout detection, junk filtering, splitting and transforms, on generated images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_class_folders, write_image
from PIL import Image

from inat_finetune.data.datamodule import (
    FineTuneDataModule,
    build_eval_transform,
    build_train_transform,
)
from inat_finetune.data.folders import DataSplit, detect_layout, make_split, split_stratified
from inat_finetune.data.images import load_image
from inat_finetune.errors import UserError
from inat_finetune.models.backbones import IMAGENET_PREPROCESSING

PRE = IMAGENET_PREPROCESSING.at_size(32)


def _all_files(split: DataSplit, name: str) -> list[str]:
    return [f for files in getattr(split, name).values() for f in files]


def test_nature12k_layout_val_is_the_test_set(nature_like):
    layout = detect_layout(nature_like)
    assert layout.kind == "nature12k"
    assert layout.root.name == "inaturalist_12K"
    assert layout.test_dir.name == "val" and layout.val_dir is None
    assert detect_layout(nature_like / "inaturalist_12K").kind == "nature12k"
    split = make_split(nature_like, seed=0)
    assert split.classes == ["Amphibia", "Aves", "Fungi"]
    assert split.counts() == {
        "train": {"Amphibia": 5, "Aves": 5, "Fungi": 5},
        "val": {"Amphibia": 1, "Aves": 1, "Fungi": 1},
        "test": {"Amphibia": 2, "Aves": 2, "Fungi": 2},
    }
    assert all(f.startswith("val/") for f in _all_files(split, "test"))
    # every .DS_Store is counted, none is an image
    assert sorted(s.path for s in split.skipped) == ["train/.DS_Store", "val/Aves/.DS_Store"]


def test_layouts_train_test_and_train_val_test(tmp_path):
    make_class_folders(tmp_path / "a" / "train", {"x": 5, "y": 5})
    make_class_folders(tmp_path / "a" / "test", {"x": 2, "y": 2}, seed=1)
    assert detect_layout(tmp_path / "a").kind == "train_test"
    make_class_folders(tmp_path / "b" / "train", {"x": 5, "y": 5})
    make_class_folders(tmp_path / "b" / "val", {"x": 1, "y": 1}, seed=1)
    make_class_folders(tmp_path / "b" / "test", {"x": 2, "y": 2}, seed=2)
    layout = detect_layout(tmp_path / "b")
    assert layout.kind == "train_val_test"
    split = make_split(tmp_path / "b")
    assert split.counts()["train"] == {"x": 5, "y": 5}  # nothing carved out: val/ is given
    assert split.counts()["val"] == {"x": 1, "y": 1}
    assert split.counts()["test"] == {"x": 2, "y": 2}


def test_flat_layout_is_split_three_ways_stratified(image_folder):
    root = image_folder({"a": 20, "b": 10, "c": 5})
    split = make_split(root, seed=3, val_fraction=0.2, test_fraction=0.2)
    assert split.layout == "flat"
    counts = split.counts()
    assert counts["test"] == {"a": 4, "b": 2, "c": 1}
    assert counts["val"] == {"a": 3, "b": 2, "c": 1}
    assert counts["train"] == {"a": 13, "b": 6, "c": 3}
    files = [_all_files(split, s) for s in ("train", "val", "test")]
    assert sum(map(len, files)) == len(set().union(*map(set, files))) == 35  # disjoint, complete


def test_split_is_deterministic_and_seed_dependent(image_folder):
    root = image_folder({"a": 30, "b": 30})
    first, again, other = (
        make_split(root, seed=1),
        make_split(root, seed=1),
        make_split(root, seed=2),
    )
    assert first.val == again.val and first.train == again.train
    assert first.val != other.val


def test_split_of_one_class_does_not_move_when_another_class_grows():
    base = {"a": [f"a/{i}.jpg" for i in range(50)], "b": [f"b/{i}.jpg" for i in range(50)]}
    grown = {"a": base["a"], "b": base["b"] + [f"b/new{i}.jpg" for i in range(10)]}
    assert split_stratified(base, 0.2, 7)[1]["a"] == split_stratified(grown, 0.2, 7)[1]["a"]


def test_split_json_round_trip(image_folder, tmp_path):
    split = make_split(image_folder({"a": 6, "b": 6}))
    split.save(tmp_path / "split.json")
    assert DataSplit.load(tmp_path / "split.json") == split


def test_junk_is_skipped_and_counted(image_folder):
    root = image_folder({"ants": 6, "bees": 6})
    (root / ".DS_Store").write_bytes(b"Bud1")
    (root / "ants" / "empty.jpg").write_bytes(b"")
    (root / "ants" / "notes.txt").write_text("hello")
    (root / "bees" / "fake.jpg").write_text("this is not a JPEG")
    good = root / "bees" / "bees_0.jpg"
    (root / "bees" / "truncated.jpg").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    Image.new("RGB", (30, 30), "red").save(root / "ants" / "imageNotFound.gif")
    (root / "__MACOSX" / "ants").mkdir(parents=True)
    (root / "__MACOSX" / "ants" / "._x.jpg").write_bytes(b"\x00")
    split = make_split(root)
    reasons = {s.path: s.reason for s in split.skipped}
    assert set(reasons) == {
        ".DS_Store",
        "ants/empty.jpg",
        "ants/notes.txt",
        "ants/imageNotFound.gif",
        "bees/fake.jpg",
        "bees/truncated.jpg",
    }
    assert reasons["ants/empty.jpg"] == "empty file"
    assert reasons["ants/imageNotFound.gif"].startswith("not an image file")
    assert reasons["bees/truncated.jpg"].startswith("does not decode")
    assert sum(sum(c.values()) for c in split.counts().values()) == 12
    assert split.summary()["skipped_total"] == 6


def test_hymenoptera_placeholder_gif_is_not_a_training_image():
    from conftest import HYMENOPTERA, require_shared

    split = make_split(require_shared(HYMENOPTERA))
    assert [s.path for s in split.skipped] == ["train/ants/imageNotFound.gif"]
    assert split.counts()["test"] == {"ants": 70, "bees": 83}
    assert sum(split.counts()["train"].values()) + sum(split.counts()["val"].values()) == 244


def test_test_classes_missing_from_train_are_an_error(tmp_path):
    make_class_folders(tmp_path / "train", {"x": 3, "y": 3})
    make_class_folders(tmp_path / "val", {"x": 1, "y": 1, "z": 1}, seed=1)
    with pytest.raises(UserError, match=r"classes \['z'\] are not in"):
        make_split(tmp_path)


def test_empty_class_folder_is_an_error(image_folder):
    root = image_folder({"a": 3, "b": 3})
    (root / "c").mkdir()
    (root / "c" / ".DS_Store").write_bytes(b"Bud1")
    with pytest.raises(UserError, match=r"class folders \['c'\] hold no readable images"):
        make_split(root)


def test_other_bad_roots_are_clear_errors(tmp_path, image_folder):
    with pytest.raises(UserError, match="no such directory"):
        make_split(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no class folders found"):
        make_split(tmp_path / "empty")
    with pytest.raises(UserError, match="at least two"):
        make_split(image_folder({"only": 5}, sub="one"))
    make_class_folders(tmp_path / "t" / "train", {"x": 3, "y": 3})
    with pytest.raises(UserError, match="train/ but no val/ or test/"):
        make_split(tmp_path / "t")


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16"])
def test_load_image_returns_rgb_for_any_mode(tmp_path, mode):
    path = tmp_path / f"img_{mode.replace(';', '')}.{'tif' if mode in ('CMYK', 'I;16') else 'png'}"
    if mode == "I;16":
        Image.fromarray(np.arange(48 * 40, dtype=np.uint16).reshape(40, 48) * 30).save(path)
    else:
        write_image(path, 1, mode=mode)
    assert Image.open(path).mode == mode
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (48, 40)
    assert np.asarray(image).std() > 0


def test_eval_transform_is_deterministic_and_train_transform_augments(tmp_path):
    image = load_image(write_image(tmp_path / "x.jpg", 5, size=(64, 48)))
    evaluate = build_eval_transform(PRE)
    a, b = evaluate(image), evaluate(image)
    assert a.shape == (3, 32, 32) and torch.equal(a, b)
    torch.manual_seed(0)
    augmented = [build_train_transform(PRE)(image) for _ in range(3)]
    assert augmented[0].shape == (3, 32, 32)
    assert not torch.equal(augmented[0], augmented[1])
    assert torch.equal(build_train_transform(PRE, augment=False)(image), a)


def test_only_the_training_subset_is_augmented(image_folder):
    split = make_split(image_folder({"a": 10, "b": 10}))
    dm = FineTuneDataModule(split, PRE, batch_size=4, num_workers=0)
    for name in ("val", "test"):
        dataset = dm.dataset(name)
        assert torch.equal(dataset[0][0], dataset[0][0])
    train = dm.dataset("train")
    torch.manual_seed(1)
    assert not torch.equal(train[0][0], train[0][0])


def test_datamodule_batches_and_labels(image_folder):
    split = make_split(image_folder({"a": 10, "b": 10}))
    dm = FineTuneDataModule(split, PRE, batch_size=64, num_workers=0)
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (
        len(split.samples("train")),
        3,
        32,
        32,
    )  # batch larger than data is fine
    assert set(labels.tolist()) == {0, 1}


@pytest.mark.parametrize("augment", [False, True])
def test_uint8_batches_normalised_on_the_device_equal_images_normalised_in_the_workers(
    image_folder, augment
):
    split = make_split(image_folder({"a": 6, "b": 6}))
    on_device = FineTuneDataModule(split, PRE, batch_size=4, num_workers=0, augment=augment)
    in_workers = FineTuneDataModule(
        split, PRE, batch_size=4, num_workers=0, augment=augment, normalise_on_device=False
    )
    for name in ("train", "val", "test"):
        handed, expected = (getattr(dm, f"{name}_dataloader")() for dm in (on_device, in_workers))
        for (images, labels), (want, want_labels) in zip(handed, expected, strict=True):
            assert images.dtype == torch.uint8 and want.dtype == torch.float32
            images, labels = on_device.on_after_batch_transfer((images, labels))
            assert torch.equal(images, want) and torch.equal(labels, want_labels), name
    # Batches that are already floats (stored features, random erasing) pass untouched.
    floats = torch.randn(2, 3, 4, 4)
    assert on_device.on_after_batch_transfer((floats, labels))[0] is floats


def test_dataset_paths_with_spaces_and_non_ascii(tmp_path):
    make_class_folders(tmp_path / "d", {"épeire diadème": 4, "red ant": 4})
    split = make_split(tmp_path / "d")
    assert split.classes == ["red ant", "épeire diadème"]
    path, label = split.samples("train")[0]
    assert Path(path).is_file() and label == 0


def test_normalisation_in_one_step_equals_torchvisions_three():
    from PIL import Image as PILImage
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    from inat_finetune.data.datamodule import ToNormalisedFloat

    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    reference = v2.Compose(
        [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    )
    fused = ToNormalisedFloat(mean, std)
    pixels = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8)
    for image in (
        tv_tensors.Image(pixels),  # prepared images
        PILImage.fromarray(pixels.permute(1, 2, 0).numpy()),  # decoded photos
        pixels.float() / 255,  # a float image in [0, 1]
    ):
        before = image.clone() if isinstance(image, torch.Tensor) else None
        out = fused(image)
        assert out.dtype == torch.float32 and out.shape == (3, 20, 30)
        assert torch.allclose(out, reference(image), atol=2e-6)
        if before is not None:  # the input is left as it was
            assert torch.equal(image, before)
    # Its repr is part of the feature cache key: it must name the values.
    assert repr(fused) == f"ToNormalisedFloat(mean={mean}, std={std})"
