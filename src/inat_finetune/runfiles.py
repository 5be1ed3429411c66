"""Run directories and atomic file writes.

Every file a run leaves behind is written to a temporary file in the same directory and then
renamed over the target, so a crash mid-write leaves the previous version intact.

A write the destination cannot take (disk full, quota, read-only or failing device), whether
the ``OSError`` comes straight from the file or wrapped by the writer (torch's zip writer
raises ``RuntimeError: ... unexpected pos``), raises ``WriteFailedError``: one line naming the
file and the fix. The temporary file is removed and the previous version is left as it was.

``check_output_file`` and ``check_output_dir`` refuse, before any work is done, an output
option that cannot be written: a file option naming a folder, a folder option naming a file,
or either one under an existing file.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import yaml

from inat_finetune.errors import (
    UserError,
    WriteFailedError,
    describe_write_failure,
    write_failure,
)


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write`` on a temporary file next to ``path``, fsync it, then rename it into place.

    Raises ``WriteFailedError`` (a ``UserError``) when the destination cannot take the file;
    ``path`` then still holds its previous content, and no temporary file is left.
    """
    path = Path(path)
    try:
        return _write_and_replace(path, write)
    except WriteFailedError:
        raise
    except Exception as exc:
        failure = write_failure(exc)
        if failure is None:
            raise
        kept = "the previous version is intact" if path.exists() else ""
        raise WriteFailedError(describe_write_failure(path, failure, kept)) from exc


def _write_and_replace(path: Path, write: Callable[[IO[bytes]], None]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates 0600 files; give run files the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_name, 0o666 & ~umask)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def write_json_atomic(path: str | Path, data: Any) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_yaml_atomic(path: str | Path, data: Any) -> Path:
    return write_text_atomic(path, yaml.safe_dump(data, sort_keys=False))


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _file_above(path: Path) -> Path | None:
    """The nearest existing ancestor of ``path`` when it is not a folder, else None."""
    for parent in path.parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def check_output_file(path: str | Path | None, option: str, example: str) -> None:
    """Refuse an output file option that names a folder, or lies under a file (``example``:
    a file name to suggest inside the folder)."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise UserError(
            f"{option} {path}: is a directory, not a file; name a file, such as {path / example}"
        )
    blocker = _file_above(path)
    if blocker is not None:
        raise UserError(f"{option} {path}: {blocker} is a file, not a folder; choose another path")


def check_output_dir(path: str | Path | None, option: str) -> None:
    """Refuse an output folder option that names an existing file, or lies under one."""
    if path is None:
        return
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{option} {path}: is a file, not a folder; name a folder")
    blocker = _file_above(path)
    if blocker is not None:
        raise UserError(f"{option} {path}: {blocker} is a file, not a folder; choose another path")


def new_run_dir(output: str | Path, name: str) -> Path:
    """Create ``output/<timestamp>-<name>``; never reuses an existing directory."""
    safe_name = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "run"
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(output) / f"{stamp}-{safe_name}"
    candidate, suffix = base, 1
    while True:
        try:
            candidate.mkdir(parents=True, exist_ok=False)
            return candidate
        except FileExistsError:
            suffix += 1
            candidate = base.with_name(f"{base.name}-{suffix}")
