"""Exported ONNX and TorchScript models compute what the checkpoint computes, at any batch size."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

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
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export_ckpts")
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
