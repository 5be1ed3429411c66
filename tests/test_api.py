"""The Python API: ``train`` and ``load`` agree with ``inat-finetune predict``, keywords are
TrainConfig's fields, ``load_from_checkpoint`` works, figures come back as Figures."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import HYMENOPTERA, ROOT, ModuleTempFactory, require_shared, write_image
from matplotlib.figure import Figure
from PIL import Image

import inat_finetune
from inat_finetune import UserError, api
from inat_finetune.inference.predict import Predictor
from inat_finetune.models.backbones import get_model
from inat_finetune.models.checkpoints import CARD_KEY
from inat_finetune.tasks.classification import FineTuneModule

# The "must show", run in a fresh process exactly as a notebook user would type it.
SCRIPT = textwrap.dedent(
    """
    import json, sys
    from inat_finetune import train, load
    from inat_finetune.tasks.classification import FineTuneModule

    data, output, answer = sys.argv[1:4]
    images = sys.argv[4:]
    run = train(data=data, backbone="mobilenet_v2", strategy="freeze_last", epochs=2,
                img_size=128, output=output, progress=False)
    predictor = load(run.run_dir)
    predicted = predictor.predict(images, top_k=2)
    # Lightning's way to the same weights: the same logits as the predictor's network.
    module = FineTuneModule.load_from_checkpoint(run.run_dir / "checkpoints" / "best.ckpt")
    batch = __import__("torch").stack([predictor.load(p) for p in images])
    with __import__("torch").inference_mode():
        same = bool((module(batch) - predictor.model(batch)).abs().max() < 1e-4)
    json.dump({
        "run_dir": str(run.run_dir),
        "results": run.results,
        "predicted": predicted,
        "device": str(predictor.device),
        "model_in_eval": not run.model.training,
        "module_in_eval": not module.training,
        "module_classes": module.card["class_names"],
        "lightning_logits_equal": same,
    }, open(answer, "w"))
    """
)


@pytest.fixture(scope="module")
def api_run(module_tmp_factory: ModuleTempFactory) -> dict:
    """Two epochs of freeze_last at 128 px through the API in a fresh process (about a minute)."""
    data = require_shared(HYMENOPTERA)
    work = module_tmp_factory.mktemp("api")
    images = (
        sorted((data / "val" / "bees").iterdir())[:3]
        + sorted((data / "val" / "ants").iterdir())[:3]
    )
    answer = work / "answer.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run(
        [
            sys.executable,
            "-c",
            SCRIPT,
            str(data),
            str(work / "runs"),
            str(answer),
            *map(str, images),
        ],
        check=True,
        env=env,
        timeout=600,
    )
    return {"answer": json.loads(answer.read_text()), "images": images, "work": work, "env": env}


def test_train_then_load_predicts_what_the_cli_predicts(api_run: dict) -> None:
    answer, work = api_run["answer"], api_run["work"]
    cli_json = work / "cli.json"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "inat_finetune",
            "predict",
            answer["run_dir"],
            *map(str, api_run["images"]),
            "--top-k",
            "2",
            "--json",
            str(cli_json),
        ],
        check=True,
        env=api_run["env"],
        capture_output=True,
        timeout=300,
    )
    cli = json.loads(cli_json.read_text())
    assert [p["path"] for p in cli] == [str(p) for p in api_run["images"]]
    from_cli = [[[t["label"], t["score"]] for t in p["predictions"]] for p in cli]
    assert answer["predicted"] == from_cli  # the same labels and the same scores, exactly
    assert answer["device"] == "cpu"
    assert answer["results"]["epochs"] == 2 and "test_acc" in answer["results"]


def test_the_run_holds_its_model_in_eval_mode_and_lightning_loads_it(api_run: dict) -> None:
    answer = api_run["answer"]
    assert answer["model_in_eval"] and answer["module_in_eval"]
    assert answer["module_classes"] == ["ants", "bees"]
    assert answer["lightning_logits_equal"]


def test_run_figures_are_figures_and_leave_no_pyplot_state(api_run: dict) -> None:
    import matplotlib.pyplot as plt

    run = inat_finetune.Run(Path(api_run["answer"]["run_dir"]), api_run["answer"]["results"])
    figures = run.figures
    drawn = [
        figures.curves(),
        figures.confusion(),
        figures.prediction_grid(n=4),
        figures.class_samples("bees", n=3),
    ]
    assert all(isinstance(f, Figure) for f in drawn)
    # The photo grid keeps the PNG's size in pixels: 4 tiles of 2.1 x 2.5 in under a header.
    assert tuple(drawn[2].get_size_inches()) == pytest.approx((4 * 2.1, 2.5 + 0.5))
    assert plt.get_fignums() == []


def test_an_unknown_keyword_is_refused_by_name_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"epoch=\.\.\.: no such option; did you mean epochs="):
        inat_finetune.train(data=tmp_path, epoch=2)
    with pytest.raises(UserError, match="strategies"):
        inat_finetune.compare(data=tmp_path, strategies="freeze_last,melt")
    # A field's value is validated as the command line validates it.
    with pytest.raises(UserError, match="epochs"):
        inat_finetune.train(data=tmp_path, epochs=0)


def test_logging_gets_one_handler_however_often_train_is_called(monkeypatch) -> None:
    package = logging.getLogger("inat_finetune")
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    monkeypatch.setattr(package, "handlers", [])
    api.log_to_stderr_once()
    api.log_to_stderr_once()
    assert [h.get_name() for h in package.handlers] == [api.LOG_HANDLER_NAME]


def tiny_checkpoint(path: Path) -> tuple[Path, dict]:
    built = get_model("mobilenet_v2", num_classes=2, weights=None)
    card = {
        "backbone": "mobilenet_v2",
        "class_names": ["ants", "bees"],
        "preprocessing": built.preprocessing.at_size(64).to_dict(),
    }
    state = {f"model.{k}": v for k, v in built.model.state_dict().items()}
    torch.save({"state_dict": state, CARD_KEY: card}, path)
    return path, state


def test_load_from_checkpoint_rebuilds_the_module_from_its_card(tmp_path: Path) -> None:
    path, state = tiny_checkpoint(tmp_path / "tiny.ckpt")
    module = FineTuneModule.load_from_checkpoint(path)
    assert not module.training and module.card["class_names"] == ["ants", "bees"]
    loaded = module.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    torch.save({"state_dict": state}, tmp_path / "foreign.ckpt")
    with pytest.raises(UserError, match="not an inat-finetune checkpoint"):
        FineTuneModule.load_from_checkpoint(tmp_path / "foreign.ckpt")


def test_predict_takes_paths_and_pil_images_alike(tmp_path: Path) -> None:
    path, _ = tiny_checkpoint(tmp_path / "tiny.ckpt")
    predictor = api.load(path, device="cpu")
    assert isinstance(predictor, Predictor) and str(predictor.device) == "cpu"
    png = write_image(tmp_path / "a.png", seed=1, size=(80, 60))
    rgba = Image.open(png).convert("RGBA")
    by_path, by_image = predictor.predict([png, rgba], top_k=2)
    assert [c for c, _ in by_path] == [c for c, _ in by_image]
    assert [p for _, p in by_path] == pytest.approx([p for _, p in by_image], abs=1e-6)
    assert sorted(c for c, _ in by_path) == ["ants", "bees"]
    (single,) = predictor.predict(png)  # one image, top_k=1 by default
    assert [c for c, _ in single] == [by_path[0][0]]
    with pytest.raises(UserError, match="top_k"):
        predictor.predict(png, top_k=0)
