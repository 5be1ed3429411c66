"""One process at a time in a run directory: ``run.lock``, held while a run trains or resumes.

``train`` holds the lock of the run directory it creates for as long as it runs, and
``train --resume`` takes it before it reads anything, so a second resume of the same run (or a
resume of a run still training) is refused with one line that names the process holding it.

The lock is ``fcntl.flock`` on ``<run>/run.lock``, which holds the holder's process id as text.
The kernel releases it when the holder exits in any way (also ``kill -9``), so a lock file left
behind by a dead process never blocks anyone. The file is removed on release. Within one process
the lock is re-entrant (``resume_run`` holds it and calls ``train``, which asks for it again).
Where ``fcntl`` does not exist (Windows) runs are not locked.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from inat_finetune.errors import UserError

LOCK_NAME = "run.lock"


_held: set[Path] = set()  # run directories whose lock this process holds


def _holder(lock: Path) -> str:
    try:
        pid = lock.read_text(encoding="utf-8").strip()
    except OSError:
        pid = ""
    return f"process {pid}" if pid.isdigit() else "another process"


def _acquire(lock: Path) -> int:
    """An open descriptor of ``lock`` locked by this process, or UserError if another holds it."""
    import fcntl

    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(
                f"{lock.parent}: in use by {_holder(lock)} (it holds {LOCK_NAME}); wait for it to "
                "finish or stop it, then resume the run"
            ) from None
        # The holder before us may have removed the file between our open and our lock: then
        # we hold a lock on a file nobody else can see, and must lock the one at the path.
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


@contextlib.contextmanager
def run_lock(run_dir: str | Path) -> Iterator[None]:
    """Hold ``run_dir/run.lock`` for the block; refuse (UserError) if another process holds it."""
    try:
        import fcntl  # noqa: F401
    except ImportError:
        yield
        return
    run_dir = Path(run_dir).resolve()
    if run_dir in _held:
        yield
        return
    lock = run_dir / LOCK_NAME
    fd = _acquire(lock)
    _held.add(run_dir)
    try:
        with contextlib.suppress(OSError):  # the pid is for the message; the lock holds without
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        _held.discard(run_dir)
        # Removed while still locked: whoever opened it meanwhile sees another inode and retries.
        lock.unlink(missing_ok=True)
        os.close(fd)
