"""Fetch nature_12K (or any zip of class folders): resumable, verified, safely extracted.

The archive is 3.6 GB, so a flaky connection must not start it over, what arrives must not be
trusted, and trying the tool must not need it at all.

``download_dataset`` (the whole archive):

1. Nothing to do when a marker left by an earlier successful call says the tree is on disk.
2. Download to ``dest/<name>.zip.part``, resuming after dropped connections
   (``data.transfer``).
3. Verify before extracting anything: the size the server announced, every member name, the
   expanded size, every member's CRC-32 (``data.archive``).
4. Extract into a hidden staging directory inside ``dest`` and rename into place, so a crash
   never leaves a half-extracted tree that looks complete (``data.archive``).

``download_subset`` (``data.subset``, importable from here too) reads only the zip's central
directory and the chosen members: N training and M test images per class.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

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
    verify_members,
)
from inat_finetune.data.subset import download_subset
from inat_finetune.data.transfer import (
    CHUNK_SIZE,
    TIMEOUT_S,
    HTTPRangeFile,
    discard,
    download_file,
    progress_bar,
    require_space,
)
from inat_finetune.errors import UserError

__all__ = [
    "NATURE12K_URL",
    "DownloadResult",
    "HTTPRangeFile",
    "archive_stem",
    "download_dataset",
    "download_subset",
]


def download_dataset(
    url: str = NATURE12K_URL,
    dest: str | Path = Path("data"),
    *,
    chunk_size: int = CHUNK_SIZE,
    retries: int = 3,
    timeout: float = TIMEOUT_S,
    max_expand_ratio: float = 10.0,
    max_bytes: int | None = None,
    progress: bool = True,
) -> DownloadResult:
    """Download, verify and extract the whole archive into ``dest``; a no-op once complete."""
    dest = Path(dest).expanduser()
    stem = archive_stem(url)
    marker = read_marker(dest, stem)
    if marker and marker.get("mode") == "full" and is_complete(marker, dest):
        root = result_root(dest, marker["entries"])
        return DownloadResult(root, marker["files"], 0, already_complete=True)
    owned = set(marker["entries"]) if marker else set()
    prepare_dest(dest, stem, owned)
    part = dest / f"{stem}.zip.part"
    meta_path = part.with_name(part.name + ".json")
    fetched, size = download_file(url, part, chunk_size, retries, timeout, progress)
    try:
        with zipfile.ZipFile(part) as zf:
            plan, junk = plan_members(zf, url, size, max_expand_ratio, max_bytes)
            verify_members(zf, plan, progress)
            require_space(dest, sum(i.file_size for i, _ in plan), "extracting the archive")
            with staging_dir(dest, stem) as staging:
                with progress_bar(progress) as bar:
                    task = bar.add_task("Extracting", total=sum(i.file_size for i, _ in plan))
                    for info, target in plan:
                        extract_member(zf, info, target, staging)
                        bar.advance(task, info.file_size)
                entries = install(staging, dest, owned)
    except (zipfile.BadZipFile, CorruptArchive) as exc:
        discard(part, meta_path)
        raise UserError(
            f"{url}: the downloaded archive is corrupt ({exc}); deleted it, nothing was "
            "extracted. Run the command again to download it afresh"
        ) from None
    result = finish(dest, stem, entries, {"mode": "full", "url": url}, fetched, junk)
    discard(part, meta_path)
    return result
