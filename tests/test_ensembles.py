"""Feature ensembles (``--backbone a,b``): cached per member, round trips through the
checkpoint, ``predict``, ``evaluate``, ``serve`` and ONNX/TorchScript export, and one line for
what an ensemble cannot do."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from conftest import HYMENOPTERA, TINY_TRAIN, ModuleTempFactory, make_class_folders, require_shared

from inat_finetune.api import load
from inat_finetune.errors import UserError
from inat_finetune.inference.evaluation import evaluate, load_checkpoint
from inat_finetune.inference.export import export
from inat_finetune.models.backbones import get_model
from inat_finetune.models.checkpoints import CARD_KEY, read_checkpoint
from inat_finetune.models.ensembles import FeatureEnsemble
from inat_finetune.speed import features
from inat_finetune.training.config import load_config
from inat_finetune.training.run import train

ENSEMBLE = "mobilenet_v2,tf_efficientnet_lite0"
IMAGES = 16  # 8 per class, every split


def _settings(root: Path, **changes: object) -> dict[str, object]:
    return {
        **TINY_TRAIN,
        "img_size": 64,
        "augment": False,
        "data": str(root / "data"),
        "output": str(root / "runs"),
        "cache_dir": str(root / "cache"),
        **changes,
    }


@pytest.fixture(scope="module")
def runs(module_tmp_factory: ModuleTempFactory) -> dict[str, object]:
    """A run of mobilenet_v2 alone, then of the ensemble on the same images and cache; the
    images each backbone pass computed are counted."""
    root = module_tmp_factory.mktemp("ensemble")
    make_class_folders(root / "data", {"a": 8, "b": 8})
    computed: list[tuple[str, int]] = []
    extract = features._extract

    def counting(module, *args, **kwargs):
        todo = args[5]
        computed.append((type(module.model).__name__, len(todo)))
        return extract(module, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(features, "_extract", counting)
        single = train(load_config(None, **_settings(root)), progress=False, report=False)
        passes_single = list(computed)
        ensemble = train(
            load_config(None, **_settings(root, backbone=ENSEMBLE)), progress=False, report=False
        )
    return {
        "root": root,
        "single": single,
        "ensemble": ensemble,
        "passes_single": passes_single,
        "passes_ensemble": computed[len(passes_single) :],
    }


def test_second_backbone_costs_one_pass_and_the_first_is_reused(runs) -> None:
    assert runs["passes_single"] == [("MobileNetV2", IMAGES)]
    # The ensemble runs only EfficientNet-Lite0 over the images: MobileNetV2's are stored.
    assert runs["passes_ensemble"] == [("EfficientNet", IMAGES)]
    assert runs["ensemble"].results["speed_paths"]["feature_cache"] == (
        f"on, per member: mobilenet_v2 ({IMAGES} reused, 0 computed); "
        f"tf_efficientnet_lite0 (0 reused, {IMAGES} computed)"
    )
    stores = sorted(p.name.rsplit("-", 1)[0] for p in (runs["root"] / "cache/features").iterdir())
    assert stores == ["mobilenet_v2", "tf_efficientnet_lite0"]


def test_cached_ensemble_trains_as_the_uncached_one(runs, tmp_path: Path) -> None:
    root = runs["root"]
    plain = train(
        load_config(None, **_settings(root, backbone=ENSEMBLE, feature_cache=False)),
        progress=False,
        report=False,
    )
    assert plain.results["speed_paths"]["feature_cache"] == "off"
    cached = runs["ensemble"].results
    for key in ("test_acc", "test_loss", "best_val_acc"):
        assert plain.results[key] == pytest.approx(cached[key], abs=1e-5), key


def test_checkpoint_names_its_members(runs) -> None:
    card = read_checkpoint(runs["ensemble"].run_dir / "checkpoints" / "best.ckpt")[CARD_KEY]
    assert card["backbone"] == ENSEMBLE
    assert [m["backbone"] for m in card["members"]] == ENSEMBLE.split(",")
    assert [m["mean"] for m in card["members"]] == [[0.485, 0.456, 0.406], [0.5, 0.5, 0.5]]
    assert card["preprocessing"]["mean"] == [0.0, 0.0, 0.0]
    assert card["preprocessing"]["std"] == [1.0, 1.0, 1.0]


def test_round_trip_through_predict_evaluate_and_export(runs, tmp_path: Path) -> None:
    run_dir = runs["ensemble"].run_dir
    model, _ = load_checkpoint(run_dir / "checkpoints" / "best.ckpt")
    assert isinstance(model, FeatureEnsemble)
    predictor = load(run_dir, device="cpu")  # the Python API; predict and serve use it too
    photos = sorted((runs["root"] / "data").rglob("*.jpg"))[:4]
    batch = torch.stack([predictor.load(p) for p in photos])
    with torch.inference_mode():
        logits = model(batch)
    assert torch.allclose(predictor.logits(batch), logits, atol=1e-5)
    top = predictor.predict(photos, top_k=2)
    probabilities = logits.softmax(1)
    for answer, row in zip(top, probabilities, strict=True):
        for name, p in answer:
            assert p == pytest.approx(float(row[predictor.class_names.index(name)]), abs=1e-5)
    for fmt in ("onnx", "torchscript"):
        result = export(run_dir, format=fmt, out_dir=tmp_path / fmt)
        assert torch.allclose(run_exported(fmt, result.model_path, batch), logits, atol=1e-4)
    assert evaluate(run_dir, progress=False)["test_acc"] == pytest.approx(
        runs["ensemble"].results["test_acc"]
    )


def test_serve_answers_for_an_ensemble(runs) -> None:
    from fastapi.testclient import TestClient

    from inat_finetune.inference.serve import create_app

    predictor = load(runs["ensemble"].run_dir, device="cpu")
    client = TestClient(create_app(predictor, max_upload_mb=1, max_megapixels=40))
    photo = sorted((runs["root"] / "data").rglob("*.jpg"))[0]
    response = client.post("/api/predict", files={"file": (photo.name, photo.read_bytes())})
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0]["label"] == predictor.predict(photo)[0][0][0]


def run_exported(fmt: str, model_path: Path, batch: torch.Tensor) -> torch.Tensor:
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
        (logits,) = session.run(["logits"], {"images": batch.numpy()})
        return torch.from_numpy(logits)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = torch.jit.load(str(model_path))
    with torch.inference_mode():
        return loaded(batch)


def test_members_stay_frozen_in_eval_mode_and_normalise_inside() -> None:
    built = get_model(ENSEMBLE, num_classes=3, weights="none")
    model = built.model.train()
    assert not any(m.training for m in model.members.modules())
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "classifier.weight",
        "classifier.bias",
    ]
    images = torch.rand(2, 3, 64, 64)
    alone = get_model("tf_efficientnet_lite0", weights="none").model.eval()
    alone.load_state_dict(model.members[1].state_dict(), strict=False)
    alone.reset_classifier(0)
    with torch.inference_mode():
        expected = alone((images - 0.5) / 0.5)
        assert torch.allclose(model.member_features(images)[1], expected, atol=1e-5)


@pytest.mark.parametrize(
    "options, fix",
    [
        (
            {"recipe": "bn_head"},
            "use --strategy freeze_last instead of --strategy freeze_except_bn_and_fc",
        ),
        ({"strategy": "none"}, "use --strategy freeze_last instead of --strategy none"),
        ({"recipe": "strong"}, "drop --train-from, --lp-epochs and --unfreeze-schedule"),
        ({"strategy": "freeze_last", "frozen_bn": "train"}, "use --frozen-bn eval"),
        ({"strategy": "freeze_last", "weights": "IMAGENET1K_V1"}, "drop --weights"),
    ],
)
def test_what_an_ensemble_cannot_do_is_one_line(options: dict, fix: str) -> None:
    with pytest.raises(UserError) as raised:
        load_config(None, backbone=ENSEMBLE, **options)
    message = str(raised.value)
    assert "\n" not in message
    assert f"--backbone {ENSEMBLE} is a feature ensemble" in message
    assert fix in message


@pytest.mark.parametrize("name", ["mobilenet_v2,", "mobilenet_v2,mobilenet_v2"])
def test_malformed_ensemble_names_are_one_line(name: str) -> None:
    with pytest.raises(UserError, match=f"--backbone {name}: "):
        load_config(None, backbone=name, strategy="freeze_last")


def test_members_need_a_linear_classifier() -> None:
    with pytest.raises(UserError, match="--backbone squeezenet1_0: its classifier"):
        get_model("mobilenet_v2,squeezenet1_0", num_classes=2, weights="none")


@pytest.mark.parametrize("lite", ["tf_efficientnet_lite1", "tf_efficientnet_lite2"])
def test_packaged_efficientnet_lite_weights_load_offline_and_see_a_bee(lite: str) -> None:
    from inat_finetune.inference.predict import Predictor
    from inat_finetune.models.backbones import PACKAGED_TIMM_FILES

    package = PACKAGED_TIMM_FILES[lite][0]
    pytest.importorskip(package)
    built = get_model(lite)
    assert built.weights == package
    photo = sorted((require_shared(HYMENOPTERA) / "val" / "bees").iterdir())[1]
    card = {"class_names": built.imagenet_categories}
    card["preprocessing"] = built.preprocessing.to_dict()
    predictor = Predictor(built.model, card)
    assert predictor.predict(photo)[0][0][0] == "bee"  # ImageNet class 309
