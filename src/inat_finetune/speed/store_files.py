"""The files under an ``ArrayStore``: the directory lock, shared locks on a data file while it
is read, memory maps, and ``StoredArrays``, the checked read-only view that DataLoader workers
receive.

The protocol (``speed/caching.py``, "Readers and compaction"): one process at a time updates a
store (``locked``); a reader holds a shared ``flock`` on the data file it maps for as long as
it reads it (``open_for_reading``), so compaction deletes an old data file only once it can
take an exclusive lock on it (``remove_if_unread``). Without advisory locks (Windows) builders
are on their own and an old file is deleted when the system allows it. Every read checks the
entry's XXH3-64 checksum (``checksum``) and stops with a one-line error naming the data file.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import xxhash

from inat_finetune.errors import UserError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks
    fcntl = None  # type: ignore[assignment]


def checksum(data: Any) -> int:
    """The XXH3-64 of a bytes-like object or a contiguous array's bytes (an int under 2**64)."""
    return xxhash.xxh3_64_intdigest(data)


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Only one process updates a store at a time (two runs started together, DDP ranks)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "a+b") as handle:
        if fcntl is None:  # concurrent builders are on their own
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def open_for_reading(path: Path) -> IO[bytes]:
    """``path`` opened with a shared lock, which keeps compaction from deleting it.

    FileNotFoundError if it is gone, or was deleted before the lock was taken."""
    handle = open(path, "rb")  # noqa: SIM115 - kept open by the reader
    try:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_SH)
            now, held = os.stat(path), os.fstat(handle.fileno())
            if (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino):
                raise FileNotFoundError(f"{path}: replaced while being opened")
    except BaseException:
        handle.close()
        raise
    return handle


def mapped(handle: IO[bytes]) -> np.ndarray:
    """The bytes of an open file as a read-only uint8 array backed by a memory map."""
    if os.fstat(handle.fileno()).st_size == 0:
        return np.empty(0, dtype=np.uint8)  # an empty file cannot be mapped
    return np.frombuffer(mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ), dtype=np.uint8)


def map_if_present(path: Path) -> np.ndarray:
    try:
        with open(path, "rb") as handle:
            return mapped(handle)  # the map keeps its own reference to the file
    except FileNotFoundError:
        return np.empty(0, dtype=np.uint8)


def remove_if_unread(path: Path) -> None:
    """Delete a data file unless a reader holds its shared lock (a later ``filling`` does)."""
    if fcntl is None:
        with contextlib.suppress(OSError):  # Windows cannot delete a mapped file: left behind
            path.unlink(missing_ok=True)
        return
    try:
        with open(path, "rb") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            path.unlink()
    except OSError:  # BlockingIOError: still read; or gone already
        pass


class StoredArrays:
    """Read-only access to some entries of a store; cheap to pickle into DataLoader workers.

    Made by ``ArrayStore.arrays`` with the data file open, mapped and share-locked: a forked
    worker inherits all three, a pickled copy opens the file again by name (see above). Every
    read is checked against the entry's checksum."""

    def __init__(
        self,
        data_path: Path,
        dtype: np.dtype,
        entries: dict[str, tuple[int, tuple, int]],
        handle: IO[bytes] | None = None,
    ) -> None:
        self.data_path = data_path
        self.dtype = dtype
        self.entries = entries  # path -> (byte offset, shape, checksum)
        self._handle = handle  # holds the shared lock while this object lives
        self._bytes: np.ndarray | None = None if handle is None else mapped(handle)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handle": None, "_bytes": None}  # a copy opens the file again

    def __contains__(self, path: object) -> bool:
        return str(path) in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def _data(self) -> np.ndarray:
        if self._bytes is None:
            try:
                self._handle = open_for_reading(self.data_path)
            except FileNotFoundError:
                raise UserError(
                    f"{self.data_path}: the cache file was removed while this run read it; "
                    "run again, which rebuilds what is missing"
                ) from None
            self._bytes = mapped(self._handle)
        return self._bytes

    def __getitem__(self, path: str | Path) -> np.ndarray:
        """A writable copy of the array stored for ``path``, checked against its checksum."""
        offset, shape, expected = self.entries[str(path)]
        nbytes = math.prod(shape) * self.dtype.itemsize
        raw = np.array(self._data()[offset : offset + nbytes])
        if raw.size != nbytes or checksum(raw) != expected:
            raise UserError(
                f"{self.data_path}: the stored array of {path} is damaged (its bytes changed "
                "while this run read them); run again, which computes it again"
            )
        return raw.view(self.dtype).reshape(shape)
