"""Fetch nature_12K (or any zip of class folders): resumable, verified, safely extracted.

The archive is 3.6 GB, so a flaky connection must not start it over, what arrives must not be
trusted, and trying the tool must not need it at all.

``download_dataset`` (the whole archive):

1. Nothing to do when a marker left by an earlier successful call says the tree is on disk.
2. Download to ``dest/<name>.zip.part`` chunk by chunk. An interrupted transfer resumes from
   the part file's size with an HTTP Range request; ``If-Range`` makes a server whose file
   changed send the whole new file instead, and a server that ignores Range also sends the
   whole file: both start over cleanly from byte 0.
3. Verify before extracting anything: the size the server announced, every member name (no
   ``..``, absolute paths or symbolic links), the expanded size, every member's CRC-32.
4. Extract into a hidden staging directory inside ``dest`` and rename into place, so a crash
   never leaves a half-extracted tree that looks complete. macOS junk (``__MACOSX/``,
   ``.DS_Store``) is skipped.

``download_subset`` reads only the zip's central directory and the chosen members with Range
requests (N training and M test images per class, chosen by seed): megabytes instead of
gigabytes, the same layout on disk, so every other command works on it unchanged.
"""


from __future__ import annotations


import errno

import http.client

import logging

import os

import random

import re

import shutil

import stat

import tempfile

import time

import urllib.parse

import urllib.request

import zipfile

import zlib

from collections.abc import Iterator

from contextlib import contextmanager

from dataclasses import dataclass, field

from pathlib import Path, PurePosixPath, PureWindowsPath

from typing import Any

from urllib.error import HTTPError, URLError

from rich.console import Console

from rich.filesize import decimal

from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from inat_finetune.data.images import IMAGE_EXTENSIONS

from inat_finetune.errors import UserError

from inat_finetune.runfiles import read_json, write_json_atomic



log = logging.getLogger(__name__)


NATURE12K_URL = "https://storage.googleapis.com/wandb_datasets/nature_12K.zip"


CHUNK_SIZE = 1 << 20


TIMEOUT_S = 60.0


USER_AGENT = "inat-finetune"


# The end-of-central-directory record (22 bytes) plus the longest comment a zip may carry.
ZIP_TAIL = 22 + 65535


# Local file header (30 bytes) + name + extra field; the local extra field may be longer than
# the central one, so a little more is fetched to usually get the whole member in one request.
LOCAL_HEADER_SLACK = 30 + 256


JUNK_NAMES = frozenset({".DS_Store"})


JUNK_DIRS = frozenset({"__MACOSX"})


TEST_SPLIT_NAMES = frozenset({"val", "test"})


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


class _Interrupted(Exception):
    """The connection dropped mid-transfer; what arrived is kept and the next try resumes."""

    def __init__(self, fetched: int, reason: str) -> None:
        super().__init__(reason)
        self.fetched = fetched


class _Corrupt(Exception):
    """The archive fails verification."""


def archive_stem(url: str) -> str:
    """``.../nature_12K.zip`` -> ``nature_12K``: names the part file and the marker."""
    name = PurePosixPath(urllib.parse.urlparse(url).path).name
    if not name:
        raise UserError(f"--url {url}: does not name a file; pass the URL of a .zip archive")
    return name[:-4] if name.lower().endswith(".zip") else name


def _progress(enabled: bool, counting: bool = False) -> Progress:
    """Bytes, rate and ETA on stderr (or done/total for ``counting``), so stdout stays clean."""
    columns = (
        (MofNCompleteColumn(),)
        if counting
        else (DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    )
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        *columns,
        console=Console(stderr=True),
        disable=not enabled,
    )


def _disk_error(path: Path, exc: OSError, what: str) -> UserError:
    if exc.errno == errno.ENOSPC:
        return UserError(
            f"{path}: disk full while {what}; free some space or pass --dest on another disk"
        )
    return UserError(f"{path}: could not write while {what} ({exc.strerror or exc})")


def _require_space(folder: Path, needed: int, what: str) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise UserError(
            f"{folder}: {decimal(free)} free but {what} needs {decimal(needed)}; "
            "free some space or pass --dest on another disk"
        )


def _http_error(url: str, exc: HTTPError) -> UserError:
    return UserError(f"{url}: HTTP {exc.code} {exc.reason}; check the address (--url)")


def _network_error(url: str, exc: URLError) -> UserError:
    return UserError(
        f"{url}: cannot reach the server ({exc.reason}); check the network connection or --url"
    )


def _parse_content_range(value: str | None) -> tuple[int, int, int | None]:
    """``bytes 100-199/1000`` -> (100, 199, 1000); the total may be ``*`` (unknown)."""
    match = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", value or "")
    if not match:
        raise _Interrupted(0, f"bad Content-Range header {value!r}")
    start, end, total = match.groups()
    return int(start), int(end), None if total == "*" else int(total)


def _marker_path(dest: Path, stem: str) -> Path:
    return dest / f".{stem}.download.json"


def _read_marker(dest: Path, stem: str) -> dict[str, Any] | None:
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


def _is_complete(marker: dict[str, Any], dest: Path) -> bool:
    """The marker is written only after the atomic rename, so marker + entries = complete.

    Files are not counted on purpose: deleting the duplicates ``check-data`` points out, or a
    ``.DS_Store`` from Finder, must not make the next call fetch 3.6 GB again.
    """
    return all((dest / name).exists() for name in marker["entries"])


def _result_root(dest: Path, entries: list[str]) -> Path:
    return dest / entries[0] if len(entries) == 1 else dest


def _prepare_dest(dest: Path, stem: str, owned: set[str]) -> None:
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


def _plan(
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


def _verify_members(
    zf: zipfile.ZipFile, plan: list[tuple[zipfile.ZipInfo, PurePosixPath]], progress: bool
) -> None:
    """Read every member once: zipfile checks its CRC-32 when a member is read to the end."""
    members = [info for info, _ in plan if not info.is_dir()]
    with _progress(progress) as bar:
        task = bar.add_task("Verifying", total=sum(i.file_size for i in members))
        for info in members:
            try:
                with zf.open(info) as member:
                    while block := member.read(CHUNK_SIZE):
                        bar.advance(task, len(block))
            except ZIP_ERRORS as exc:
                raise _Corrupt(f"member {info.filename!r}: {exc}") from None


@contextmanager
def _staging(dest: Path, stem: str) -> Iterator[Path]:
    """A hidden directory inside ``dest`` (same filesystem, so renames are atomic)."""
    path = Path(tempfile.mkdtemp(prefix=f".{stem}.staging-", dir=dest))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _extract_member(
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
        raise _Corrupt(f"member {info.filename!r}: {exc}") from None
    except OSError as exc:
        raise _disk_error(path, exc, "extracting") from None


def _install(staging: Path, dest: Path, owned: set[str]) -> list[str]:
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


def _finish(
    dest: Path, stem: str, entries: list[str], marker: dict[str, Any], fetched: int, junk: int
) -> DownloadResult:
    files = _count_files([dest / name for name in entries])
    write_json_atomic(_marker_path(dest, stem), {**marker, "entries": entries, "files": files})
    return DownloadResult(_result_root(dest, entries), files, fetched, skipped_members=junk)


def _discard(*paths: Path) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def _read_meta(path: Path) -> dict[str, Any] | None:
    try:
        meta = read_json(path)
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _read_block(response: http.client.HTTPResponse, size: int, fetched: int) -> bytes:
    try:
        return response.read(size)
    except (OSError, http.client.HTTPException) as exc:
        raise _Interrupted(fetched, str(exc) or type(exc).__name__) from None


def _fetch_once(
    url: str, part: Path, meta_path: Path, chunk_size: int, timeout: float, bar: Progress, task: Any
) -> tuple[int, int]:
    """One HTTP request appending to ``part``; returns (bytes fetched, file size)."""
    meta = _read_meta(meta_path) if part.exists() else None
    offset = part.stat().st_size if meta else 0
    total: int | None = meta.get("total") if meta else None
    if total is not None and offset > total:
        _discard(part, meta_path)  # longer than the file: not ours to trust
        offset, meta, total = 0, None, None
    if total is not None and offset == total:
        return 0, total
    headers = {"User-Agent": USER_AGENT}
    if offset and meta:
        headers["Range"] = f"bytes={offset}-"
        validator = meta.get("etag") or meta.get("last_modified")
        if validator:
            headers["If-Range"] = validator
    try:
        response = urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=timeout
        )
    except HTTPError as exc:
        if exc.code == 416 and offset:
            # The part file reaches past what the server has: the file changed. Start over.
            _discard(part, meta_path)
            return _fetch_once(url, part, meta_path, chunk_size, timeout, bar, task)
        raise _http_error(url, exc) from None
    except URLError as exc:
        raise _network_error(url, exc) from None
    except (OSError, http.client.HTTPException) as exc:
        raise _Interrupted(0, str(exc) or type(exc).__name__) from None
    with response:
        if response.status == 206:
            start, _, total = _parse_content_range(response.headers.get("Content-Range"))
            if (
                start != offset
                or total is None
                or (meta and meta.get("total") not in (None, total))
            ):
                _discard(part, meta_path)
                raise _Interrupted(0, "the server answered a different range; starting over")
            mode = "ab"
        else:
            # 200: the whole file from byte 0, because the server ignores Range or If-Range said
            # the file changed. Start over; remember the validators for the next resume.
            length = response.headers.get("Content-Length")
            offset, total, mode = 0, int(length) if length else None, "wb"
            write_json_atomic(
                meta_path,
                {
                    "url": url,
                    "total": total,
                    "etag": response.headers.get("ETag"),
                    "last_modified": response.headers.get("Last-Modified"),
                },
            )
        if total is not None:
            _require_space(part.parent, total - offset, "the download")
        bar.update(task, total=total, completed=offset)
        fetched = 0
        # Network errors become _Interrupted inside _read_block, so an OSError here is the disk.
        try:
            with open(part, mode) as handle:
                while block := _read_block(response, chunk_size, fetched):
                    handle.write(block)
                    fetched += len(block)
                    bar.advance(task, len(block))
        except OSError as exc:
            raise _disk_error(part, exc, "downloading") from None
    size = offset + fetched
    if total is None:
        # Chunked transfer without a length: nothing to resume against, the CRCs still verify.
        write_json_atomic(meta_path, {**(_read_meta(meta_path) or {}), "total": size})
        return fetched, size
    if size < total:
        raise _Interrupted(fetched, f"the connection closed after {size:,} of {total:,} bytes")
    if size > total:
        _discard(part, meta_path)
        raise UserError(
            f"{url}: received {size:,} bytes but the server announced {total:,}; deleted the "
            "download, run the command again to start afresh"
        )
    return fetched, size


def _download(
    url: str, part: Path, chunk_size: int, retries: int, timeout: float, progress: bool
) -> tuple[int, int]:
    """Download to ``part``, resuming after dropped connections; (bytes fetched, size)."""
    meta_path = part.with_name(part.name + ".json")
    fetched = 0
    with _progress(progress) as bar:
        task = bar.add_task(f"Downloading {part.name.removesuffix('.part')}", total=None)
        for attempt in range(retries + 1):
            try:
                got, size = _fetch_once(url, part, meta_path, chunk_size, timeout, bar, task)
                return fetched + got, size
            except _Interrupted as exc:
                fetched += exc.fetched
                if attempt == retries:
                    have = part.stat().st_size if part.exists() else 0
                    raise UserError(
                        f"{url}: download interrupted ({exc}); {decimal(have)} kept in {part}, "
                        "run the same command again to resume"
                    ) from None
                log.warning(
                    "Connection lost (%s); resuming (try %d of %d)", exc, attempt + 2, retries + 1
                )
                time.sleep(min(2**attempt, 30))
    raise AssertionError("unreachable")


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
    marker = _read_marker(dest, stem)
    if marker and marker.get("mode") == "full" and _is_complete(marker, dest):
        root = _result_root(dest, marker["entries"])
        return DownloadResult(root, marker["files"], 0, already_complete=True)
    owned = set(marker["entries"]) if marker else set()
    _prepare_dest(dest, stem, owned)
    part = dest / f"{stem}.zip.part"
    meta_path = part.with_name(part.name + ".json")
    fetched, size = _download(url, part, chunk_size, retries, timeout, progress)
    try:
        with zipfile.ZipFile(part) as zf:
            plan, junk = _plan(zf, url, size, max_expand_ratio, max_bytes)
            _verify_members(zf, plan, progress)
            _require_space(dest, sum(i.file_size for i, _ in plan), "extracting the archive")
            with _staging(dest, stem) as staging:
                with _progress(progress) as bar:
                    task = bar.add_task("Extracting", total=sum(i.file_size for i, _ in plan))
                    for info, target in plan:
                        _extract_member(zf, info, target, staging)
                        bar.advance(task, info.file_size)
                entries = _install(staging, dest, owned)
    except (zipfile.BadZipFile, _Corrupt) as exc:
        _discard(part, meta_path)
        raise UserError(
            f"{url}: the downloaded archive is corrupt ({exc}); deleted it, nothing was "
            "extracted. Run the command again to download it afresh"
        ) from None
    result = _finish(dest, stem, entries, {"mode": "full", "url": url}, fetched, junk)
    _discard(part, meta_path)
    return result


class HTTPRangeFile:
    """A read-only, seekable file over HTTP Range requests: enough for ``zipfile`` to read.

    It keeps one buffer of the last range fetched; ``prefetch`` fills it with a whole member
    so zipfile's several small reads (header, name, data) cost one request. ``bytes_fetched``
    counts body bytes received.
    """

    def __init__(self, url: str, timeout: float = TIMEOUT_S, retries: int = 3) -> None:
        self.url = url
        self.timeout = timeout
        self.retries = retries
        self.bytes_fetched = 0
        self.requests = 0
        self.pos = 0
        # A suffix range gets the file's size and its tail (where the central directory ends)
        # in one request.
        self._data, self._start, total = self._get(f"-{ZIP_TAIL}")
        if total is None:
            raise UserError(
                f"{url}: the server did not say how large the file is; "
                "download the full archive without --subset"
            )
        self.size = total

    def _get(self, spec: str) -> tuple[bytes, int, int | None]:
        request = urllib.request.Request(
            self.url, headers={"Range": f"bytes={spec}", "User-Agent": USER_AGENT}
        )
        reason = ""
        for _ in range(self.retries + 1):
            self.requests += 1
            try:
                response = urllib.request.urlopen(request, timeout=self.timeout)
            except HTTPError as exc:
                raise _http_error(self.url, exc) from None
            except URLError as exc:
                raise _network_error(self.url, exc) from None
            except (OSError, http.client.HTTPException) as exc:
                reason = str(exc)
                continue
            with response:
                if response.status != 206:
                    raise UserError(
                        f"{self.url}: the server ignores HTTP Range requests, which --subset "
                        "needs; download the full archive without --subset"
                    )
                try:
                    start, end, total = _parse_content_range(response.headers.get("Content-Range"))
                    data = response.read()
                except _Interrupted as exc:
                    raise UserError(f"{self.url}: {exc}") from None
                except (OSError, http.client.HTTPException) as exc:
                    data, reason = getattr(exc, "partial", b""), str(exc) or type(exc).__name__
                    self.bytes_fetched += len(data)
                    continue
            self.bytes_fetched += len(data)
            if len(data) == end - start + 1:
                return data, start, total
            reason = f"got {len(data)} of {end - start + 1} bytes"
        raise UserError(
            f"{self.url}: the connection keeps dropping ({reason}); run the command again"
        )

    def _covered(self, start: int, length: int) -> bool:
        return self._start <= start and start + length <= self._start + len(self._data)

    def prefetch(self, start: int, length: int) -> None:
        length = min(length, self.size - start)
        if length > 0 and not self._covered(start, length):
            self._fill(start, length)

    def _fill(self, start: int, length: int) -> None:
        data, got, _ = self._get(f"{start}-{start + length - 1}")
        if got != start:
            raise UserError(f"{self.url}: the server answered a different range than asked")
        self._data, self._start = data, start

    def read(self, n: int | None = -1) -> bytes:
        if n is None or n < 0:
            n = self.size - self.pos
        n = max(0, min(n, self.size - self.pos))
        if n == 0:
            return b""
        if not self._covered(self.pos, n):
            self._fill(self.pos, n)
        offset = self.pos - self._start
        self.pos += n
        return self._data[offset : offset + n]

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.pos, os.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise OSError(errno.EINVAL, "negative seek position")
        self.pos = base + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._data = b""

    def __enter__(self) -> HTTPRangeFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
    marker = _read_marker(dest, stem)
    if marker and _is_complete(marker, dest):
        if all(marker.get(k) == v for k, v in wanted.items() if k != "url"):
            root = _result_root(dest, marker["entries"])
            return DownloadResult(root, marker["files"], 0, already_complete=True)
        if marker.get("mode") == "full":
            raise UserError(
                f"{_result_root(dest, marker['entries'])} already holds the full dataset; use it "
                "as --data, or pass another --dest for the subset"
            )
    owned = set(marker["entries"]) if marker else set()
    _prepare_dest(dest, stem, owned)
    with HTTPRangeFile(url, timeout) as remote:
        try:
            zf = zipfile.ZipFile(remote)  # type: ignore[arg-type]  # duck-typed file
        except (zipfile.BadZipFile, ValueError) as exc:
            raise UserError(f"{url}: not a readable zip archive ({exc})") from None
        with zf:
            plan, junk = _plan(zf, url, remote.size, max_expand_ratio, max_bytes)
            chosen, short = _choose_members(plan, train_per_class, test_per_class, seed, url)
            _require_space(dest, sum(i.file_size for i, _ in chosen), "the subset")
            with _staging(dest, stem) as staging:
                with _progress(progress, counting=True) as bar:
                    task = bar.add_task("Fetching subset", total=len(chosen))
                    for info, target in chosen:
                        name_len = len(info.orig_filename.encode("utf-8"))
                        remote.prefetch(
                            info.header_offset,
                            LOCAL_HEADER_SLACK + name_len + len(info.extra) + info.compress_size,
                        )
                        try:
                            _extract_member(zf, info, target, staging)
                        except _Corrupt as exc:
                            raise UserError(
                                f"{url}: corrupt archive ({exc}); nothing was extracted"
                            ) from None
                        bar.advance(task)
                entries = _install(staging, dest, owned)
    for where, count in short.items():
        log.warning("%s has only %d images; took all of them", where, count)
    result = _finish(dest, stem, entries, wanted, remote.bytes_fetched, junk)
    result.short_classes = short
    return result

