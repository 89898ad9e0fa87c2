"""``entry_lock``: one process at a time computes a cache entry; another that wants it waits,
then reads the committed entry."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from mergekit_sparsegpt.statistics.cache_dir import LOG
from mergekit_sparsegpt.statistics.keys import lock_path

try:
    import fcntl
except ImportError:  # not POSIX: entries are still written atomically, but not locked
    fcntl = None  # type: ignore[assignment]


@contextlib.contextmanager
def entry_lock(path: Path, on_wait: Callable[[Path], None] | None = None) -> Iterator[None]:
    """Hold the lock of entry ``path`` for the block: one process at a time computes an entry.

    ``on_wait(lock file)`` is called once if another process holds it, before waiting. The lock
    file is removed on release, while still held; a process that was waiting on the removed file
    sees that it is no longer the one at the path and locks the new one, so two processes never
    hold the lock at once. Where nothing can be locked (a read-only directory, a file system
    without locks), the block runs unlocked: reading needs no lock, and writing fails with its
    own message.
    """
    held = _acquire(lock_path(path), on_wait)
    try:
        yield
    finally:
        if held is not None:
            with contextlib.suppress(OSError):
                lock_path(path).unlink()
            os.close(held)


def _acquire(lock: Path, on_wait: Callable[[Path], None] | None) -> int | None:
    """The descriptor of ``lock``, flock-ed exclusively; None where locking is impossible."""
    if fcntl is None:
        return None
    waited = False
    while True:
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            handle = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            return None  # read-only: nobody writes entries here
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait is not None and not waited:
                    on_wait(lock)
                waited = True
                fcntl.flock(handle, fcntl.LOCK_EX)
            if _is_at(handle, lock):
                return handle
        except OSError as error:
            os.close(handle)
            LOG.warning(
                "Cannot lock %s (%s): another process using this cache directory at the same "
                "time could compute this entry too.",
                lock,
                error.strerror or error,
            )
            return None
        except BaseException:
            os.close(handle)
            raise
        os.close(handle)  # the holder removed that file on release: lock the one there now


def _is_at(handle: int, path: Path) -> bool:
    """Whether the open file ``handle`` is still the file at ``path``."""
    try:
        current = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(handle)
    return (opened.st_dev, opened.st_ino) == (current.st_dev, current.st_ino)
