"""Arrays computed once from source files and kept on disk: the store under both caches.

The prepared-image cache (``prepared.py``: each photo decoded and resized once) and the
feature cache (``features.py``: each photo's backbone features computed once) are both an
``ArrayStore``: one flat binary file that arrays are appended to, read back through a memory
map, plus ``index.json`` that maps each source file to where its array lies.

An entry is valid while its source file has the size, modification time and status-change
time it had when the entry was written; any of the three changing (the file was rewritten,
replaced, touched or copied over) makes the entry stale and it is computed again. File
contents are not hashed: that would read every photo on every run, the very cost the caches
exist to avoid. Status-change time (ctime) cannot be set by ``touch`` or ``cp -p``, so a file
replaced by one of the same size and back-dated modification time is still caught.

Where caches live: ``--cache-dir``, else ``$INAT_FINETUNE_CACHE``, else
``$XDG_CACHE_HOME/inat-finetune`` (``~/.cache/inat-finetune``). Deleting the folder is always
safe; everything in it is rebuilt on first use.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from inat_finetune.runfiles import read_json, write_text_atomic

CACHE_ENV = "INAT_FINETUNE_CACHE"
STORE_VERSION = 1
INDEX_NAME = "index.json"
SAVE_EVERY = 512  # entries; an interrupted build keeps what it had saved


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


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Only one process updates a store at a time (two runs started together, DDP ranks)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "a+b") as handle:
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; concurrent builders are on their own
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class StoredArrays:
    """Read-only access to some entries of a store; cheap to pickle into DataLoader workers."""

    def __init__(self, data_path: Path, dtype: np.dtype, entries: dict[str, tuple[int, tuple]]):
        self.data_path = data_path
        self.dtype = dtype
        self.entries = entries  # path -> (byte offset, shape)
        self._map: np.memmap | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_map": None}  # each worker maps the file itself

    def __contains__(self, path: object) -> bool:
        return str(path) in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, path: str | Path) -> np.ndarray:
        """A writable copy of the array stored for ``path``."""
        if self._map is None:
            self._map = np.memmap(self.data_path, dtype=np.uint8, mode="r")
        offset, shape = self.entries[str(path)]
        nbytes = int(np.prod(shape)) * self.dtype.itemsize
        return np.array(self._map[offset : offset + nbytes]).view(self.dtype).reshape(shape)


class ArrayStore:
    """Arrays keyed by source file, appended to one data file, valid while the source is unchanged.

    ``meta`` describes how the arrays were computed (size, backbone, ...); a store whose index
    holds other ``meta`` is treated as empty. Callers put different ``meta`` in different
    folders (``short_hash(meta)`` in the folder name).
    """

    def __init__(self, directory: str | Path, dtype: str, meta: dict[str, Any]) -> None:
        self.directory = Path(directory)
        self.dtype = np.dtype(dtype)
        self.meta = json.loads(json.dumps(meta, default=str))  # as it reads back from the index
        self.data_name = "data-0.bin"
        # path -> [size, mtime_ns, ctime_ns, byte offset, *shape]
        self.entries: dict[str, list[int]] = {}
        self._load_index()

    @property
    def data_path(self) -> Path:
        return self.directory / self.data_name

    def _load_index(self) -> None:
        try:
            index = read_json(self.directory / INDEX_NAME)
        except (OSError, ValueError):
            index = None
        if (
            isinstance(index, dict)
            and index.get("version") == STORE_VERSION
            and index.get("dtype") == self.dtype.str
            and index.get("meta") == self.meta
            and (self.directory / index.get("data", "")).is_file()
        ):
            self.data_name, self.entries = index["data"], index["entries"]
        else:
            self.data_name, self.entries = "data-0.bin", {}

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

    def stale(self, paths: Iterable[str | Path]) -> list[Path]:
        """The paths with no entry, or whose source file changed since its entry was written."""
        todo = []
        for path in paths:
            entry = self.entries.get(str(path))
            if entry is None or entry[:3] != source_fingerprint(path):
                todo.append(Path(path))
        return todo

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

    @contextlib.contextmanager
    def filling(
        self, paths: Iterable[str | Path]
    ) -> Iterator[tuple[list[Path], Callable[[str | Path, np.ndarray], None]]]:
        """Lock the store, then yield its stale ``paths`` and a function that stores the array
        of one of them; the index is saved every ``SAVE_EVERY`` arrays and at the end.

        ``update`` for one store; one pass that fills several stores holds them all open."""
        with _locked(self.directory):
            self._load_index()  # another process may have stored some of them meanwhile
            todo = self.stale(paths)
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
                    array = np.ascontiguousarray(array, dtype=self.dtype)
                    handle.write(array.tobytes())
                    self.entries[str(path)] = [*fingerprints[str(path)], offset, *array.shape]
                    offset += array.nbytes
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

    @staticmethod
    def _put_nothing(path: str | Path, array: np.ndarray) -> None:
        raise KeyError(f"{path}: not stale, nothing to store")

    def _live_bytes(self) -> int:
        return sum(int(np.prod(e[4:])) * self.dtype.itemsize for e in self.entries.values())

    def _compact_if_mostly_dead(self) -> None:
        """Rewrite the data file without stale arrays once they take more room than live ones.

        The live arrays go to a new file named by the new index, so the index stays the single
        commit point: a reader that loaded the old index keeps its memory map of the old file.
        """
        live, total = self._live_bytes(), self.data_path.stat().st_size
        if total - live <= max(live, 1 << 20):
            return
        old = self.data_path
        number = int(self.data_name.split("-")[1].split(".")[0]) + 1
        new_name = f"data-{number}.bin"
        source = np.memmap(old, dtype=np.uint8, mode="r")
        entries: dict[str, list[int]] = {}
        with open(self.directory / new_name, "wb") as handle:
            offset = 0
            for key, entry in self.entries.items():
                nbytes = int(np.prod(entry[4:])) * self.dtype.itemsize
                handle.write(source[entry[3] : entry[3] + nbytes].tobytes())
                entries[key] = [*entry[:3], offset, *entry[4:]]
                offset += nbytes
            handle.flush()
            os.fsync(handle.fileno())
        del source
        self.data_name, self.entries = new_name, entries
        self._save_index()
        with contextlib.suppress(OSError):  # Windows cannot delete a mapped file: left behind
            old.unlink(missing_ok=True)

    def arrays(self, paths: Iterable[str | Path]) -> StoredArrays:
        """Read access to the entries of ``paths`` (all of which must be stored)."""
        entries = {}
        for path in paths:
            entry = self.entries[str(path)]
            entries[str(path)] = (entry[3], tuple(entry[4:]))
        return StoredArrays(self.data_path, self.dtype, entries)
