"""Checking and extracting a zip archive, and the marker that says a download is complete.

Nothing is extracted before it is verified: every member name (no ``..``, absolute paths or
symbolic links), the expanded size (a zip bomb is refused), and for the full archive every
member's CRC-32 (``verify_members``). Extraction goes into a hidden staging directory inside
``dest`` (``staging_dir``) and ``install`` renames it into place, so a crash never leaves a
half-extracted tree that looks complete; macOS junk (``__MACOSX/``, ``.DS_Store``) is skipped.
Only entries this tool wrote (named in the marker) are ever replaced.

The marker ``dest/.<stem>.download.json`` is written last, after the rename: marker plus
entries on disk means complete (``is_complete``).
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import urllib.parse
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from rich.filesize import decimal

from inat_finetune.data.transfer import CHUNK_SIZE, disk_error, progress_bar
from inat_finetune.errors import UserError
from inat_finetune.runfiles import read_json, write_json_atomic

NATURE12K_URL = "https://storage.googleapis.com/wandb_datasets/nature_12K.zip"


JUNK_NAMES = frozenset({".DS_Store"})


JUNK_DIRS = frozenset({"__MACOSX"})


# What a damaged member makes zipfile raise while it is read (bad CRC, bad deflate stream,
# truncated data, encrypted or unknown compression).
ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError)


@dataclass
class DownloadResult:
    """What a download left on disk; ``root`` is the path to pass as ``--data``."""

    root: Path
    files: int
    bytes_fetched: int
    already_complete: bool = False
    skipped_members: int = 0  # macOS junk left out
    short_classes: dict[str, int] = field(default_factory=dict)  # subset: fewer than asked


class CorruptArchive(Exception):
    """The archive fails verification."""


def archive_stem(url: str) -> str:
    """``.../nature_12K.zip`` -> ``nature_12K``: names the part file and the marker."""
    name = PurePosixPath(urllib.parse.urlparse(url).path).name
    if not name:
        raise UserError(f"--url {url}: does not name a file; pass the URL of a .zip archive")
    return name[:-4] if name.lower().endswith(".zip") else name


def _marker_path(dest: Path, stem: str) -> Path:
    return dest / f".{stem}.download.json"


def read_marker(dest: Path, stem: str) -> dict[str, Any] | None:
    try:
        marker = read_json(_marker_path(dest, stem))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and "entries" in marker else None


def _count_files(paths: list[Path]) -> int:
    count = 0
    for path in paths:
        if path.is_file():
            count += 1
        else:
            count += sum(len(files) for _, _, files in os.walk(path))
    return count


def is_complete(marker: dict[str, Any], dest: Path) -> bool:
    """The marker is written only after the atomic rename, so marker + entries = complete.

    Files are not counted on purpose: deleting the duplicates ``check-data`` points out, or a
    ``.DS_Store`` from Finder, must not make the next call fetch 3.6 GB again.
    """
    return all((dest / name).exists() for name in marker["entries"])


def result_root(dest: Path, entries: list[str]) -> Path:
    return dest / entries[0] if len(entries) == 1 else dest


def prepare_dest(dest: Path, stem: str, owned: set[str]) -> None:
    """Create ``dest``, drop staging left by a crashed run, refuse to clobber foreign data."""
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--dest {dest}: cannot create it ({exc.strerror or exc})") from None
    for leftover in dest.glob(f".{stem}.staging-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    target = dest / stem
    if target.exists() and stem not in owned:
        raise UserError(
            f"{target} already exists and was not written by `inat-finetune download`; "
            "use it as --data if it is complete, or move it away and run again"
        )


def _member_path(info: zipfile.ZipInfo, source: str) -> PurePosixPath | None:
    """Where a member goes relative to the destination; None for junk. Unsafe members raise."""
    name = info.filename

    def refuse(why: str) -> UserError:
        return UserError(f"{source}: member {name!r} {why}; refusing to extract this archive")

    if stat.S_ISLNK(info.external_attr >> 16):
        raise refuse("is a symbolic link")
    # Backslashes are separators on Windows; treat them as such so no platform can be escaped.
    normalised = name.replace("\\", "/")
    if normalised.startswith("/") or PureWindowsPath(name).drive:
        raise refuse("has an absolute path")
    parts = [p for p in normalised.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise refuse("would land outside the destination (..)")
    if not parts or JUNK_DIRS.intersection(parts) or parts[-1] in JUNK_NAMES:
        return None
    return PurePosixPath(*parts)


def plan_members(
    zf: zipfile.ZipFile,
    source: str,
    archive_size: int,
    max_expand_ratio: float,
    max_bytes: int | None,
) -> tuple[list[tuple[zipfile.ZipInfo, PurePosixPath]], int]:
    """Check every member name and the expanded size; return (member, target) pairs and junk."""
    plan, junk, expanded = [], 0, 0
    for info in zf.infolist():
        target = _member_path(info, source)
        if target is None:
            junk += 1
            continue
        plan.append((info, target))
        expanded += info.file_size
    limit = int(max_expand_ratio * archive_size)
    if max_bytes is not None:
        limit = min(limit, max_bytes)
    if expanded > limit:
        raise UserError(
            f"{source}: would expand to {decimal(expanded)} from {decimal(archive_size)}, over "
            f"the {decimal(limit)} allowed; refusing a possible zip bomb"
        )
    return plan, junk


def verify_members(
    zf: zipfile.ZipFile, plan: list[tuple[zipfile.ZipInfo, PurePosixPath]], progress: bool
) -> None:
    """Read every member once: zipfile checks its CRC-32 when a member is read to the end."""
    members = [info for info, _ in plan if not info.is_dir()]
    with progress_bar(progress) as bar:
        task = bar.add_task("Verifying", total=sum(i.file_size for i in members))
        for info in members:
            try:
                with zf.open(info) as member:
                    while block := member.read(CHUNK_SIZE):
                        bar.advance(task, len(block))
            except ZIP_ERRORS as exc:
                raise CorruptArchive(f"member {info.filename!r}: {exc}") from None


@contextmanager
def staging_dir(dest: Path, stem: str) -> Iterator[Path]:
    """A hidden directory inside ``dest`` (same filesystem, so renames are atomic)."""
    path = Path(tempfile.mkdtemp(prefix=f".{stem}.staging-", dir=dest))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def extract_member(
    zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: PurePosixPath, staging: Path
) -> None:
    path = staging.joinpath(*target.parts)
    try:
        if info.is_dir():
            path.mkdir(parents=True, exist_ok=True)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        with zf.open(info) as src, open(path, "wb") as dst:
            shutil.copyfileobj(src, dst, CHUNK_SIZE)
    except ZIP_ERRORS as exc:
        raise CorruptArchive(f"member {info.filename!r}: {exc}") from None
    except OSError as exc:
        raise disk_error(path, exc, "extracting") from None


def install(staging: Path, dest: Path, owned: set[str]) -> list[str]:
    """Rename each top-level entry of ``staging`` into ``dest``; replace only our own entries."""
    entries = sorted(p.name for p in staging.iterdir())
    for name in entries:
        if (dest / name).exists() and name not in owned:
            raise UserError(
                f"{dest / name} already exists and was not written by `inat-finetune download`; "
                "move it away and run again"
            )
    for name in entries:
        target = dest / name
        if target.exists():
            # Move the old tree aside inside staging (deleted with it), then rename the new in.
            os.replace(target, staging / f".replaced-{name}")
        os.replace(staging / name, target)
    return entries


def finish(
    dest: Path, stem: str, entries: list[str], marker: dict[str, Any], fetched: int, junk: int
) -> DownloadResult:
    files = _count_files([dest / name for name in entries])
    write_json_atomic(_marker_path(dest, stem), {**marker, "entries": entries, "files": files})
    return DownloadResult(result_root(dest, entries), files, fetched, skipped_members=junk)
