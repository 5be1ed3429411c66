"""The linear probe on cached features (tasks/linear_probe.py) and ``--recipe probe``."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import ModuleTempFactory, make_class_folders

from inat_finetune.inference.predict import predict_paths
from inat_finetune.tasks import linear_probe
from inat_finetune.tasks.linear_probe import (
    cv_sample,
    cv_scores,
    fit_probe,
    fold_standardisation,
    folds_for,
    standardiser,
)
from inat_finetune.training.config import load_config
from inat_finetune.training.run import train


def clean_features(n: int = 80) -> tuple[torch.Tensor, torch.Tensor]:
    """Separable only along x1 - x2 (x1 = label + a large nuisance, x2 = the nuisance): a
    strong penalty shrinks towards the class means' direction, which the nuisance swamps."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 2
    nuisance = torch.randn(n, generator=generator) * 3
    extra = torch.randn(n, 6, generator=generator)
    return torch.cat([(labels + nuisance)[:, None], nuisance[:, None], extra], 1), labels


def noisy_features(n: int = 80, dims: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """A faint shift of every feature by the label under much noise: averaging pays."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 2
    return torch.randn(n, dims, generator=generator) + 0.05 * (2 * labels[:, None] - 1), labels


def test_the_search_picks_a_larger_penalty_on_noisy_features_than_on_clean_ones():
    clean = fit_probe(*clean_features(), seed=0)
    noisy = fit_probe(*noisy_features(), seed=0)
    assert clean.cv_acc > 0.95
    assert noisy.weight_decay >= 100 * clean.weight_decay
    # every grid point was scored, and the choice is the best of them
    assert len(clean.cv["plain"]) == 15 and clean.cv_acc == max(clean.cv["plain"].values())


def test_on_many_images_the_penalty_is_chosen_on_a_stratified_sample_and_rescaled(monkeypatch):
    features, labels = clean_features(n=90)
    labels = torch.where(torch.arange(90) < 30, torch.tensor(2), labels)  # 3 classes: 30/30/30
    sample = cv_sample(labels, seed=0, limit=30)
    assert len(sample) == 30 and torch.bincount(labels[sample]).tolist() == [10, 10, 10]
    assert torch.equal(cv_sample(labels, seed=0, limit=30), sample)  # seed-fixed
    assert torch.equal(cv_sample(labels, seed=0, limit=90), torch.arange(90))  # all: no sample
    monkeypatch.setattr(linear_probe, "CV_IMAGES", 30)
    fit = fit_probe(features, labels, seed=0)
    assert fit.cv_images == 30 and fit.summary()["cv_images"] == 30
    chosen = max(fit.cv[fit.mode], key=lambda wd: (fit.cv[fit.mode][wd], wd))
    assert math.isclose(fit.weight_decay, chosen * 30 / 90)  # the same penalty on the sum


def test_folds_keep_an_image_and_its_mirror_together():
    labels = torch.arange(30) % 3
    groups = torch.cat([torch.arange(30), torch.arange(30)])
    folds = folds_for(torch.cat([labels, labels]), groups, seed=0)
    assert torch.equal(folds[:30], folds[30:])
    assert sorted(torch.bincount(folds[:30]).tolist()) == [6] * 5  # stratified, even
    assert torch.equal(folds, folds_for(torch.cat([labels, labels]), groups, seed=0))
    split = folds.clone()
    split[30] = (split[0] + 1) % 5
    with pytest.raises(ValueError, match="different folds"):
        cv_scores(torch.randn(60, 4), torch.cat([labels, labels]), groups, split)


def test_mirrors_in_training_do_not_leak_into_cv():
    """Pure noise with exact copies as 'mirrors': grouped folds score chance; if a copy of a
    held-out image were in training, a tiny penalty would memorise it and score ~100%."""
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(60, 100, generator=generator)
    labels = torch.randint(0, 2, (60,), generator=generator)
    fit = fit_probe(features, labels, seed=0, flipped=features.clone())
    assert max(fit.cv["flip_train_tta"].values()) < 0.8


def test_folding_the_standardisation_gives_the_same_logits():
    generator = torch.Generator().manual_seed(2)
    features = torch.randn(50, 12, generator=generator) * 5 + 3
    w, b = torch.randn(12, 4, generator=generator), torch.randn(4, generator=generator)
    mean, sd = standardiser(features)
    weight, bias = fold_standardisation(w, b, mean, sd)
    head = torch.nn.Linear(12, 4)
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    torch.testing.assert_close(head(features), ((features - mean) / sd) @ w + b)


def tree(root: Path, seed: int) -> Path:
    """train/val/test class folders of generated images (3 classes)."""
    for offset, (split, count) in enumerate((("train", 10), ("val", 3), ("test", 4))):
        counts = {"a": count, "b": count, "c": count}
        make_class_folders(root / split, counts, seed=seed * 10 + offset)
    return root


def probe_run(data: Path, output: Path) -> Path:
    config = load_config(
        None,
        data=str(data),
        recipe="probe",
        backbone="mobilenet_v2",
        img_size=32,
        num_workers=0,
        precision="32-true",
        output=str(output),
    )
    return train(config, progress=False, report=False).run_dir


def predictions_of(run_dir: Path) -> dict[str, list[float]]:
    with (run_dir / "test_predictions.csv").open(newline="") as handle:
        return {
            Path(row["path"]).name: [float(row[f"p_{c}"]) for c in "abc"]
            for row in csv.DictReader(handle)
        }


@pytest.fixture(scope="module")
def probe_runs(module_tmp_factory: ModuleTempFactory) -> tuple[Path, Path]:
    """The probe on generated photos, then again with every test label changed."""
    base = module_tmp_factory.mktemp("probe")
    data = tree(base / "data", seed=3)
    corrupted = base / "corrupted"
    shutil.copytree(data, corrupted)
    test = corrupted / "test"
    for name in "abc":
        (test / name).rename(test / f"{name}-old")
    for old, new in zip("abc", "bca", strict=True):  # a's photos now labelled b, and so on
        (test / f"{old}-old").rename(test / new)
    return probe_run(data, base / "runs"), probe_run(corrupted, base / "runs-corrupted")


def test_recipe_probe_writes_a_checkpoint_that_predict_loads(probe_runs: tuple[Path, Path]):
    run_dir = probe_runs[0]
    data = run_dir.parent.parent / "data"
    results = json.loads((run_dir / "results.json").read_text())
    probe = results["linear_probe"]
    assert probe["weight_decay"] in [float(k) for k in probe["cv_acc_by_weight_decay"]["plain"]]
    assert results["strategy"] == "freeze_last" and "test_acc" in results
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    tta = probe["flips"] != "plain"
    # The probe's own validation loss (from the fitted weights, before any checkpoint) is
    # the cross-entropy of what predict makes of the checkpoint on the validation photos.
    with (run_dir / "metrics.csv").open(newline="") as handle:
        val_loss = float(next(csv.DictReader(handle))["val/loss"])
    val = predict_paths(run_dir, [data / "val"], top_k=3, tta=tta, progress=False)
    losses = [-math.log(dict(p.top)[Path(p.path).parent.name]) for p in val.predictions]
    assert len(losses) == 9 and sum(losses) / 9 == pytest.approx(val_loss, rel=1e-4)
    # ... and predict gives the test probabilities that the run's own test wrote.
    ours = predictions_of(run_dir)
    report = predict_paths(run_dir, [data / "test"], top_k=3, tta=tta, progress=False)
    assert len(report.predictions) == len(ours) == 12
    for prediction in report.predictions:
        theirs = dict(prediction.top)
        mine = ours[Path(prediction.path).name]
        assert [theirs[c] for c in "abc"] == pytest.approx(mine, abs=1e-4)


def test_test_labels_never_affect_the_choice(probe_runs: tuple[Path, Path]):
    first, second = (json.loads((r / "results.json").read_text()) for r in probe_runs)
    assert first["linear_probe"] == second["linear_probe"]
    assert first["confusion_matrix"] != second["confusion_matrix"]  # the labels did change
    assert predictions_of(probe_runs[0]) == predictions_of(probe_runs[1])


def test_recipe_probe_refuses_options_that_rule_out_cached_features():
    from inat_finetune.errors import UserError

    assert load_config(None, recipe="probe").feature_cache
    with pytest.raises(UserError, match="--augment, --no-feature-cache"):
        load_config(None, recipe="probe", augment=True, feature_cache=False)
