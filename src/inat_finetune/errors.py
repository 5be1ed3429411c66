"""The one exception type the CLI turns into a one-line message instead of a traceback.

Also how a failed write is recognised and named: a full disk, a quota, a read-only or failing
device (``write_failure``), whether it reached us as an ``OSError`` or wrapped in another
exception (torch's zip writer raises ``RuntimeError: ... unexpected pos`` and keeps the
``OSError`` only as its context).
"""

from __future__ import annotations

import errno

# errno values that say the destination cannot take the bytes, whatever was being written,
# and what the user can do about each.
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_FIXES = {
    **dict.fromkeys(NO_SPACE, "free some space or choose another --output"),
    errno.EIO: "check the disk, or choose another --output",
    errno.EROFS: "choose a writable --output",
    errno.EACCES: "choose a writable --output",
    errno.EPERM: "choose a writable --output",
}
WRITE_ERRNOS = frozenset(_FIXES)


class UserError(Exception):
    """Bad input from the user: the message names the file or option and what to do."""


class WriteFailedError(UserError):
    """A file could not be written (disk full, quota, read-only...); the old one is intact."""


def write_failure(exc: BaseException) -> OSError | None:
    """The ``OSError`` of a failed write behind ``exc`` (itself, its cause or context), if any."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in WRITE_ERRNOS:
            return current
        current = current.__cause__ or current.__context__
    return None


def write_fix(error: OSError) -> str:
    """What to do about a failed write, by its errno."""
    return _FIXES.get(error.errno or 0, "choose another --output")


def describe_write_failure(path: object, error: OSError, kept: str = "", what: str = "it") -> str:
    """``<path>: could not write <what> (<reason>)[, <kept>]; <the fix>``: one line."""
    reason = error.strerror or str(error)
    return f"{path}: could not write {what} ({reason}){f', {kept}' if kept else ''}; {write_fix(error)}"


def one_line(message: str) -> str:
    """The user-facing line of an error message.

    An error raised inside a DataLoader worker reaches the main process re-raised with the
    worker's traceback as its message; the original message is its last line.
    """
    lines = [line for line in str(message).strip().splitlines() if line.strip()]
    if not lines:
        return ""
    if len(lines) > 1 and any(line.startswith("Original Traceback") for line in lines):
        last = lines[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return " ".join(line.strip() for line in lines)
