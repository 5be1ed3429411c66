"""Property-based tests (hypothesis): the split and the configuration parser, for any input."""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

import yaml
from conftest import write_image
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inat_finetune.data.folders import make_split, split_stratified
from inat_finetune.errors import UserError
from inat_finetune.training.config import TrainConfig, load_config

# File and class names as they come: any printable text, spaces and non-ASCII included.
names = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=8
)
datasets = st.dictionaries(names, st.sets(names, max_size=25).map(sorted), min_size=1, max_size=6)
fractions = st.floats(0.01, 0.99)
seeds = st.integers(-(2**40), 2**40)


def expected_held(n: int, fraction: float) -> int:
    """round(n * fraction) of a class, but at least one and never all where it has two."""
    held = round(n * fraction)
    return min(max(held, 1), n - 1) if n >= 2 else held


@settings(max_examples=300, deadline=None)
@given(datasets, fractions, seeds)
def test_split_is_stratified_disjoint_complete_and_deterministic(by_class, fraction, seed):
    kept, held = split_stratified(by_class, fraction, seed)
    assert kept.keys() == held.keys() == by_class.keys()
    for name, files in by_class.items():
        assert not set(kept[name]) & set(held[name])
        assert sorted(kept[name] + held[name]) == sorted(files)
        assert len(held[name]) == expected_held(len(files), fraction)
    assert split_stratified(by_class, fraction, seed) == (kept, held)
    shuffled = {k: random.Random(0).sample(v, len(v)) for k, v in reversed(by_class.items())}
    assert split_stratified(shuffled, fraction, seed) == (kept, held)  # order does not matter


@settings(max_examples=300, deadline=None)
@given(datasets, datasets, fractions, seeds)
def test_a_class_keeps_its_split_when_other_classes_change(by_class, others, fraction, seed):
    name = next(iter(by_class))
    changed = {k: v for k, v in others.items() if k != name}  # others added, grown, removed
    changed[name] = by_class[name]
    assert [s[name] for s in split_stratified(changed, fraction, seed)] == [
        s[name] for s in split_stratified(by_class, fraction, seed)
    ]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(
        st.sampled_from(["ant", "bee", "moth", "wasp"]), st.integers(1, 12), min_size=2
    ),
    st.integers(0, 2**32),
    st.sampled_from(["ant", "bee", "moth", "wasp"]),
)
def test_make_split_on_disk_is_stratified_and_stable(counts, seed, grown):
    """The same properties end to end, on real image folders (flat layout: test, then val)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for c, (name, n) in enumerate(sorted(counts.items())):
            for i in range(n):
                write_image(root / name / f"{i}.png", c * 100 + i, size=(8, 8))
        split = make_split(root, seed, val_fraction=0.25, test_fraction=0.2)
        assert split.classes == sorted(counts)
        for name, n in counts.items():
            parts = [split.train[name], split.val[name], split.test[name]]
            assert sum(map(len, parts)) == len(set().union(*parts)) == n
            assert len(split.test[name]) == expected_held(n, 0.2)
            rest = n - len(split.test[name])
            assert len(split.val[name]) == expected_held(rest, 0.25)
        assert make_split(root, seed, 0.25, 0.2) == split
        for i in range(3):  # grow one class: no other class moves
            write_image(root / grown / f"new{i}.png", 9000 + i, size=(8, 8))
        again = make_split(root, seed, 0.25, 0.2)
        for name in set(counts) - {grown}:
            for part in ("train", "val", "test"):
                assert getattr(again, part)[name] == getattr(split, part)[name]


values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=4,
)
keys = st.sampled_from(sorted(TrainConfig.model_fields)) | st.text(max_size=12)


def _config_or_one_line_error(path: Path) -> TrainConfig | None:
    try:
        config = load_config(path)
    except UserError as error:
        message = str(error)
        assert "\n" not in message and str(path) in message
        return None
    # Whatever was accepted round-trips through the config.yaml a run writes.
    path.write_text(yaml.safe_dump(config.to_yaml_dict()), encoding="utf-8")
    assert load_config(path) == config
    return config


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(keys, values, max_size=6))
def test_any_yaml_mapping_is_a_config_or_a_one_line_error(mapping):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "exp.yaml"
        path.write_text(yaml.safe_dump(mapping), encoding="utf-8")
        _config_or_one_line_error(path)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_any_file_content_is_a_config_or_a_one_line_error(content):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "exp.yaml"
        path.write_bytes(content)
        _config_or_one_line_error(path)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(TrainConfig.model_fields)), values, max_size=4))
def test_any_command_line_values_are_a_config_or_a_one_line_error(options):
    try:
        config = load_config(None, **options)
    except UserError as error:
        # Named by the option: "options: lr=..." from validation, "--recipe x: ..." from lookup.
        assert "\n" not in str(error) and str(error).startswith(("options: ", "--"))
    else:
        assert TrainConfig(**config.to_yaml_dict()) == config
