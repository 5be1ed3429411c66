"""HTTP transfer: a resumable download to a part file, and a seekable file over Range reads.

``download_file`` downloads ``url`` to ``part`` chunk by chunk. An interrupted transfer
resumes from the part file's size with an HTTP Range request; ``If-Range`` makes a server
whose file changed send the whole new file instead, and a server that ignores Range also sends
the whole file: both start over cleanly from byte 0. The server's validators (ETag,
Last-Modified) and announced size live beside the part file in ``<part>.json``; a part file
longer than the announced size, or a response of another size, is deleted, never trusted.

``HTTPRangeFile`` is what ``zipfile`` reads for ``--subset``: one buffered range at a time.

Errors are ``UserError`` naming the URL (``--url``) or the disk (``--dest``) and the fix.
"""

from __future__ import annotations

import errno
import http.client
import logging
import os
import re
import shutil
import time
import urllib.request
from pathlib import Path
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

from inat_finetune.errors import UserError
from inat_finetune.runfiles import read_json, write_json_atomic

log = logging.getLogger(__name__)

CHUNK_SIZE = 1 << 20


TIMEOUT_S = 60.0


USER_AGENT = "inat-finetune"


# The end-of-central-directory record (22 bytes) plus the longest comment a zip may carry.
ZIP_TAIL = 22 + 65535


class _Interrupted(Exception):
    """The connection dropped mid-transfer; what arrived is kept and the next try resumes."""

    def __init__(self, fetched: int, reason: str) -> None:
        super().__init__(reason)
        self.fetched = fetched


def progress_bar(enabled: bool, counting: bool = False) -> Progress:
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


def disk_error(path: Path, exc: OSError, what: str) -> UserError:
    if exc.errno == errno.ENOSPC:
        return UserError(
            f"{path}: disk full while {what}; free some space or pass --dest on another disk"
        )
    return UserError(f"{path}: could not write while {what} ({exc.strerror or exc})")


def require_space(folder: Path, needed: int, what: str) -> None:
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


def discard(*paths: Path) -> None:
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


def _resume_point(part: Path, meta_path: Path) -> tuple[int, dict[str, Any] | None]:
    """Where to resume ``part`` from and what the server said about it; (0, None) = afresh."""
    meta = _read_meta(meta_path) if part.exists() else None
    offset = part.stat().st_size if meta else 0
    total = meta.get("total") if meta else None
    if total is not None and offset > total:
        discard(part, meta_path)  # longer than the file: not ours to trust
        return 0, None
    return offset, meta


def _request_headers(offset: int, meta: dict[str, Any] | None) -> dict[str, str]:
    """A Range from ``offset``, with If-Range so a changed file is sent whole instead."""
    headers = {"User-Agent": USER_AGENT}
    if offset and meta:
        headers["Range"] = f"bytes={offset}-"
        validator = meta.get("etag") or meta.get("last_modified")
        if validator:
            headers["If-Range"] = validator
    return headers


def _where_body_starts(
    response: http.client.HTTPResponse,
    url: str,
    part: Path,
    meta_path: Path,
    offset: int,
    meta: dict[str, Any] | None,
) -> tuple[int, int | None, str]:
    """(offset, total, file mode) for this response: append on 206, start over on 200."""
    if response.status == 206:
        start, _, total = _parse_content_range(response.headers.get("Content-Range"))
        if start != offset or total is None or (meta and meta.get("total") not in (None, total)):
            discard(part, meta_path)
            raise _Interrupted(0, "the server answered a different range; starting over")
        return offset, total, "ab"
    # 200: the whole file from byte 0, because the server ignores Range or If-Range said
    # the file changed. Start over; remember the validators for the next resume.
    length = response.headers.get("Content-Length")
    total = int(length) if length else None
    write_json_atomic(
        meta_path,
        {
            "url": url,
            "total": total,
            "etag": response.headers.get("ETag"),
            "last_modified": response.headers.get("Last-Modified"),
        },
    )
    return 0, total, "wb"


def _write_body(
    response: http.client.HTTPResponse,
    part: Path,
    mode: str,
    chunk_size: int,
    bar: Progress,
    task: Any,
) -> int:
    """Copy the response body into ``part``; the bytes written."""
    fetched = 0
    # Network errors become _Interrupted inside _read_block, so an OSError here is the disk.
    try:
        with open(part, mode) as handle:
            while block := _read_block(response, chunk_size, fetched):
                handle.write(block)
                fetched += len(block)
                bar.advance(task, len(block))
    except OSError as exc:
        raise disk_error(part, exc, "downloading") from None
    return fetched


def _check_received(
    url: str, part: Path, meta_path: Path, fetched: int, size: int, total: int | None
) -> None:
    """The part file has exactly the announced size (an unknown size is recorded instead)."""
    if total is None:
        # Chunked transfer without a length: nothing to resume against, the CRCs still verify.
        write_json_atomic(meta_path, {**(_read_meta(meta_path) or {}), "total": size})
        return
    if size < total:
        raise _Interrupted(fetched, f"the connection closed after {size:,} of {total:,} bytes")
    if size > total:
        discard(part, meta_path)
        raise UserError(
            f"{url}: received {size:,} bytes but the server announced {total:,}; deleted the "
            "download, run the command again to start afresh"
        )


def _fetch_once(
    url: str, part: Path, meta_path: Path, chunk_size: int, timeout: float, bar: Progress, task: Any
) -> tuple[int, int]:
    """One HTTP request appending to ``part``; returns (bytes fetched, file size)."""
    offset, meta = _resume_point(part, meta_path)
    if meta and meta.get("total") is not None and offset == meta["total"]:
        return 0, offset
    request = urllib.request.Request(url, headers=_request_headers(offset, meta))
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except HTTPError as exc:
        if exc.code == 416 and offset:
            # The part file reaches past what the server has: the file changed. Start over.
            discard(part, meta_path)
            return _fetch_once(url, part, meta_path, chunk_size, timeout, bar, task)
        raise _http_error(url, exc) from None
    except URLError as exc:
        raise _network_error(url, exc) from None
    except (OSError, http.client.HTTPException) as exc:
        raise _Interrupted(0, str(exc) or type(exc).__name__) from None
    with response:
        offset, total, mode = _where_body_starts(response, url, part, meta_path, offset, meta)
        if total is not None:
            require_space(part.parent, total - offset, "the download")
        bar.update(task, total=total, completed=offset)
        fetched = _write_body(response, part, mode, chunk_size, bar, task)
    _check_received(url, part, meta_path, fetched, offset + fetched, total)
    return fetched, offset + fetched


def download_file(
    url: str, part: Path, chunk_size: int, retries: int, timeout: float, progress: bool
) -> tuple[int, int]:
    """Download to ``part``, resuming after dropped connections; (bytes fetched, size)."""
    meta_path = part.with_name(part.name + ".json")
    fetched = 0
    with progress_bar(progress) as bar:
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
