"""--recipe auto under a time budget: the sample sized from measured costs, a candidate's share.

No timed test: the costs are given (or the clock is a counter) and the tests assert on the
planned work, the sample drawn and how far a stopped run says it got.
"""

from __future__ import annotations

import json
from dataclasses import replace
from types import SimpleNamespace

import pytest
from test_auto import auto_config, tiny_split, two_candidates  # noqa: F401 - fixtures

from inat_finetune.experiments import auto, auto_time
from inat_finetune.experiments.auto_plan import (
    PLAN_SHARE,
    Budget,
    Costs,
    Scored,
    Work,
    plan_fraction,
    sample_by_class,
    successive_halving,
    work_seconds,
)
from inat_finetune.experiments.auto_time import ShareStop, choice_split

WORKS = [Work(feature_passes=2, fixed_s=25.0), Work(epochs=1), Work(epochs=2), Work(epochs=1)]


def test_the_sample_shrinks_when_an_image_costs_more():
    cheap = Costs(eval_s=0.01, train_s=0.03, setup_s=2.0, size=224)
    dear = Costs(
        eval_s=0.04, train_s=0.12, setup_s=2.0, size=224
    )  # four times the seconds per image
    n_train, n_val = 8000, 2000
    fractions = [plan_fraction(WORKS, c, n_train, n_val, 120.0) for c in (cheap, dear)]
    assert 0 < fractions[1] < fractions[0] < 1
    assert fractions[1] == pytest.approx(fractions[0] / 4)
    # Round 0 at that fraction fills its part of the budget: 80% of 120 s over 2 rounds.
    for costs, fraction in zip((cheap, dear), fractions, strict=True):
        planned = sum(work_seconds(w, costs, n_train * fraction, n_val * fraction) for w in WORKS)
        assert planned == pytest.approx(PLAN_SHARE * 120.0 / 2)
    # Every image when the budget allows it; none beyond the minimum when set-up eats it all.
    assert plan_fraction(WORKS, cheap, 100, 25, 600.0) == 1.0
    assert plan_fraction(WORKS, cheap, n_train, n_val, 10.0) == 0.0
    # Never under a few batches of training images: one step would say nothing.
    assert plan_fraction(WORKS, dear, n_train, n_val, 10.0, min_train=256) == 256 / n_train


def test_the_sample_is_stratified_seeded_and_keeps_a_minimum_per_class():
    by_class = {"a": [f"a/{i}.jpg" for i in range(40)], "b": [f"b/{i}.jpg" for i in range(8)]}
    by_class["c"] = ["c/0.jpg"]
    sampled = sample_by_class(by_class, 0.25, seed=3, salt="train")
    assert {name: len(files) for name, files in sampled.items()} == {"a": 10, "b": 2, "c": 1}
    assert all(set(sampled[n]) <= set(by_class[n]) for n in by_class)
    assert sample_by_class(by_class, 0.25, seed=3, salt="train") == sampled
    assert sample_by_class(by_class, 0.25, seed=4, salt="train") != sampled
    assert sum(map(len, sample_by_class(by_class, 0.0, 3).values())) == 2 + 2 + 1


def test_the_choice_split_has_no_test_image(tmp_path):
    split = tiny_split(tmp_path)
    for fraction in (1.0, 0.5):
        chosen = choice_split(split, fraction, seed=0)
        assert not any(chosen.test.values()) and chosen.test_fraction is None
        assert chosen.classes == split.classes
    assert choice_split(split, 1.0, 0).train == split.train
    half = choice_split(split, 0.5, 0)
    assert sum(map(len, half.train.values())) < sum(map(len, split.train.values()))


def test_an_interrupted_candidate_reports_how_far_it_got():
    now = [0.0]
    stop = ShareStop(deadline=10.0, clock=lambda: now[0])
    trainer = SimpleNamespace(
        should_stop=False, global_step=0, estimated_stepping_batches=40, current_epoch=0
    )
    for step in range(1, 41):  # one second per batch: 40 batches planned, 10 s allowed
        now[0] += 1.0
        trainer.global_step = step
        trainer.current_epoch = (step - 1) // 20
        stop.on_train_batch_end(trainer, None, None, None, step - 1)
        if trainer.should_stop:
            break
    assert trainer.should_stop and now[0] == 10.0
    assert stop.stopped_at == {"steps": 10, "of_steps": 40, "epoch": 0}


def test_a_time_budget_chooses_on_a_sample_sized_from_the_costs(
    tmp_path,
    monkeypatch,
    two_candidates,  # noqa: F811
):
    """Costs of 1 s per image to evaluate and 5 s to train (stubbed) leave room in a minute
    for about half the images; the candidates run on that sample with no test image."""
    measured = []

    def stub(config, split, clock=None):
        measured.append(sum(map(len, split.test.values())))
        return Costs(eval_s=1.0, train_s=5.0, setup_s=1.0, size=32)

    monkeypatch.setattr(auto, "measure_costs", stub)
    monkeypatch.setattr(auto, "MIN_TRAIN_BATCHES", 1)  # a floor of one batch of 4 of 8 images
    config = auto_config(tmp_path, "runs").model_copy(update={"budget": "1m"})
    result = auto.choose_and_train(config, split=tiny_split(tmp_path), progress=False, report=False)
    chosen = result.results["auto"]
    sample = chosen["sample"]
    assert measured and 0 < sample["fraction"] < 0.7
    assert sample["costs"] == {
        "eval_s_per_image": 1.0,
        "train_s_per_image": 5.0,
        "setup_s_per_run": 1.0,
        "size_px": 32,
    }
    labelled = result.results["auto"]["refit"]["train_images"]  # the refit uses them all
    assert sample["train_images"] + sample["val_images"] < labelled
    assert "not the final run" in chosen["budget_covers"]
    for run in (result.run_dir / "candidates").iterdir():
        results = json.loads((run / "results.json").read_text())
        assert results["test_acc"] is None and results["num_images"]["test"] == 0
        assert not (run / "test_predictions.csv").exists()
        assert not list(run.glob("checkpoints/*.ckpt"))
    assert result.results["test_acc"] is not None  # the final run tests as always


def test_costs_are_measured_on_a_few_labelled_images(tmp_path):
    from inat_finetune.training.config import load_config

    split = tiny_split(tmp_path)
    config = load_config(None, backbone="mobilenet_v2", img_size=32, batch_size=4)
    ticks = iter(range(1000))
    costs = auto_time.measure_costs(config, split, clock=lambda: float(next(ticks)))
    # A counting clock: each timed batch of 4 images spans 1 tick (0.25 s per image); set-up
    # (building the model) spans 1 tick plus the fixed run set-up.
    assert costs == Costs(eval_s=0.25, train_s=0.25, setup_s=1.0 + auto_time.RUN_SETUP_S, size=32)


def test_what_came_before_the_first_round_counts_toward_a_time_budget():
    now = [0.0]

    def slow(name: str, epochs: int) -> Scored:
        now[0] += 10.0 * epochs  # ten seconds per epoch: round 0 40 s, round 1 40 s
        return Scored([{"a": 0.9, "b": 0.5, "c": 0.7, "d": 0.6}[name]], epochs, 10.0 * epochs)

    def rounds(spent_before: float) -> int:
        now[0] = 0.0
        halving = successive_halving(
            list("abcd"), slow, Budget(2, "m"), clock=lambda: now[0], started=-spent_before
        )
        return len(halving.rounds)

    assert rounds(30.0) == 2  # 30 + 40 + 40 = 110 s fits 2 minutes
    assert rounds(50.0) == 1  # 50 + 40 + 40 = 130 s does not


def test_the_probes_planned_passes_cost_its_larger_images(tmp_path):
    """The probe takes its features at 1.3x the crop size (288 px for 224): the planned feature
    passes cost what that many pixels cost, not what the measured size did."""
    from inat_finetune.training.config import load_config

    split = tiny_split(tmp_path)
    given = auto_config(tmp_path, "runs").model_dump(exclude_unset=True)
    config = load_config(None, **{k: v for k, v in given.items() if k != "img_size"})
    runner = auto.CandidateRunner(config, split, tmp_path / "choice")
    probe = next(c.name for c in auto.CANDIDATES if c.recipe == auto.PROBE_RECIPE)
    runner.costs = Costs(eval_s=0.01, train_s=0.03, setup_s=2.0, size=224)
    assert runner.work(probe, 1).pixel_scale == pytest.approx((288 / 224) ** 2)
    plain = replace(runner.work(probe, 1), pixel_scale=1.0)
    costs = runner.costs
    assert work_seconds(runner.work(probe, 1), costs, 100, 20) > work_seconds(plain, costs, 100, 20)
    # A size given on the command line is what the probe uses too: the passes cost as measured.
    sized = auto.CandidateRunner(load_config(None, **given), split, tmp_path / "sized")
    sized.costs = Costs(eval_s=0.01, train_s=0.03, setup_s=2.0, size=given["img_size"])
    assert sized.work(probe, 1).pixel_scale == 1.0
