"""Exported ONNX and TorchScript models compute what the checkpoint computes, at any batch size."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ModuleTempFactory

from inat_finetune.errors import UserError
from inat_finetune.inference.evaluation import load_checkpoint
from inat_finetune.inference.export import TOLERANCE, default_output_dir, export
from inat_finetune.models.backbones import get_model
from inat_finetune.models.checkpoints import CARD_KEY

CLASSES = ["Amphibia", "Aves", "Fungi"]
IMG_SIZE = 32  # small inputs keep resnet50 quick on 2 cores; the graph is the same at 224


def write_checkpoint(path: Path, backbone: str, weights: str, img_size: int = IMG_SIZE) -> Path:
    """A checkpoint in FineTuneModule's layout, without training (weights as built)."""
    torch.manual_seed(0)
    built = get_model(backbone, num_classes=len(CLASSES), weights=weights)
    pre = built.preprocessing.at_size(img_size)
    card = {
        "backbone": backbone,
        "source_weights": built.weights,
        "class_names": CLASSES,
        "head": built.head,
        "preprocessing": pre.to_dict(),
        "strategy": "none",
    }
    state = {f"model.{k}": v for k, v in built.model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state, CARD_KEY: card}, path)
    return path


@pytest.fixture(scope="module")
def checkpoints(module_tmp_factory: ModuleTempFactory) -> dict[str, Path]:
    root = module_tmp_factory.mktemp("export_ckpts")
    return {
        # resnet50 from random init: no download needed; mobilenet_v2 with its real ImageNet
        # weights (installed offline), so its features and logits are realistic.
        "resnet50": write_checkpoint(
            root / "resnet50" / "checkpoints" / "best.ckpt", "resnet50", "none"
        ),
        "mobilenet_v2": write_checkpoint(root / "mobilenet_v2.ckpt", "mobilenet_v2", "DEFAULT"),
    }


def run_exported(fmt: str, model_path: Path, batch: torch.Tensor) -> torch.Tensor:
    """Run the exported file the way another program would: from the file alone."""
    if fmt == "onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        (logits,) = session.run(["logits"], {"images": batch.numpy()})
        return torch.from_numpy(logits)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = torch.jit.load(str(model_path))
    with torch.inference_mode():
        return loaded(batch)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("backbone", ["resnet50", "mobilenet_v2"])
def test_export_matches_pytorch_at_any_batch_size(
    checkpoints: dict[str, Path], tmp_path: Path, backbone: str, fmt: str
) -> None:
    ckpt = checkpoints[backbone]
    result = export(ckpt, format=fmt, out_dir=tmp_path / "out")
    assert result.model_path == tmp_path / "out" / ("model.onnx" if fmt == "onnx" else "model.pt")
    assert result.model_path.stat().st_size > 1_000_000
    assert 0 <= result.max_abs_diff < TOLERANCE

    model, card = load_checkpoint(ckpt)
    generator = torch.Generator().manual_seed(1)
    for batch_size in (1, 3):  # traced / exported with a batch of 2: the batch must be free
        batch = torch.randn(batch_size, 3, IMG_SIZE, IMG_SIZE, generator=generator)
        with torch.inference_mode():
            expected = model(batch)
        got = run_exported(fmt, result.model_path, batch)
        assert got.shape == (batch_size, len(CLASSES))
        diff = float((got - expected).abs().max())
        assert diff < TOLERANCE, f"{backbone} {fmt} batch {batch_size}: max abs diff {diff}"
        # Guard against a vacuous comparison: the logits must actually differ between images.
        if batch_size > 1:
            assert float(expected.std(dim=0).max()) > 1e-3


def test_preprocessing_json_describes_the_input(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    result = export(checkpoints["mobilenet_v2"], format="onnx", out_dir=tmp_path)
    spec = json.loads(result.preprocessing_path.read_text())
    _, card = load_checkpoint(checkpoints["mobilenet_v2"])
    pre = card["preprocessing"]
    assert result.preprocessing_path == tmp_path / "preprocessing.json"
    assert spec["format"] == "onnx" and spec["model_file"] == "model.onnx"
    assert spec["backbone"] == "mobilenet_v2"
    assert spec["class_names"] == CLASSES
    assert spec["input_size"] == IMG_SIZE == pre["crop_size"]
    assert spec["input_shape"] == ["batch", 3, IMG_SIZE, IMG_SIZE]
    assert spec["resize_size"] == pre["resize_size"] == 37  # 32 * 256/224, rounded
    assert spec["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert spec["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert spec["interpolation"] == "bilinear"
    assert spec["input_name"] == "images" and spec["output_name"] == "logits"
    assert spec["max_abs_diff_vs_pytorch"] == pytest.approx(result.max_abs_diff)

    # The recipe in the JSON, followed with numpy and PIL only, feeds the ONNX model the same
    # tensor as the package's own preprocessing: another runtime can really use it.
    from PIL import Image

    from inat_finetune.inference.predict import Predictor

    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8))
    photo_path = tmp_path / "photo.png"
    photo.save(photo_path)
    scale = spec["resize_size"] / min(photo.size)
    resized = photo.resize(
        (round(photo.width * scale), round(photo.height * scale)), Image.Resampling.BILINEAR
    )
    left = int(round((resized.width - spec["input_size"]) / 2))
    top = int(round((resized.height - spec["input_size"]) / 2))
    crop = resized.crop((left, top, left + spec["input_size"], top + spec["input_size"]))
    array = (np.asarray(crop, dtype=np.float32) / 255 - spec["mean"]) / spec["std"]
    theirs = torch.from_numpy(array.transpose(2, 0, 1).astype(np.float32))[None]
    ours = Predictor.from_checkpoint(checkpoints["mobilenet_v2"]).load(photo_path)[None]
    assert float((theirs - ours).abs().max()) < 0.05  # resampler rounding only
    logits_theirs = run_exported("onnx", result.model_path, theirs)
    logits_ours = run_exported("onnx", result.model_path, ours)
    assert logits_theirs.argmax() == logits_ours.argmax()


def test_default_output_dir_is_the_runs_export_folder(checkpoints: dict[str, Path]) -> None:
    ckpt = checkpoints["resnet50"]  # <run>/checkpoints/best.ckpt
    assert default_output_dir(ckpt) == ckpt.parent.parent / "export"
    assert default_output_dir(Path("/x/model.ckpt")) == Path("/x/export")


def test_unknown_format_is_a_user_error(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--format tflite: use one of onnx, torchscript"):
        export(checkpoints["mobilenet_v2"], format="tflite", out_dir=tmp_path)
    assert not any(tmp_path.iterdir())


def test_cli_export_writes_the_model_and_reports_the_check(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from inat_finetune.cli.main import app

    out = tmp_path / "exported"
    args = ["export", str(checkpoints["mobilenet_v2"]), "--format", "torchscript"]
    result = CliRunner().invoke(app, [*args, "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "max abs difference on logits" in result.output
    assert (out / "model.pt").is_file() and (out / "preprocessing.json").is_file()

    bad = CliRunner().invoke(app, ["export", str(checkpoints["mobilenet_v2"]), "--format", "tf"])
    assert bad.exit_code == 2
    assert "--format tf: use one of onnx, torchscript" in bad.output


# ---------------------------------------------------------------------------------------------
# Interoperable exports: a file as --output, ONNX metadata, safetensors for load() and timm


@pytest.fixture(scope="module")
def lite0_run(module_tmp_factory: ModuleTempFactory) -> Path:
    """A real 1-epoch run of timm's tf_efficientnet_lite0 (offline weights) at 64 px."""
    from conftest import TINY_TRAIN, make_class_folders

    from inat_finetune.training.config import load_config
    from inat_finetune.training.run import train

    base = module_tmp_factory.mktemp("lite0_run")
    for split, count, seed in (("train", 4, 1), ("val", 2, 2), ("test", 2, 3)):
        make_class_folders(base / "data" / split, dict.fromkeys(CLASSES, count), seed=seed)
    options = {**TINY_TRAIN, "backbone": "tf_efficientnet_lite0", "img_size": 64}
    config = load_config(None, data=str(base / "data"), output=str(base / "runs"), **options)
    return Path(train(config, progress=False, report=False).run_dir)


def test_onnx_file_output_carries_class_names_and_preprocessing(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    import onnx
    import onnxruntime as ort

    target = tmp_path / "model.onnx"
    result = export(checkpoints["mobilenet_v2"], format="onnx", output=target)
    assert result.model_path == target and target.is_file()  # the file itself, not a folder
    assert result.preprocessing_path == tmp_path / "model.preprocessing.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.preprocessing.json"]
    spec = json.loads(result.preprocessing_path.read_text())
    assert spec["model_file"] == "model.onnx"

    # What any ONNX runtime reads back from the model file alone.
    meta = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    found = meta.get_modelmeta().custom_metadata_map
    assert json.loads(found["class_names"]) == CLASSES
    pre = json.loads(found["preprocessing"])
    assert pre["input_size"] == IMG_SIZE and pre["resize_size"] == 37
    assert pre["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert pre["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert pre["interpolation"] == "bilinear" and pre["input_name"] == "images"
    assert found["backbone"] == "mobilenet_v2"
    props = {p.key: p.value for p in onnx.load(str(target)).metadata_props}
    assert props == found

    model, _ = load_checkpoint(checkpoints["mobilenet_v2"])
    batch = torch.randn(3, 3, IMG_SIZE, IMG_SIZE, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        expected = model(batch)
    assert float((run_exported("onnx", target, batch) - expected).abs().max()) < TOLERANCE


def test_torchscript_file_output(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    target = tmp_path / "nested" / "classifier.pt"
    result = export(checkpoints["mobilenet_v2"], format="torchscript", output=target)
    assert result.model_path == target and target.is_file()
    assert result.preprocessing_path == target.with_name("classifier.preprocessing.json")
    model, _ = load_checkpoint(checkpoints["mobilenet_v2"])
    batch = torch.randn(2, 3, IMG_SIZE, IMG_SIZE, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        expected = model(batch)
    assert float((run_exported("torchscript", target, batch) - expected).abs().max()) < TOLERANCE


@pytest.mark.parametrize(
    ("fmt", "name", "message"),
    [
        ("onnx", "model.pt", "a .pt file is for --format torchscript, but --format is onnx"),
        (
            "torchscript",
            "model.onnx",
            "a .onnx file is for --format onnx, but --format is torchscript",
        ),
        (
            "safetensors",
            "model.onnx",
            "but --format is safetensors; pass --format onnx, or name a folder",
        ),
        ("safetensors", "model.safetensors", "--format safetensors writes a folder"),
        ("onnx", "old.onnx/", "is a folder, but a .onnx path names the model file itself"),
    ],
)
def test_output_that_does_not_fit_the_format_is_refused_before_the_work(
    checkpoints: dict[str, Path], tmp_path: Path, fmt: str, name: str, message: str
) -> None:
    from typer.testing import CliRunner

    from inat_finetune.cli.main import app

    target = tmp_path / name.rstrip("/")
    if name.endswith("/"):
        target.mkdir()  # an earlier export's folder named like a file
    with pytest.raises(UserError, match=message.replace(".", r"\.")):
        export(checkpoints["mobilenet_v2"], format=fmt, output=target)
    args = ["export", str(checkpoints["mobilenet_v2"]), "--format", fmt, "--output", str(target)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and message in " ".join(result.output.split())
    assert f"--output {target}" in " ".join(result.output.split())
    assert not target.exists() or list(target.iterdir()) == []  # nothing was written


def test_safetensors_folder_loads_with_load_and_gives_the_checkpoints_logits(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    from inat_finetune import load

    ckpt = checkpoints["mobilenet_v2"]  # torchvision: this package's section only
    result = export(ckpt, format="safetensors", output=tmp_path / "st")
    assert result.model_path == tmp_path / "st" / "model.safetensors"
    assert result.config_path == tmp_path / "st" / "config.json"
    assert result.max_abs_diff == 0.0  # the same float32 tensors, the same network
    config = json.loads(result.config_path.read_text())
    assert "architecture" not in config  # timm cannot build torchvision's mobilenet_v2
    section = config["inat_finetune"]
    assert section["backbone"] == "mobilenet_v2" and section["class_names"] == CLASSES
    assert section["preprocessing"]["crop_size"] == IMG_SIZE
    assert section["head_layer"] == {
        "module": "classifier.1",
        "type": "Linear",
        "in_features": 1280,
        "out_features": len(CLASSES),
    }
    assert section["version"]

    from_folder, from_ckpt = load(tmp_path / "st", device="cpu"), load(ckpt, device="cpu")
    assert from_folder.class_names == CLASSES
    assert from_folder.preprocessing == from_ckpt.preprocessing
    images = [write_image_file(tmp_path / f"{i}.png", i) for i in range(3)]
    batch = torch.stack([from_ckpt.load(p) for p in images])
    assert torch.equal(from_folder.logits(batch), from_ckpt.logits(batch))
    assert from_folder.predict(images, top_k=2) == from_ckpt.predict(images, top_k=2)


def write_image_file(path: Path, seed: int) -> Path:
    from conftest import write_image

    return write_image(path, seed=seed, size=(70, 60))


def test_safetensors_of_a_timm_backbone_loads_in_timm_itself(
    lite0_run: Path, tmp_path: Path
) -> None:
    import timm
    from timm.data import create_transform, resolve_model_data_config

    from inat_finetune import load

    folder = tmp_path / "lite0"
    result = export(lite0_run, format="safetensors", output=folder)
    theirs = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    ours, card = load_checkpoint(lite0_run / "checkpoints" / "best.ckpt")
    batch = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        expected, got = ours(batch), theirs(batch)
    assert float(expected.std(dim=0).max()) > 1e-4  # the images give different logits
    assert float((got - expected).abs().max()) < TOLERANCE
    assert result.max_abs_diff < TOLERANCE
    assert theirs.pretrained_cfg["label_names"] == card["class_names"] == CLASSES

    # timm's own preprocessing from the folder is the card's: 73 px shorter side, 64 px crop.
    data_config = resolve_model_data_config(theirs)
    assert data_config["input_size"] == (3, 64, 64)
    assert data_config["mean"] == pytest.approx(card["preprocessing"]["mean"])
    assert data_config["interpolation"] == card["preprocessing"]["interpolation"] == "bicubic"
    resize = create_transform(**data_config).transforms[0]
    assert resize.size == card["preprocessing"]["resize_size"] == 73

    # And load() reads the same folder, with the run checkpoint's logits.
    predictor = load(folder, device="cpu")
    from_run = load(lite0_run, device="cpu")
    assert torch.equal(predictor.logits(batch), from_run.logits(batch))


def test_cli_exports_safetensors_and_predicts_from_the_folder(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from inat_finetune.cli.main import app

    folder = tmp_path / "st"
    args = ["export", str(checkpoints["mobilenet_v2"]), "--format", "safetensors"]
    result = CliRunner().invoke(app, [*args, "--output", str(folder)])
    assert result.exit_code == 0, result.output
    assert f"wrote {folder / 'config.json'}" in result.output
    image = write_image_file(tmp_path / "photo.png", 7)
    predicted = CliRunner().invoke(app, ["predict", str(folder), str(image), "--top-k", "1"])
    assert predicted.exit_code == 0, predicted.output
    assert "Predictions (1 images)" in predicted.output


@pytest.mark.parametrize(("crop", "resize"), [(64, 73), (14, 25), (224, 256), (23, 41)])
def test_timm_reads_the_cards_resize_from_crop_pct(crop: int, resize: int) -> None:
    from timm.data import create_transform

    from inat_finetune.models.backbones import Preprocessing
    from inat_finetune.models.safetensors_folder import timm_pretrained_cfg

    cfg = timm_pretrained_cfg(Preprocessing(crop, resize, (0.5,) * 3, (0.5,) * 3, "bicubic"))
    transform = create_transform(
        input_size=cfg["input_size"],
        crop_pct=cfg["crop_pct"],
        interpolation=cfg["interpolation"],
        crop_mode=cfg["crop_mode"],
    )
    assert transform.transforms[0].size == resize  # 14/25 and 23/41 need the nudge
    assert transform.transforms[1].size == (crop, crop)


def test_a_safetensors_folder_that_reads_back_differently_is_not_written(
    checkpoints: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib

    # The module, not the package's re-exported function of the same name.
    exporting = importlib.import_module("inat_finetune.inference.export")

    def off_by_one(folder: Path, batch: torch.Tensor, timm_too: bool) -> list[torch.Tensor]:
        return [torch.ones(batch.shape[0], len(CLASSES))]

    monkeypatch.setattr(exporting, "read_back_logits", off_by_one)
    with pytest.raises(UserError, match="the safetensors export computes different logits"):
        export(checkpoints["mobilenet_v2"], format="safetensors", output=tmp_path / "st")
    assert not (tmp_path / "st").exists()


def test_a_bad_safetensors_folder_is_one_line_naming_the_file(tmp_path: Path) -> None:
    from inat_finetune import load

    folder = tmp_path / "st"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    (folder / "config.json").write_text('{"architecture": "resnet50"}')
    with pytest.raises(UserError, match=r"config\.json: not an inat-finetune export"):
        load(folder, device="cpu")
    (folder / "config.json").write_text(
        json.dumps(
            {"inat_finetune": {"backbone": "resnet50", "class_names": CLASSES, "preprocessing": {}}}
        )
    )
    (folder / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(UserError, match=r"model\.safetensors: not a readable safetensors file"):
        load(folder, device="cpu")
