"""Arrays computed once from source files and kept on disk: the store under both caches.

The prepared-image cache (``speed/prepared.py``: each photo decoded and resized once) and the
feature cache (``speed/features.py``: each photo's backbone features computed once) are both an
``ArrayStore``: one flat binary file that arrays are appended to, read back through a memory
map, plus ``index.json`` that maps each source file to where its array lies.

An entry is valid while its source file has the size, modification time and status-change
time it had when the entry was written; any of the three changing (the file was rewritten,
replaced, touched or copied over) makes the entry stale and it is computed again. File
contents are not hashed: that would read every photo on every run, the very cost the caches
exist to avoid. Status-change time (ctime) cannot be set by ``touch`` or ``cp -p``, so a file
replaced by one of the same size and back-dated modification time is still caught.

The stored bytes prove themselves. Each entry records a checksum of its bytes when it is
written (xxHash's XXH3-64, ``xxhash`` on PyPI: the cheapest well-kept hash at hand, an order of
magnitude faster than ``zlib.crc32`` and blake2b, see ``benchmarks/cache_verification.py``; it
is there to catch damage, not an attacker, who could rewrite the index as well). Two checks use
it:

* When a run opens the store (``filling``, hence ``update``; ``audit`` and ``stale`` answer
  the same), every entry the run will read is checked: an entry whose bytes lie past the end
  of the data file (a truncated file) or no longer match its checksum (zeros or random bytes
  written over it) is *damaged*. It is dropped and computed again from its source file like a
  stale one, with one warning that names the data file and counts them, so the run's results
  are the clean run's. This reads the run's stored bytes once.
* Every read (``StoredArrays.__getitem__``, inside the DataLoader workers for the image cache)
  checks its entry again, so bytes that change under a running job stop it with a one-line
  error that names the data file and says to run again (which computes them again) instead of
  training on them.
* An index that cannot be read or parsed, is of an older ``STORE_VERSION`` (no checksums:
  such stores are rebuilt, not verified lazily), names a data file outside the folder or
  describes other arrays means an empty store: everything is computed again into a new data
  file, and the old files are removed. Malformed entries are computed again.

What both checks cost (per image, per read, at open) is measured by
``benchmarks/cache_verification.py``; its figures are in ``benchmarks/RESULTS.md``.

Readers and compaction. ``ArrayStore.arrays`` opens the data file once, in the process that
asks (the main process of a run), maps it and holds a shared ``flock`` on it for as long as the
``StoredArrays`` lives. A forked DataLoader worker inherits that map and lock; a copy that was
pickled (a spawned worker) opens the file again by name, which the creator's lock keeps in
place. Compaction (``_compact_if_mostly_dead``) writes the live arrays to a new data file named
by the new index (the index is the single commit point) and deletes an old data file only once
it can take an exclusive lock on it, i.e. when no reader holds it; a file it cannot delete yet
is deleted by a later run that opens the store (``filling``). A reader that read the index
just before a compaction finds its file gone or replaced when it opens it, reads the index
again and opens the new one. Without advisory locks (Windows) an old file is deleted when the
system allows it (not while it is mapped there).

Where caches live: ``--cache-dir``, else ``$INAT_FINETUNE_CACHE``, else
``$XDG_CACHE_HOME/inat-finetune`` (``~/.cache/inat-finetune``). Deleting the folder is always
safe; everything in it is rebuilt on first use.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from inat_finetune.runfiles import read_json, write_text_atomic
from inat_finetune.speed.store_files import (
    StoredArrays,
    checksum,
    locked,
    map_if_present,
    open_for_reading,
    remove_if_unread,
)

log = logging.getLogger(__name__)


CACHE_ENV = "INAT_FINETUNE_CACHE"


STORE_VERSION = 2  # 2: a checksum per entry


INDEX_NAME = "index.json"


SAVE_EVERY = 512  # entries; an interrupted build keeps what it had saved


DATA_NAME = re.compile(r"data-(\d+)\.bin")


# An entry of the index: [size, mtime_ns, ctime_ns, byte offset, checksum of its bytes, *shape]
FINGERPRINT, OFFSET, CHECKSUM, SHAPE = slice(0, 3), 3, 4, slice(5, None)


OPEN_TRIES = 8  # a reader racing compactions reads the index again this many times at most


def cache_root(override: str | Path | None = None) -> Path:
    if override:
        return Path(override).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "inat-finetune"


def short_hash(value: Any) -> str:
    """A stable 16-hex-digit name for a JSON-able description (cache folder names)."""
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def source_fingerprint(path: str | Path) -> list[int]:
    stat = os.stat(path)
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]


def _well_formed(entry: Any) -> bool:
    return (
        isinstance(entry, list)
        and len(entry) > CHECKSUM
        and all(type(value) is int for value in entry)
        and entry[OFFSET] >= 0
        and all(side >= 0 for side in entry[SHAPE])
    )


@dataclass
class Audit:
    """The paths a store must compute: ``todo``; of them, ``damaged`` had an entry whose bytes
    lie past the end of the data file or no longer match their checksum."""

    todo: list[Path] = field(default_factory=list)
    damaged: list[Path] = field(default_factory=list)


class ArrayStore:
    """Arrays keyed by source file, appended to one data file, valid while the source is unchanged
    and the stored bytes match their checksum.

    ``meta`` describes how the arrays were computed (size, backbone, ...); a store whose index
    holds other ``meta`` is treated as empty. Callers put different ``meta`` in different
    folders (``short_hash(meta)`` in the folder name). ``damaged`` lists the paths the last
    ``filling`` (or ``update``) found damaged and computed again.
    """

    def __init__(self, directory: str | Path, dtype: str, meta: dict[str, Any]) -> None:
        self.directory = Path(directory)
        self.dtype = np.dtype(dtype)
        self.meta = json.loads(json.dumps(meta, default=str))  # as it reads back from the index
        self.data_name = "data-0.bin"
        # path -> [size, mtime_ns, ctime_ns, byte offset, checksum, *shape]
        self.entries: dict[str, list[int]] = {}
        self.damaged: list[Path] = []
        self._load_index()

    @property
    def data_path(self) -> Path:
        return self.directory / self.data_name

    def _read_index(self) -> dict[str, Any] | None:
        """The index if it describes this store's arrays and names an existing data file."""
        try:
            index = read_json(self.directory / INDEX_NAME)
        except (OSError, ValueError):  # missing, unreadable, not UTF-8 or not JSON
            return None
        usable = (
            isinstance(index, dict)
            and index.get("version") == STORE_VERSION
            and index.get("dtype") == self.dtype.str
            and index.get("meta") == self.meta
            and isinstance(index.get("entries"), dict)
            and isinstance(index.get("data"), str)
            and DATA_NAME.fullmatch(index["data"]) is not None
            and (self.directory / index["data"]).is_file()
        )
        return index if usable else None

    def _load_index(self) -> None:
        index = self._read_index()
        if index is None:  # an empty store, in a data file of its own
            self.data_name, self.entries = self._unused_data_name(), {}
            return
        self.data_name = index["data"]
        self.entries = {k: e for k, e in index["entries"].items() if _well_formed(e)}

    def _data_files(self) -> dict[int, Path]:
        found = {}
        with contextlib.suppress(OSError):
            for path in self.directory.iterdir():
                match = DATA_NAME.fullmatch(path.name)
                if match:
                    found[int(match[1])] = path
        return found

    def _unused_data_name(self) -> str:
        return f"data-{max(self._data_files(), default=-1) + 1}.bin"

    def _save_index(self) -> None:
        index = {
            "version": STORE_VERSION,
            "dtype": self.dtype.str,
            "meta": self.meta,
            "data": self.data_name,
            "entries": self.entries,
        }
        # Compact: the index of nature_12K's 12k photos is saved many times during a build.
        write_text_atomic(self.directory / INDEX_NAME, json.dumps(index, separators=(",", ":")))

    def _nbytes(self, entry: list[int]) -> int:
        return math.prod(entry[SHAPE]) * self.dtype.itemsize

    def _intact(self, entry: list[int], data: np.ndarray) -> bool:
        """Whether the entry's bytes lie inside ``data`` (the mapped data file) and match."""
        start, nbytes = entry[OFFSET], self._nbytes(entry)
        stored = data[start : start + nbytes]
        return stored.size == nbytes and checksum(stored) == entry[CHECKSUM]

    def audit(self, paths: Iterable[str | Path]) -> Audit:
        """Which ``paths`` must be computed: those with no entry, whose source file changed since
        its entry was written, or whose stored bytes are damaged (truncated or overwritten)."""
        audit = Audit()
        data = map_if_present(self.data_path)
        for path in paths:
            entry = self.entries.get(str(path))
            if entry is None or entry[FINGERPRINT] != source_fingerprint(path):
                audit.todo.append(Path(path))
            elif not self._intact(entry, data):
                audit.todo.append(Path(path))
                audit.damaged.append(Path(path))
        return audit

    def stale(self, paths: Iterable[str | Path]) -> list[Path]:
        """The paths to compute (``audit``): missing, changed since stored, or damaged."""
        return self.audit(paths).todo

    def update(
        self,
        paths: Iterable[str | Path],
        compute: Callable[[list[Path]], Iterable[tuple[Path, np.ndarray]]],
    ) -> int:
        """Compute and store the arrays of the stale ``paths``; return how many were computed.

        ``compute(todo)`` yields ``(path, array)`` for each path of ``todo``, in any order.
        """
        with self.filling(paths) as (todo, put):
            for path, array in compute(todo) if todo else ():
                put(path, array)
            return len(todo)

    def _drop_damaged(self, damaged: list[Path]) -> None:
        self.damaged = damaged
        if not damaged:
            return
        log.warning(
            "%s: %d stored array(s) damaged (truncated, or bytes that no longer match their "
            "checksum); computing them again from their source files",
            self.data_path,
            len(damaged),
        )
        for path in damaged:
            del self.entries[str(path)]

    @contextlib.contextmanager
    def filling(
        self, paths: Iterable[str | Path]
    ) -> Iterator[tuple[list[Path], Callable[[str | Path, np.ndarray], None]]]:
        """Lock the store, then yield its stale ``paths`` (``audit``: damaged entries included)
        and a function that stores the array of one of them; the index is saved every
        ``SAVE_EVERY`` arrays and at the end.

        ``update`` for one store; one pass that fills several stores holds them all open."""
        with locked(self.directory):
            self._load_index()  # another process may have stored some of them meanwhile
            self._remove_old_data_files()  # those readers held at the last compaction
            audit = self.audit(paths)
            self._drop_damaged(audit.damaged)
            todo = audit.todo
            if not todo:
                yield todo, self._put_nothing
                return
            # Fingerprints taken before computing: a file changed meanwhile is caught next time.
            fingerprints = {str(p): source_fingerprint(p) for p in todo}
            if not self.data_path.exists():
                self.entries = {}  # the index names a data file that is gone
            with open(self.data_path, "ab") as handle:
                offset = handle.seek(0, os.SEEK_END)
                count = 0

                def put(path: str | Path, array: np.ndarray) -> None:
                    nonlocal offset, count
                    data = np.ascontiguousarray(array, dtype=self.dtype).tobytes()
                    handle.write(data)
                    self.entries[str(path)] = [
                        *fingerprints[str(path)],
                        offset,
                        checksum(data),
                        *np.shape(array),
                    ]
                    offset += len(data)
                    count += 1
                    if count % SAVE_EVERY == 0:
                        handle.flush()
                        os.fsync(handle.fileno())
                        self._save_index()

                try:
                    yield todo, put
                finally:
                    # Also on an error or an interrupt: what was computed is kept.
                    handle.flush()
                    os.fsync(handle.fileno())
                    self._save_index()
            self._compact_if_mostly_dead()
            self._remove_old_data_files()

    @staticmethod
    def _put_nothing(path: str | Path, array: np.ndarray) -> None:
        raise KeyError(f"{path}: not stale, nothing to store")

    def _live_bytes(self) -> int:
        return sum(self._nbytes(e) for e in self.entries.values())

    def _compact_if_mostly_dead(self) -> None:
        """Rewrite the data file without stale arrays once they take more room than live ones.

        The live arrays go to a new file named by the new index, so the index stays the single
        commit point; the old file is deleted once no reader holds it (see above). Arrays found
        damaged on the way are left out (computed again when next needed).
        """
        live, total = self._live_bytes(), self.data_path.stat().st_size
        if total - live <= max(live, 1 << 20):
            return
        source = map_if_present(self.data_path)
        new_name = self._unused_data_name()
        entries: dict[str, list[int]] = {}
        with open(self.directory / new_name, "wb") as handle:
            offset = 0
            for key, entry in self.entries.items():
                if not self._intact(entry, source):
                    continue
                nbytes = self._nbytes(entry)
                handle.write(source[entry[OFFSET] : entry[OFFSET] + nbytes])
                entries[key] = [*entry[:OFFSET], offset, *entry[CHECKSUM:]]
                offset += nbytes
            handle.flush()
            os.fsync(handle.fileno())
        del source
        self.data_name, self.entries = new_name, entries
        self._save_index()

    def _remove_old_data_files(self) -> None:
        """Delete the data files the index no longer names, except those a reader holds."""
        for path in self._data_files().values():
            if path.name != self.data_name:
                remove_if_unread(path)

    def _open_data(self) -> IO[bytes]:
        """The data file, opened with a shared lock; if a compaction by another process removed
        it since the index was read, the new index is read and the file it names opened."""
        for _ in range(OPEN_TRIES):
            try:
                return open_for_reading(self.data_path)
            except FileNotFoundError:
                self._load_index()
        raise FileNotFoundError(f"{self.data_path}: replaced {OPEN_TRIES} times while opening")

    def arrays(self, paths: Iterable[str | Path]) -> StoredArrays:
        """Read access to the entries of ``paths`` (all of which must be stored)."""
        keys = [str(path) for path in paths]
        handle = self._open_data() if keys else None
        try:
            entries = {}
            for key in keys:
                entry = self.entries[key]
                entries[key] = (entry[OFFSET], tuple(entry[SHAPE]), entry[CHECKSUM])
            return StoredArrays(self.data_path, self.dtype, entries, handle)
        except BaseException:
            if handle is not None:
                handle.close()
            raise
