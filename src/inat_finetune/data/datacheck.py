"""Check a dataset before training on it: counts, unreadable files, duplicates, missing classes.

The most expensive mistake a dataset can hide is a test image that is also a training image:
the test accuracy then measures memory, not generalisation. nature_12K-style scrapes often
carry exact copies, so duplicates are found by content, not by name.

Image files the scan refuses without decoding them (too many pixels, too elongated or over the
image memory budget, a named pipe or device; see ``data``) are listed as refused, with the
limit they break, and never counted as readable images.

Hashing only files whose size another file shares keeps this fast: identical bytes imply an
identical size, and photo sizes rarely collide, so most files are never read at all.

``check_data`` is the full report behind ``inat-finetune check-data``; ``assert_no_leakage``
is the quick check ``train`` and ``compare`` run on the split they are about to use.
"""


from __future__ import annotations


import hashlib

import logging

import os

from collections import defaultdict

from collections.abc import Iterable

from concurrent.futures import ThreadPoolExecutor

from dataclasses import dataclass, field, replace

from pathlib import Path

from rich.console import Console

from rich.table import Table

from inat_finetune.data.folders import DataSplit, SkippedFile, detect_layout, scan_class_folders

from inat_finetune.errors import UserError



log = logging.getLogger(__name__)


HASH_BLOCK = 1 << 20


# Reasons data/ gives for files that were never meant to be images (.DS_Store, notes):
# ignored quietly, unlike image files that fail to decode.
JUNK_REASONS = ("not an image file", "not in a class folder")


# Reasons for image files refused before decoding (data.memory_refusal, data.open_regular):
# reported as refused, not as "does not decode", so the limit they broke is named.
REFUSED_REASONS = ("over the image memory budget", "over the pixel limit", "not a regular file")


@dataclass
class DataReport:
    """What ``check_data`` found. ``errors`` make ``check-data`` exit non-zero."""

    root: str
    layout: str
    classes: list[str]
    counts: dict[str, dict[str, int]]  # split folder -> class -> readable images
    ignored: list[SkippedFile] = field(default_factory=list)  # non-image files
    # image files that do not decode, or are refused before decoding (REFUSED_REASONS)
    unreadable: list[SkippedFile] = field(default_factory=list)
    duplicates: list[list[str]] = field(default_factory=list)  # groups of identical files
    missing: dict[str, list[str]] = field(default_factory=dict)  # split -> classes absent
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def _hash_file(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        while block := handle.read(HASH_BLOCK):
            digest.update(block)  # releases the GIL on large buffers: threads really overlap
    return digest.hexdigest()


def find_duplicates(paths: Iterable[Path]) -> list[list[Path]]:
    """Groups (2+) of files with identical bytes; only files sharing a size are hashed."""
    by_size: dict[int, list[Path]] = defaultdict(list)
    for path in dict.fromkeys(paths):
        by_size[path.stat().st_size].append(path)
    candidates = [p for group in by_size.values() if len(group) > 1 for p in group]
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        digests = list(pool.map(_hash_file, candidates))
    by_digest: dict[str, list[Path]] = defaultdict(list)
    for path, digest in zip(candidates, digests, strict=True):
        by_digest[digest].append(path)
    return sorted(sorted(g) for g in by_digest.values() if len(g) > 1)


def _plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _split_of(rel: str, split_names: list[str]) -> str:
    for name in split_names:
        if name == "." or rel.startswith(name + "/"):
            return name
    return "?"


def _class_of(rel: str) -> str:
    return rel.split("/")[-2]


def check_data(path: str | Path, progress: bool = False) -> DataReport:
    """Scan every split folder of ``path`` and report what would hurt training or testing."""
    layout = detect_layout(path)
    root = layout.root
    # Split folders as they are on disk. nature_12K's val/ is the test set: say "val" because
    # that is the folder the user sees; the role is explained in the messages.
    folders = {"train": layout.train_dir}
    if layout.val_dir is not None:
        folders["val"] = layout.val_dir
    if layout.test_dir is not None:
        folders["test"] = layout.test_dir
    names = {role: d.relative_to(root).as_posix() for role, d in folders.items()}
    by_split: dict[str, dict[str, list[str]]] = {}
    skipped: list[SkippedFile] = []
    for role, folder in folders.items():
        found, junk = scan_class_folders(folder, root, progress)
        by_split[names[role]] = found
        skipped += junk
    classes = sorted({c for found in by_split.values() for c in found})
    report = DataReport(
        root=str(root),
        layout=layout.kind,
        classes=classes,
        counts={s: {c: len(found.get(c, [])) for c in classes} for s, found in by_split.items()},
        ignored=[s for s in skipped if s.reason.startswith(JUNK_REASONS)],
        unreadable=[s for s in skipped if not s.reason.startswith(JUNK_REASONS)],
    )
    for split, counts in report.counts.items():
        absent = [c for c, n in counts.items() if n == 0]
        if absent:
            report.missing[split] = absent
    all_files = [
        root / rel for found in by_split.values() for files in found.values() for rel in files
    ]
    report.duplicates = [
        [p.relative_to(root).as_posix() for p in group] for group in find_duplicates(all_files)
    ]
    _judge(report, names)
    return report


def _judge(report: DataReport, names: dict[str, str]) -> None:
    """Sort the findings into errors (training would fail or results would lie) and warnings."""
    train, test = names["train"], names.get("test")
    split_names = sorted(names.values(), key=len, reverse=True)
    if len(report.classes) < 2:
        report.errors.append(
            f"only {len(report.classes)} class found; a classifier needs two or more"
        )
    for split, absent in report.missing.items():
        listed = ", ".join(absent)
        if split == train:
            report.errors.append(
                f"{split}/ has no readable images of {listed}: the model cannot learn them; "
                "add training images or remove those classes everywhere"
            )
        else:
            role = "test" if split == test else "validation"
            report.warnings.append(f"{split}/ ({role} set) has no images of {listed}: not measured")
    across, within = [], []
    for group in report.duplicates:
        splits = {_split_of(rel, split_names) for rel in group}
        (across if len(splits) > 1 else within).append(group)
    if across:
        example = " == ".join(across[0][:2])
        leaked = _plural(len(across), "image appears", "images appear")
        report.errors.append(
            f"{leaked} in more than one split (identical bytes), e.g. {example}: "
            "images leak between splits and inflate the scores; delete one copy of each"
        )
    if within:
        mixed = sum(len({_class_of(rel) for rel in g}) > 1 for g in within)
        note = f", {mixed} of them under different classes" if mixed else ""
        groups = _plural(len(within), "group", "groups")
        report.warnings.append(
            f"{groups} of identical images inside a split{note}; when the validation or test "
            "set is carved out of that split the copies can land on both sides"
        )
    refused = [u for u in report.unreadable if u.reason.startswith(REFUSED_REASONS)]
    broken = len(report.unreadable) - len(refused)
    if broken:
        report.warnings.append(
            f"{_plural(broken, 'image file does', 'image files do')} not decode and will be skipped"
        )
    if refused:
        report.warnings.append(
            f"{_plural(len(refused), 'file is', 'files are')} refused without decoding (over the "
            "pixel limit or the image memory budget, or not a regular file) and will be skipped"
        )


def render(report: DataReport, console: Console, limit: int = 10) -> None:
    """Print the counts table, then the problems, the first ``limit`` of each kind in full."""
    splits = list(report.counts)
    plain = {"soft_wrap": True, "highlight": False}  # paths whole, so they can be copied
    console.print(f"{report.root} ({report.layout} layout)", **plain)
    table = Table()
    table.add_column("class")
    for split in splits:
        table.add_column("images" if split == "." else f"{split}/", justify="right")
    for name in report.classes:
        cells = [report.counts[s][name] for s in splits]
        table.add_row(name, *(f"{n:,}" if n else "[red]0[/]" for n in cells))
    table.add_section()
    table.add_row("total", *(f"{sum(report.counts[s].values()):,}" for s in splits))
    console.print(table)
    if report.ignored:
        console.print(f"ignored {len(report.ignored)} non-image files (.DS_Store and the like)")
    for item in report.unreadable[:limit]:
        label = "refused" if item.reason.startswith(REFUSED_REASONS) else "unreadable"
        console.print(f"  {label}: {item.path}: {item.reason}", **plain)
    if len(report.unreadable) > limit:
        console.print(f"  ... and {len(report.unreadable) - limit} more unreadable files")
    for group in report.duplicates[:limit]:
        console.print(f"  identical: {' == '.join(group)}", **plain)
    if len(report.duplicates) > limit:
        console.print(f"  ... and {len(report.duplicates) - limit} more groups of identical files")
    for message in report.warnings:
        console.print(f"[yellow]warning:[/] {message}", **plain)
    for message in report.errors:
        console.print(f"[bold red]error:[/] {message}", **plain)
    verdict = "[green]ok[/]" if report.ok else f"[bold red]{len(report.errors)} error(s)[/]"
    console.print(f"{verdict}, {len(report.warnings)} warning(s)")


def find_leaks(split: DataSplit) -> list[tuple[Path, Path]]:
    """(test image, identical training/validation image) pairs, one per leaked test image.

    Cheap enough to run before every training: only files sharing a size are read.
    """
    root = Path(split.root)

    def files(part: dict[str, list[str]]) -> set[Path]:
        return {root / rel for rels in part.values() for rel in rels}

    test = files(split.test)
    seen = files(split.train) | files(split.val)
    pairs = []
    for group in find_duplicates(test | seen):
        in_seen = [p for p in group if p in seen]
        if in_seen:
            pairs.extend((p, in_seen[0]) for p in group if p in test)
    return pairs


def assert_no_leakage(split: DataSplit, limit: int = 3) -> None:
    """Refuse a split whose test images are byte-identical to training or validation images."""
    root = Path(split.root)
    pairs = find_leaks(split)
    if pairs:
        shown = "; ".join(
            f"{a.relative_to(root).as_posix()} == {b.relative_to(root).as_posix()}"
            for a, b in pairs[:limit]
        )
        more = f" and {len(pairs) - limit} more" if len(pairs) > limit else ""
        raise UserError(
            f"{root}: {len(pairs)} test images are identical to training/validation images "
            f"({shown}{more}); delete the copies (`inat-finetune check-data {root}` lists them)"
        )


def drop_leaked_test_images(split: DataSplit) -> DataSplit:
    """Remove test images identical to a training/validation image; record them as skipped.

    For test sets this tool carved out itself: the copies are the dataset's, the leak would be
    ours, so the test set is made clean instead of refusing the data.
    """
    root = Path(split.root)
    leaked = {
        a.relative_to(root).as_posix(): b.relative_to(root).as_posix() for a, b in find_leaks(split)
    }
    if not leaked:
        return split
    test = {name: [f for f in files if f not in leaked] for name, files in split.test.items()}
    skipped = split.skipped + [
        SkippedFile(test_file, f"duplicate of a training image ({seen_file})")
        for test_file, seen_file in leaked.items()
    ]
    log.warning("Removed %d test images identical to training/validation images", len(leaked))
    return replace(split, test=test, skipped=skipped)

