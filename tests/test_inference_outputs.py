"""GPU-ready inference and its outputs: ``--device`` resolution, batched predictions that equal
per-image ones, ``--json -`` on stdout, and one ``--tta`` on train, evaluate, predict and serve."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import typer
from conftest import ModuleTempFactory, make_class_folders, write_image
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from inat_finetune.api import load
from inat_finetune.cli.main import app
from inat_finetune.errors import UserError
from inat_finetune.inference.predict import Predictor, predict_paths
from inat_finetune.inference.serve import create_app
from inat_finetune.models.backbones import get_model
from inat_finetune.models.checkpoints import CARD_KEY
from inat_finetune.runtime import devices
from inat_finetune.runtime.devices import lightning_devices, parse_device, resolve_device

NO_GPU = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def tiny_ckpt(module_tmp_factory: ModuleTempFactory) -> Path:
    """mobilenet_v2's ImageNet weights with its ant and bee rows as the head, at 64 px: a
    checkpoint in a second whose answers depend on the image (random weights' barely do)."""
    built = get_model("mobilenet_v2", weights="DEFAULT")
    old = built.model.get_submodule(built.head)
    rows = [built.imagenet_categories.index(name) for name in ("ant", "bee")]
    head = torch.nn.Linear(old.in_features, 2)
    with torch.no_grad():
        head.weight.copy_(old.weight[rows])
        head.bias.copy_(old.bias[rows])
    built.model.set_submodule(built.head, head)
    card = {
        "backbone": "mobilenet_v2",
        "class_names": ["ants", "bees"],
        "head": built.head,
        "preprocessing": built.preprocessing.at_size(64).to_dict(),
        "strategy": "none",
    }
    path = module_tmp_factory.mktemp("ckpt") / "tiny.ckpt"
    state = {f"model.{k}": v for k, v in built.model.state_dict().items()}
    torch.save({"state_dict": state, CARD_KEY: card}, path)
    return path


@pytest.fixture(scope="module")
def photos(module_tmp_factory: ModuleTempFactory) -> list[Path]:
    folder = module_tmp_factory.mktemp("photos")
    return [write_image(folder / f"p{i}.jpg", i, (60 + 7 * i, 50)) for i in range(5)]


@pytest.fixture(scope="module")
def predictor(tiny_ckpt: Path) -> Predictor:
    found = Predictor.from_checkpoint(tiny_ckpt, device="cpu")
    found.autocast_dtype = None  # float32: comparisons below are exact
    return found


# --- device resolution -------------------------------------------------------------------


def _no_accelerators(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "mps_available", lambda: False)


def _gpus(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def test_auto_is_the_gpu_when_there_is_one_else_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_accelerators(monkeypatch)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("CPU") == torch.device("cpu")
    _gpus(monkeypatch, 2)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert lightning_devices(torch.device("cuda", 1)) == ("cuda", [1])
    assert lightning_devices(torch.device("cpu")) == ("cpu", 1)


def test_device_spellings_parse_and_bad_ones_name_the_option() -> None:
    assert parse_device("cuda:3") == torch.device("cuda", 3)
    assert parse_device("cuda") == torch.device("cuda")
    assert parse_device("mps") == torch.device("mps")
    for bad in ("gpu", "cuda:x", "cpu:0", "cuda:"):
        with pytest.raises(UserError, match=rf"^--device {bad}: not a device; use auto, cpu"):
            parse_device(bad)


def test_a_missing_device_is_one_line_naming_what_exists(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_accelerators(monkeypatch)
    with pytest.raises(UserError) as refused:
        resolve_device("cuda")
    assert str(refused.value) == (
        "--device cuda: this machine has no such device; it has cpu "
        "(pass one of those, or --device auto)"
    )
    with pytest.raises(UserError, match="^--device mps: this machine has no such device"):
        resolve_device("mps")
    _gpus(monkeypatch, 2)
    with pytest.raises(UserError, match="^--device cuda:2: .* it has cpu, cuda:0, cuda:1 "):
        resolve_device("cuda:2")
    # The Python API names its keyword.
    _no_accelerators(monkeypatch)
    with pytest.raises(UserError, match=r"^device='cuda': this machine has no such device"):
        load("anything", device="cuda")


@pytest.mark.skipif(not NO_GPU, reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["predict", "evaluate", "serve", "export"])
def test_cli_refuses_a_missing_gpu_in_one_line(command: str, tiny_ckpt: Path) -> None:
    extra = {"predict": [str(tiny_ckpt)], "serve": ["--port", "0"]}.get(command, [])
    result = CliRunner().invoke(app, [command, str(tiny_ckpt), *extra, "--device", "cuda"])
    assert result.exit_code == 2, result.output
    assert "--device cuda: this machine has no such device; it has cpu" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# --- batched predictions -----------------------------------------------------------------


def _per_image(
    predictor: Predictor, files: list[Path], tta: str, batch_size: int = 32
) -> torch.Tensor:
    """The previous arithmetic: each image normalised on the CPU, then stacked in batches of
    ``batch_size`` (the same batches: a convolution's rounding may depend on the batch)."""
    chunks = [files[i : i + batch_size] for i in range(0, len(files), batch_size)]
    return torch.cat(
        [predictor.logits(torch.stack([predictor.load(f, tta) for f in c]), tta) for c in chunks]
    )


@pytest.mark.parametrize("workers", [0, 2])
def test_batched_uint8_predictions_equal_per_image_ones_on_cpu(
    predictor: Predictor, photos: list[Path], workers: int
) -> None:
    report = predict_paths(
        predictor, photos, top_k=2, batch_size=2, progress=False, num_workers=workers
    )
    expected = predictor.top(_per_image(predictor, photos, "none", batch_size=2), 2)
    assert [p.path for p in report.predictions] == list(map(str, photos))
    assert [p.top for p in report.predictions] == expected  # exactly, score for score
    assert report.predictions[0].top[0].label in ("ants", "bees")
    assert predictor.predict(photos, top_k=2, batch_size=2) == expected


def test_flip_is_the_mean_of_the_image_and_its_mirror_and_multicrop_ten_views(
    predictor: Predictor, photos: list[Path]
) -> None:
    x = torch.stack([predictor.load(f) for f in photos])
    mean = (predictor.logits(x) + predictor.logits(x.flip(dims=[3]))) / 2
    flipped = predict_paths(predictor, photos, top_k=2, tta="flip", progress=False)
    assert [p.top for p in flipped.predictions] == predictor.top(mean, 2)
    multicrop = predict_paths(predictor, photos, top_k=2, tta="multicrop", progress=False)
    assert [p.top for p in multicrop.predictions] == predictor.top(
        _per_image(predictor, photos, "multicrop"), 2
    )
    assert multicrop.predictions[0].top != flipped.predictions[0].top


# --- the command line: outputs and --tta ----------------------------------------------------


def test_json_to_stdout_parses_and_the_table_goes_to_stderr(
    tiny_ckpt: Path, photos: list[Path], tmp_path: Path
) -> None:
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    args = ["predict", str(tiny_ckpt), str(photos[0]), str(photos[1]), str(tmp_path / "broken.jpg")]
    result = CliRunner().invoke(app, [*args, "--top-k", "2", "--json", "-", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)  # nothing but the JSON on stdout
    assert [d["path"] for d in data] == [
        str(photos[0]),
        str(photos[1]),
        str(tmp_path / "broken.jpg"),
    ]
    assert [t.keys() for t in data[0]["predictions"]] == [{"label", "score"}] * 2
    assert data[2]["predictions"] == [] and data[2]["error"].startswith("does not decode")
    assert "Predictions (2 images)" in result.stderr and "Skipped (1 files)" in result.stderr

    to_file = CliRunner().invoke(app, [*args, "--csv", str(tmp_path / "p.csv")])
    assert "Predictions (2 images)" in to_file.stdout  # with files only, the table is on stdout
    header = (tmp_path / "p.csv").read_text().splitlines()[0]
    assert header == "path,label_1,score_1,label_2,score_2,error"


def _tta_option(command: str) -> typer.core.TyperOption:
    group = typer.main.get_command(app)
    return next(p for p in group.commands[command].params if p.name == "tta")


def test_one_tta_option_on_train_evaluate_predict_and_serve() -> None:
    options = [_tta_option(c) for c in ("train", "evaluate", "predict", "serve")]
    assert {tuple(o.opts) for o in options} == {("--tta",)}
    assert len({o.help for o in options}) == 1  # one declaration: the TrainConfig field's
    assert "none, flip" in options[0].help and "multicrop" in options[0].help


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["evaluate", "RUN", "--multi-crop"], "--multi-crop is gone; use --tta multicrop"),
        (["evaluate", "RUN", "--accelerator", "cpu"], "--accelerator is gone; use --device"),
        (["evaluate", "RUN", "--tta", "mirror"], "--tta mirror: unknown; use --tta none, flip or"),
        (["predict", "RUN", "x.jpg", "--tta", "yes"], "--tta yes: unknown; use --tta none, flip"),
    ],
)
def test_old_tta_spellings_name_the_new_one(args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert message in result.stderr


def test_serve_answers_in_predicts_shape_with_its_tta(
    predictor: Predictor, photos: list[Path]
) -> None:
    client = TestClient(create_app(predictor, tta="flip"))
    with photos[0].open("rb") as handle:
        response = client.post("/api/predict", files={"file": ("p0.jpg", handle, "image/jpeg")})
    assert response.status_code == 200, response.text
    answer = response.json()
    expected = predict_paths(predictor, [photos[0]], top_k=5, tta="flip", progress=False)
    assert answer["path"] == "p0.jpg"
    assert answer["predictions"] == expected.to_list()[0]["predictions"]
    assert (answer["width"], answer["height"]) == (60, 50)


def test_cli_evaluate_tta_flip_scores_what_predict_flip_predicts(
    tiny_ckpt: Path, predictor: Predictor, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    make_class_folders(data / "train", {"ants": 4, "bees": 4}, seed=1)
    test = make_class_folders(data / "val", {"ants": 4, "bees": 4}, seed=2)  # the test split
    common = ["evaluate", str(tiny_ckpt), "--data", str(data), "--num-workers", "0"]
    scored = {}
    for mode in ("none", "flip"):
        saved = tmp_path / f"{mode}.json"
        args = [*common, "--device", "cpu", "--precision", "32-true", "--tta", mode]
        result = CliRunner().invoke(app, [*args, "--save", str(saved)])
        assert result.exit_code == 0, result.output
        scored[mode] = json.loads(saved.read_text())
    assert "(test-time augmentation: flip)" in result.stdout
    assert (scored["none"]["tta"], scored["flip"]["tta"]) == ("none", "flip")
    assert scored["none"]["test_loss"] != scored["flip"]["test_loss"]
    files = [path for paths in test.values() for path in paths]
    report = predict_paths(predictor, files, tta="flip", progress=False)
    right = [Path(p.path).parent.name == p.top[0].label for p in report.predictions]
    assert scored["flip"]["test_acc"] == pytest.approx(sum(right) / len(right), abs=1e-6)
