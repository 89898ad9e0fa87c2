"""Get-or-compute of cache entries: lock them, serve them if there, else compute and commit.

One process at a time computes an entry (``entry_lock``); another that wants it waits, then
reads the committed entry. Under torchrun the main rank alone locks, reads and writes the cache.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from mergekit_sparsegpt.capture.distributed import (
    SINGLE_PROCESS,
    Ranks,
    decided_by_main,
    together,
)
from mergekit_sparsegpt.statistics.entries import read_statistics
from mergekit_sparsegpt.statistics.locking import entry_lock
from mergekit_sparsegpt.statistics.resumable import EntryWriter
from mergekit_sparsegpt.statistics.task_statistics import TaskStatistics

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class Entry:
    """Where one entry lives and the payload it is keyed by."""

    path: Path
    payload: dict[str, Any]


@dataclass(frozen=True)
class Steps:
    """What ``get_or_compute`` calls, in this order.

    ``cached()``: every entry's statistics if all are there (saying so), else None.
    ``prepare()``: on every rank, before the writers open (a failure there stops all ranks).
    ``compute(writers)``: every entry's statistics, streaming whole matrices to its writer
    (None on ranks other than the main one).
    ``written(statistics)``: after the commit and the locks' release, on the main rank.
    ``read(path, payload)``: an entry just committed, as a cache hit reads it.

    Entries hold a task's statistics unless ``read`` says otherwise: whatever ``compute``
    returns per entry is what ``EntryWriter.commit`` writes (``to_tensors()``).
    """

    cached: Callable[[], Mapping[Any, TaskStatistics] | None]
    compute: Callable[[Mapping[Any, EntryWriter | None]], Mapping[Any, TaskStatistics]]
    prepare: Callable[[], None] = lambda: None
    written: Callable[[Mapping[Any, TaskStatistics]], None] = lambda statistics: None
    read: Callable[[Path, dict[str, Any]], Any] = read_statistics


def get_or_compute(
    entries: Mapping[K, Entry],
    steps: Steps,
    on_wait: Callable[[Path], None],
    ranks: Ranks = SINGLE_PROCESS,
    resumable: bool = False,
) -> Mapping[K, TaskStatistics] | None:
    """Every entry's statistics, from the cache or computed and committed (None on ranks
    other than the main one). Computed statistics are served from the entries just written, as
    a cache hit is: the whole matrices stay on disk."""
    with contextlib.ExitStack() as locked:
        if ranks.main:
            # Entries computed together are locked in one order: two such runs cannot deadlock.
            for path in sorted(entry.path for entry in entries.values()):
                locked.enter_context(entry_lock(path, on_wait))
        found = steps.cached() if ranks.main else None
        if decided_by_main(found is not None, ranks):
            return found
        with contextlib.ExitStack() as open_writers:
            with together(ranks):
                steps.prepare()
                writers = {
                    key: open_writers.enter_context(
                        EntryWriter(entry.path, entry.payload, resumable)
                    )
                    if ranks.main
                    else None
                    for key, entry in entries.items()
                }
            statistics = steps.compute(writers)
            with together(ranks):
                for key, writer in writers.items():
                    if writer:
                        writer.commit(statistics[key])
    if not ranks.main:
        return None
    steps.written(statistics)
    return {key: steps.read(entry.path, entry.payload) for key, entry in entries.items()}
