"""``download_subset``: N training and M test images per class by HTTP Range reads.

Only the zip's central directory and the chosen members are read (``HTTPRangeFile``):
megabytes instead of gigabytes, the same layout on disk, so every other command works on it
unchanged. Members are chosen per class by a generator seeded with (seed, split, class), so
one class's contents never change which images another class gets. Every member read is
CRC-checked by ``zipfile``; names and the expanded size are checked as for the full archive.
"""

from __future__ import annotations

import logging
import random
import zipfile
from pathlib import Path, PurePosixPath

from inat_finetune.data.archive import (
    NATURE12K_URL,
    CorruptArchive,
    DownloadResult,
    archive_stem,
    extract_member,
    finish,
    install,
    is_complete,
    plan_members,
    prepare_dest,
    read_marker,
    result_root,
    staging_dir,
)
from inat_finetune.data.images import IMAGE_EXTENSIONS
from inat_finetune.data.transfer import TIMEOUT_S, HTTPRangeFile, progress_bar, require_space
from inat_finetune.errors import UserError

log = logging.getLogger(__name__)

# Local file header (30 bytes) + name + extra field; the local extra field may be longer than
# the central one, so a little more is fetched to usually get the whole member in one request.
LOCAL_HEADER_SLACK = 30 + 256


TEST_SPLIT_NAMES = frozenset({"val", "test"})


def _choose_members(
    plan: list[tuple[zipfile.ZipInfo, PurePosixPath]],
    train_per_class: int,
    test_per_class: int,
    seed: int,
    source: str,
) -> tuple[list[tuple[zipfile.ZipInfo, PurePosixPath]], dict[str, int]]:
    """Pick N images per class of ``train/`` and M of ``val/``/``test/``, seeded per class.

    Each class has its own generator seeded by (seed, split, class), so one class's contents
    never change which images another class gets.
    """
    groups: dict[tuple[str, str], list[tuple[zipfile.ZipInfo, PurePosixPath]]] = {}
    for info, target in plan:
        parts = target.parts
        if info.is_dir() or PurePosixPath(parts[-1]).suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        # .../<split>/<class>/<image>
        if len(parts) >= 3 and parts[-3].lower() in TEST_SPLIT_NAMES | {"train"}:
            split = "/".join(parts[:-2])
            groups.setdefault((split, parts[-2]), []).append((info, target))
    if not any(split.lower().endswith("train") for split, _ in groups) or not any(
        split.lower().rsplit("/", 1)[-1] in TEST_SPLIT_NAMES for split, _ in groups
    ):
        raise UserError(
            f"{source}: no train/<class>/<image> and val/<class>/<image> members found; "
            "--subset needs an archive laid out like nature_12K"
        )
    chosen, short = [], {}
    for (split, name), members in sorted(groups.items()):
        wanted = train_per_class if split.rsplit("/", 1)[-1].lower() == "train" else test_per_class
        members = sorted(members, key=lambda m: m[1].as_posix())
        picked = random.Random(f"{seed}:{split}/{name}").sample(members, min(wanted, len(members)))
        if len(picked) < wanted:
            short[f"{split}/{name}"] = len(picked)
        chosen.extend(picked)
    return sorted(chosen, key=lambda m: m[0].header_offset), short


def download_subset(
    url: str = NATURE12K_URL,
    dest: str | Path = Path("data"),
    train_per_class: int = 50,
    test_per_class: int = 10,
    seed: int = 42,
    *,
    timeout: float = TIMEOUT_S,
    max_expand_ratio: float = 10.0,
    max_bytes: int | None = None,
    progress: bool = True,
) -> DownloadResult:
    """Fetch N training and M test images per class by HTTP Range reads, not the whole zip."""
    if train_per_class < 1:
        raise UserError(f"--subset {train_per_class}: must be at least 1 image per class")
    if test_per_class < 1:
        raise UserError(f"--test-subset {test_per_class}: must be at least 1 image per class")
    dest = Path(dest).expanduser()
    stem = archive_stem(url)
    wanted = {
        "mode": "subset",
        "url": url,
        "train_per_class": train_per_class,
        "test_per_class": test_per_class,
        "seed": seed,
    }
    marker = read_marker(dest, stem)
    if marker and is_complete(marker, dest):
        if all(marker.get(k) == v for k, v in wanted.items() if k != "url"):
            root = result_root(dest, marker["entries"])
            return DownloadResult(root, marker["files"], 0, already_complete=True)
        if marker.get("mode") == "full":
            raise UserError(
                f"{result_root(dest, marker['entries'])} already holds the full dataset; use it "
                "as --data, or pass another --dest for the subset"
            )
    owned = set(marker["entries"]) if marker else set()
    prepare_dest(dest, stem, owned)
    with HTTPRangeFile(url, timeout) as remote:
        try:
            zf = zipfile.ZipFile(remote)  # type: ignore[arg-type]  # duck-typed file
        except (zipfile.BadZipFile, ValueError) as exc:
            raise UserError(f"{url}: not a readable zip archive ({exc})") from None
        with zf:
            plan, junk = plan_members(zf, url, remote.size, max_expand_ratio, max_bytes)
            chosen, short = _choose_members(plan, train_per_class, test_per_class, seed, url)
            require_space(dest, sum(i.file_size for i, _ in chosen), "the subset")
            with staging_dir(dest, stem) as staging:
                with progress_bar(progress, counting=True) as bar:
                    task = bar.add_task("Fetching subset", total=len(chosen))
                    for info, target in chosen:
                        name_len = len(info.orig_filename.encode("utf-8"))
                        remote.prefetch(
                            info.header_offset,
                            LOCAL_HEADER_SLACK + name_len + len(info.extra) + info.compress_size,
                        )
                        try:
                            extract_member(zf, info, target, staging)
                        except CorruptArchive as exc:
                            raise UserError(
                                f"{url}: corrupt archive ({exc}); nothing was extracted"
                            ) from None
                        bar.advance(task)
                entries = install(staging, dest, owned)
    for where, count in short.items():
        log.warning("%s has only %d images; took all of them", where, count)
    result = finish(dest, stem, entries, wanted, remote.bytes_fetched, junk)
    result.short_classes = short
    return result
