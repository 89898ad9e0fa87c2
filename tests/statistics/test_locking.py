import fcntl
import os
import queue
import threading

import pytest

from mergekit_sparsegpt.statistics import keys as cache_keys
from mergekit_sparsegpt.statistics import locking


def test_a_second_holder_waits_is_told_and_gets_the_lock_once_released(tmp_path):
    path = tmp_path / "entry.safetensors"
    told, acquired = threading.Event(), threading.Event()
    waiting_on = []

    def second() -> None:
        def on_wait(lock):
            waiting_on.append(lock)
            told.set()

        with locking.entry_lock(path, on_wait):
            acquired.set()

    with locking.entry_lock(path, lambda lock: pytest.fail("nobody held it")):
        assert cache_keys.lock_path(path).exists()
        thread = threading.Thread(target=second)
        thread.start()
        assert told.wait(60)
        assert not acquired.is_set()
    thread.join(60)
    assert acquired.is_set() and waiting_on == [cache_keys.lock_path(path)]
    assert list(tmp_path.iterdir()) == []  # the lock file goes with the last holder


def test_a_waiter_on_a_removed_lock_file_locks_the_file_there_now(tmp_path, monkeypatch):
    """Holders remove the lock file on release; a process that was waiting on the removed file
    must not hold the lock alongside one that locked the new file in between."""
    path = tmp_path / "entry.safetensors"
    lock = cache_keys.lock_path(path)
    checks: queue.Queue[bool] = queue.Queue()
    is_at = locking._is_at

    def reporting_is_at(handle: int, where) -> bool:
        result = is_at(handle, where)
        checks.put(result)
        return result

    monkeypatch.setattr(locking, "_is_at", reporting_is_at)
    first = os.open(lock, os.O_RDWR | os.O_CREAT)  # a holder about to release
    fcntl.flock(first, fcntl.LOCK_EX)
    told, acquired = threading.Event(), threading.Event()

    def waiter() -> None:
        with locking.entry_lock(path, lambda _: told.set()):
            acquired.set()

    thread = threading.Thread(target=waiter)
    thread.start()
    assert told.wait(60)  # the waiter has the first file open
    lock.unlink()  # the first holder's release: the file goes, then its lock
    with locking.entry_lock(path):  # a third process locks the new file in between
        assert checks.get(timeout=60) is True
        os.close(first)
        assert checks.get(timeout=60) is False  # the waiter's flock returned, on the old file
        assert not acquired.is_set()
    thread.join(60)
    assert acquired.is_set()
    assert list(tmp_path.iterdir()) == []


def test_a_cache_that_cannot_be_locked_is_still_read(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with locking.entry_lock(blocker / "entry.safetensors"):
        pass  # nothing to lock in: reading goes on unlocked, and writing fails with its message


# --- entries of another program or another format version ---
