"""Feature caching: same results as the uncached path, reuse across runs, invalidation, eligibility."""

from __future__ import annotations

import csv
import json
import logging

import pytest
import torch
from conftest import make_class_folders, write_image
from torch import nn

from inat_finetune.experiments.comparison import compare
from inat_finetune.inference.evaluation import evaluate
from inat_finetune.speed import features
from inat_finetune.speed.caching import ArrayStore
from inat_finetune.speed.probing import (
    blocks,
    feature_tail,
    frozen_prefix,
    probe,
    why_not_cacheable,
)
from inat_finetune.tasks.classification import FineTuneModule
from inat_finetune.training.config import load_config
from inat_finetune.training.run import train

TINY = dict(
    backbone="mobilenet_v2",
    img_size=32,
    batch_size=8,
    num_workers=0,
    epochs=2,
    precision="32-true",
    augment=False,
    strategy="freeze_last",
)


def _plain_and_cached(root, settings):
    """One uncached and one cached run on the same data, cache in its own folder."""
    make_class_folders(root / "data" / "train", {"cat": 8, "dog": 8, "fox": 8})
    make_class_folders(root / "data" / "val", {"cat": 3, "dog": 3, "fox": 3}, seed=9)
    common = dict(data=str(root / "data"), output=str(root / "runs"), cache_dir=str(root / "c"))
    plain = train(
        load_config(None, feature_cache=False, **common, **settings), progress=False, report=False
    )
    cached = train(load_config(None, **common, **settings), progress=False, report=False)
    return common, plain, cached


@pytest.fixture(scope="module")
def runs(module_tmp_factory):
    """freeze_last: the classifier trains on stored features."""
    root = module_tmp_factory.mktemp("features")
    common, plain, cached = _plain_and_cached(root, TINY)
    return root, common, plain, cached


def _csv(path):
    return list(csv.DictReader(path.open()))


def test_cached_and_uncached_training_give_the_same_metrics(runs):
    _, _, plain, cached = runs
    assert plain.results["speed_paths"]["feature_cache"] == "off"
    assert cached.results["speed_paths"]["feature_cache"] == "on (0 reused, 33 computed)"
    # The uncached run reads prepared images, the cached one computed its features from the
    # decoded photos: the two paths must give the same pixels for the numbers below to agree.
    assert plain.results["speed_paths"]["image_cache"] == "on (0 reused, 33 prepared)"
    assert cached.results["speed_paths"]["image_cache"] == "not needed (features cached)"
    for key in ("best_val_acc", "test_acc", "final_train_acc", "best_epoch", "epochs"):
        assert cached.results[key] == plain.results[key], key
    assert cached.results["test_loss"] == pytest.approx(plain.results["test_loss"], abs=1e-5)
    assert cached.results["confusion_matrix"] == plain.results["confusion_matrix"]
    # Every logged loss, epoch by epoch, and every test probability agree.
    for a, b in zip(
        _csv(plain.run_dir / "metrics.csv"), _csv(cached.run_dir / "metrics.csv"), strict=True
    ):
        for key in ("train/loss", "val/loss", "val/acc"):
            if a[key]:
                assert float(b[key]) == pytest.approx(float(a[key]), abs=1e-5), key
    rows_a = _csv(plain.run_dir / "test_predictions.csv")
    rows_b = _csv(cached.run_dir / "test_predictions.csv")
    assert [r["path"] for r in rows_a] == [r["path"] for r in rows_b]
    for a, b in zip(rows_a, rows_b, strict=True):
        assert float(b["p_cat"]) == pytest.approx(float(a["p_cat"]), abs=1e-5)


def test_cached_run_checkpoint_holds_the_whole_network(runs):
    _, _, plain, cached = runs
    state_a = torch.load(plain.run_dir / "checkpoints" / "best.ckpt", weights_only=True)
    state_b = torch.load(cached.run_dir / "checkpoints" / "best.ckpt", weights_only=True)
    assert state_a["state_dict"].keys() == state_b["state_dict"].keys()
    assert any(k.startswith("model.features.0.") for k in state_b["state_dict"])
    # evaluate runs the full network on images: it agrees with the test on cached features.
    assert evaluate(cached.run_dir, progress=False)["test_acc"] == cached.results["test_acc"]


def test_second_run_reuses_the_features_without_a_backbone_pass(runs, monkeypatch, caplog):
    root, common, _, cached = runs

    def no_backbone(*args, **kwargs):
        raise AssertionError("the backbone ran although every feature was stored")

    monkeypatch.setattr(features, "_extract", no_backbone)
    with caplog.at_level(logging.INFO, logger="inat_finetune.training"):
        again = train(
            load_config(None, **common, **{**TINY, "lr": 0.01}), progress=False, report=False
        )
    assert again.results["speed_paths"]["feature_cache"] == "on (33 reused, 0 computed)"
    # Every split came from stored features, so no image was decoded or prepared.
    assert again.results["speed_paths"]["image_cache"] == "not needed (features cached)"
    # The one-line summary at the start of the run names the chosen paths.
    line = next(r.getMessage() for r in caplog.records if "accelerator=" in r.getMessage())
    assert "feature_cache=on (33 reused, 0 computed)" in line
    assert "image_cache=not needed (features cached)" in line


def test_a_changed_image_is_computed_again(runs):
    root, common, _, cached = runs
    write_image(root / "data" / "train" / "dog" / "dog_3.jpg", seed=4242, size=(52, 44))
    again = train(load_config(None, **common, **TINY), progress=False, report=False)
    assert again.results["speed_paths"]["feature_cache"] == "on (32 reused, 1 computed)"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"augment": True}, "augmentation on"),
        ({"strategy": "freeze_except_bn_and_fc"}, "trains"),
        ({"frozen_bn": "train"}, "batch statistics"),
        ({"precision": "bf16-true"}, "precision bf16-true"),
    ],
)
def test_not_cached_when_features_could_change(change, reason):
    from inat_finetune.models.backbones import get_model
    from inat_finetune.models.freezing import apply_strategy

    config = load_config(None, **{**TINY, **change})
    built = get_model("mobilenet_v2", num_classes=2, weights="none")
    apply_strategy(built.model, built.head, config.strategy)
    module = FineTuneModule(built.model, {"class_names": ["a", "b"]}, frozen_bn=config.frozen_bn)
    tail = feature_tail(built.model, built.head)
    assert tail == ["classifier.0", "classifier.1"]  # MobileNet's dropout belongs to the tail
    assert reason in why_not_cacheable(config, module, tail, config.precision)


class RandomBeforeHead(nn.Module):
    """timm-style: functional dropout before the classifier, invisible to a module scan."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = self.body(x).mean((2, 3))
        return self.fc(nn.functional.dropout(x, 0.5, self.training))


class AfterHead(nn.Module):
    """SqueezeNet-style: more layers after the classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return torch.relu(self.fc(self.body(x).mean((2, 3)))) * 2


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        (RandomBeforeHead(), "random in training mode"),
        (AfterHead(), "not the network's output"),
        (nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2)), None),
    ],
)
def test_probe_catches_what_a_module_scan_cannot(model, reason):
    model(torch.zeros(1, 3, 8, 8))  # materialise lazy layers
    head = "fc" if hasattr(model, "fc") else "2"
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(head))
    module = FineTuneModule(model, {"class_names": ["a", "b"]})
    result = probe(module, feature_tail(model, head), crop_size=8)
    assert result is None if reason is None else reason in result


def test_results_file_and_report_name_the_paths(runs):
    from inat_finetune.reporting.report import write_report

    _, _, _, cached = runs
    results = json.loads((cached.run_dir / "results.json").read_text())
    assert set(results["speed_paths"]) == {
        "image_cache",
        "feature_cache",
        "compile",
        "workers",
        "depthwise_grad",
        "allocator",
        "augmentation",
    }
    # The linear probe trains no convolution, so the depthwise backward is not switched.
    assert results["speed_paths"]["depthwise_grad"] == "native"
    html = write_report(cached.run_dir).read_text()
    assert "<dt>feature cache</dt><dd>on (0 reused, 33 computed)</dd>" in html
    assert f"<dt>memory allocator</dt><dd>{results['speed_paths']['allocator']}</dd>" in html


# ---------------------------------------------------------------------------------------------
# The frozen prefix: freeze_k_percent trains the later blocks on stored outputs of the first


@pytest.fixture(scope="module")
def prefix_runs(module_tmp_factory):
    settings = {**TINY, "strategy": "freeze_k_percent"}
    common, plain, cached = _plain_and_cached(module_tmp_factory.mktemp("prefix"), settings)
    return common, settings, plain, cached


def test_prefix_cached_and_uncached_training_give_the_same_metrics(prefix_runs):
    _, _, plain, cached = prefix_runs
    # 25% of MobileNetV2's tensors frozen: features.0-4 entirely, features.5 in part.
    assert cached.results["speed_paths"]["feature_cache"] == (
        "on after features.4 (0 reused, 33 computed)"
    )
    assert plain.results["speed_paths"]["feature_cache"] == "off"
    assert cached.results["speed_paths"]["image_cache"] == "not needed (features cached)"
    # Both train convolutions after the prefix on the CPU: the faster depthwise backward.
    assert plain.results["speed_paths"]["depthwise_grad"] == "fast (17 layers)"
    assert cached.results["speed_paths"]["depthwise_grad"] == "fast (17 layers)"
    for key in ("best_val_acc", "test_acc", "final_train_acc", "best_epoch"):
        assert cached.results[key] == plain.results[key], key
    assert cached.results["test_loss"] == pytest.approx(plain.results["test_loss"], abs=1e-4)
    for a, b in zip(
        _csv(plain.run_dir / "metrics.csv"), _csv(cached.run_dir / "metrics.csv"), strict=True
    ):
        for key in ("train/loss", "val/loss"):
            if a[key]:
                assert float(b[key]) == pytest.approx(float(a[key]), abs=1e-4), key
    # The trained blocks moved, and the checkpoint holds the whole network for evaluate.
    state_a = torch.load(plain.run_dir / "checkpoints" / "best.ckpt", weights_only=True)
    state_b = torch.load(cached.run_dir / "checkpoints" / "best.ckpt", weights_only=True)
    assert state_a["state_dict"].keys() == state_b["state_dict"].keys()
    for key in ("model.features.0.0.weight", "model.features.10.conv.0.0.weight"):
        torch.testing.assert_close(
            state_b["state_dict"][key], state_a["state_dict"][key], rtol=1e-3, atol=1e-4
        )
    assert evaluate(cached.run_dir, progress=False)["test_acc"] == cached.results["test_acc"]


def test_prefix_outputs_are_reused_by_the_next_run(prefix_runs, monkeypatch):
    common, settings, _, _ = prefix_runs
    monkeypatch.setattr(features, "_extract", lambda *a, **k: iter(()))
    again = train(
        load_config(None, **common, **{**settings, "lr": 0.01}), progress=False, report=False
    )
    assert again.results["speed_paths"]["feature_cache"] == (
        "on after features.4 (33 reused, 0 computed)"
    )


def test_comparison_stores_the_next_strategys_prefix_in_the_linear_probes_pass(
    prefix_runs, tmp_path, monkeypatch
):
    common, settings, _, alone = prefix_runs
    passes = []
    extract = features._extract
    monkeypatch.setattr(
        features, "_extract", lambda *a, **k: passes.append(a[2]) or extract(*a, **k)
    )
    fresh = {**common, "cache_dir": str(tmp_path / "c"), "output": str(tmp_path / "runs")}
    result = compare(
        load_config(None, **fresh, **TINY),
        ["freeze_last", "freeze_k_percent", "freeze_except_bn_and_fc"],
        progress=False,
        report=False,
    )
    # One pass over the backbone, capturing the prefix on the way (BatchNorm trains from the
    # first block in freeze_except_bn_and_fc: it has no prefix to store).
    assert len(passes) == 1 and passes[0][0][-1] == "features.4"
    runs = {
        row["strategy"]: result.comparison_dir / row["run_dir"] for row in result.comparison["rows"]
    }
    paths = {
        s: json.loads((d / "results.json").read_text())["speed_paths"] for s, d in runs.items()
    }
    assert paths["freeze_last"]["feature_cache"] == (
        "on (0 reused, 33 computed; stored the output of features.4 for freeze_k_percent)"
    )
    assert paths["freeze_k_percent"]["feature_cache"] == (
        "on after features.4 (33 reused, 0 computed)"
    )
    # The photos are decoded once: prepared before that pass, which read them, and reused by
    # the run that trains on images.
    assert paths["freeze_last"]["image_cache"] == "on (0 reused, 33 prepared)"
    assert paths["freeze_k_percent"]["image_cache"] == "not needed (features cached)"
    assert paths["freeze_except_bn_and_fc"]["image_cache"] == "on (33 reused, 0 prepared)"
    # The same run as one that stored its own prefix (fp32: the same numbers).
    shared = json.loads((runs["freeze_k_percent"] / "results.json").read_text())
    for key in ("best_val_acc", "test_acc", "final_train_acc", "best_epoch"):
        assert shared[key] == alone.results[key], key
    assert shared["test_loss"] == pytest.approx(alone.results["test_loss"], abs=1e-6)


def test_prefix_stored_on_the_way_leaves_the_features_unchanged_under_bf16(tmp_path):
    make_class_folders(tmp_path / "data", {"cat": 5, "dog": 5})
    stores = []
    for name, share in (("alone", ()), ("shared", ("freeze_k_percent",))):
        cache = tmp_path / name
        config = load_config(
            None,
            data=str(tmp_path / "data"),
            output=str(tmp_path / "runs"),
            cache_dir=str(cache),
            **{**TINY, "precision": "bf16-mixed", "epochs": 1},
        )
        train(config, progress=False, report=False, share_features_with=share)
        found = {}
        for index in cache.glob("features/*/index.json"):
            meta = json.loads(index.read_text())["meta"]
            found[meta["capture"]] = ArrayStore(index.parent, "float32", meta)
        stores.append(found)
    alone, shared = stores
    assert sorted(alone) == ["classifier.0"]
    assert sorted(shared) == ["classifier.0", "output of features.4"]
    paths = list(alone["classifier.0"].entries)
    assert len(paths) == 10 and sorted(shared["classifier.0"].entries) == sorted(paths)
    # Folded in two pieces (prefix, then the rest) or in one: the same features.
    a, b = alone["classifier.0"].arrays(paths), shared["classifier.0"].arrays(paths)
    for path in paths:
        assert torch.equal(torch.from_numpy(a[path]), torch.from_numpy(b[path])), path


class Chain(nn.Module):
    """Two frozen convolutions, then a trained one; ``between`` and ``before`` add functional
    steps that a cut must not skip."""

    def __init__(self, between: bool = False, before: bool = False, wide: bool = False) -> None:
        super().__init__()
        self.between, self.before = between, before
        self.a = nn.Conv2d(3, 16 if wide else 2, 3, stride=2, padding=1)
        self.b = nn.Conv2d(16 if wide else 2, 2, 3, padding=1)
        self.c = nn.Conv2d(2, 2, 3, padding=1)
        self.fc = nn.Linear(2, 2)
        for layer in (self.a, self.b):
            layer.requires_grad_(False)

    def forward(self, x):
        x = self.a(x * 0.5 if self.before else x)
        x = self.b(x * 2 if self.between else x)
        return self.fc(self.c(x).mean((2, 3)))


@pytest.mark.parametrize(
    ("model", "cut"),
    [
        (Chain(), ["a", "b"]),
        (Chain(between=True), ["a"]),  # b's input is not a's output
        (Chain(before=True), []),  # the network transforms its input before the first block
        (Chain(wide=True), ["a", "b"]),  # a's output (16x4x4) is too large to be a cut
        (nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 2, 1)), []),
    ],
)
def test_frozen_prefix_cuts_only_where_the_network_is_a_chain(model, cut):
    for name, param in model.named_parameters():
        param.requires_grad_(not name.startswith(("a.", "b.", "0.")))
    module = FineTuneModule(model, {"class_names": ["a", "b"]})
    assert frozen_prefix(module, crop_size=8) == cut


def test_frozen_prefix_stops_at_batch_statistics_and_randomness():
    model = nn.Sequential(
        nn.Conv2d(3, 2, 3, stride=2), nn.BatchNorm2d(2), nn.Dropout(0.5), nn.Conv2d(2, 2, 1)
    )
    assert blocks(model) == ["0", "1", "2", "3"]
    model[0].requires_grad_(False)
    model[1].requires_grad_(False)
    model[3].requires_grad_(True)
    held = FineTuneModule(model, {"class_names": ["a", "b"]}, frozen_bn="eval")
    assert frozen_prefix(held, crop_size=8) == ["0", "1"]  # not the dropout
    updating = FineTuneModule(model, {"class_names": ["a", "b"]}, frozen_bn="train")
    assert frozen_prefix(updating, crop_size=8) == ["0"]


def test_folded_network_for_the_autocast_feature_pass():
    from inat_finetune.models.backbones import get_model

    torch.manual_seed(0)
    model = get_model("mobilenet_v2", num_classes=3, weights="none").model
    for m in model.modules():  # non-trivial statistics, as pretrained weights have
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    model.eval()
    folded = features._folded(model, keep="classifier.0")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert folded.get_submodule("classifier.0") is not None  # the capture point is still there
    # A capture point the trace goes through (a container, not a leaf): left unfolded.
    assert features._folded(model, keep="features.1") is model
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(folded(images), model(images), rtol=1e-4, atol=1e-5)

    class DataDependent(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    untraceable = DataDependent()
    assert features._folded(untraceable) is untraceable


@pytest.mark.parametrize(
    ("strategy", "summary"),
    [("freeze_last", "on (0 reused, 33 computed)"), ("freeze_k_percent", "on after features.4")],
)
def test_autocast_feature_pass_runs_the_folded_network(tmp_path, monkeypatch, strategy, summary):
    folded = []
    fold = features._folded
    monkeypatch.setattr(features, "_folded", lambda *a, **k: folded.append(1) or fold(*a, **k))
    make_class_folders(tmp_path / "data" / "train", {"cat": 8, "dog": 8, "fox": 8})
    make_class_folders(tmp_path / "data" / "val", {"cat": 3, "dog": 3, "fox": 3}, seed=9)
    settings = {**TINY, "strategy": strategy, "precision": "bf16-mixed", "epochs": 1}
    common = dict(data=str(tmp_path / "data"), output=str(tmp_path / "runs"))
    config = load_config(None, cache_dir=str(tmp_path / "c"), **common, **settings)
    result = train(config, progress=False, report=False).results
    assert result["speed_paths"]["feature_cache"].startswith(summary)
    assert folded == [1]
    # Same weights, same images: an uncached bf16 run ends near the cached one.
    plain = train(
        load_config(None, feature_cache=False, **common, **settings), progress=False, report=False
    ).results
    assert result["test_loss"] == pytest.approx(plain["test_loss"], rel=0.1)
