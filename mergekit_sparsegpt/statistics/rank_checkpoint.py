"""An entry's resume checkpoint as every process sees it, with one process or under torchrun.

Only the main rank writes the cache, so only it holds the entry's writer and its checkpoint.
Each rank runs its own share of every task's windows, so a checkpoint gathers the shares into
the activations one process would hold, in window order, and a resume hands every rank its share
of them again. The checkpoint on disk is therefore the one a single process writes: a run
resumes whatever the number of processes the interrupted run had.
"""

from __future__ import annotations

import time

import torch

from mergekit_sparsegpt.capture.distributed import (
    SINGLE_PROCESS,
    Ranks,
    decided_by_main,
    gathered_on_main,
    share_of_main,
)
from mergekit_sparsegpt.statistics.checkpoint import Activations, ResumePoint
from mergekit_sparsegpt.statistics.resumable import EntryContents, EntryWriter


class RankCheckpoint:
    """The resume checkpoint of the entry ``writer`` writes (None on ranks other than the main
    one), taken and written together by every rank."""

    def __init__(self, writer: EntryWriter | None, ranks: Ranks = SINGLE_PROCESS) -> None:
        self.writer, self.ranks = writer, ranks
        self.resumable = decided_by_main(writer is not None and writer.resumable, ranks)

    def resume_point(self) -> ResumePoint | None:
        """Where an interrupted run stopped, with this rank's share of the activations. The
        statistics of the finished blocks are the main rank's alone (None elsewhere): only it
        commits the entry."""
        point = self.writer.take_resume_point() if self.writer and self.resumable else None
        if self.ranks.world_size == 1:
            return point
        found = None if point is None else (point.next_block, _count(point.activations))
        agreed = decided_by_main(found, self.ranks)
        if agreed is None:
            return None
        next_block, count = agreed
        whole = _listed(point.activations) if point else [None] * (count or 1)
        shares = [share_of_main(tensor, self.ranks) for tensor in whole]
        statistics = point.statistics if point else None
        return ResumePoint(next_block, statistics, shares if count is not None else shares[0])  # type: ignore[arg-type]

    def block_finished(
        self, index: int, activations: Activations, contents: EntryContents | None
    ) -> None:
        """Block ``index`` is done and gave ``activations`` (this rank's share): checkpoint
        ``contents`` (the main rank's) with every rank's activations, if due."""
        if not self.resumable:
            return
        due = decided_by_main(self.writer is not None and self.writer.checkpoint_due(), self.ranks)
        if not due:
            return
        started = time.monotonic()
        gathered = [gathered_on_main(tensor, self.ranks) for tensor in _listed(activations)]
        if self.writer is None:
            return
        assert contents is not None and all(tensor is not None for tensor in gathered)
        whole = gathered if isinstance(activations, list) else gathered[0]
        self.writer.checkpoint_block(index, whole, contents, started)  # type: ignore[arg-type]


def _count(activations: Activations) -> int | None:
    """How many tensors a list of activations holds; None for a single tensor."""
    return len(activations) if isinstance(activations, list) else None


def _listed(activations: Activations) -> list[torch.Tensor]:
    return activations if isinstance(activations, list) else [activations]
