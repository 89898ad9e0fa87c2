"""An entry's resume checkpoint as every process sees it, with one process or under torchrun.

Only the main rank writes the cache, so only it holds the entry's writer and its checkpoint.
Each rank runs its own share of every task's windows, so a checkpoint gathers the shares into
the activations one process would hold, in window order, and a resume hands every rank its share
of them again. The checkpoint on disk is therefore the one a single process writes: a run
resumes whatever the number of processes the interrupted run had.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Mapping
from typing import Generic, TypeVar

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

K = TypeVar("K", bound=Hashable)


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
        if self.due():
            self.write(index, activations, contents)

    def due(self) -> bool:
        """Whether the main rank's schedule asks for a checkpoint now."""
        if not self.resumable:
            return False
        return decided_by_main(self.writer is not None and self.writer.checkpoint_due(), self.ranks)

    def restart(self, reason: str) -> None:
        """Start from the first block after all, discarding the checkpoint found."""
        if self.writer is not None:
            self.writer.restart(reason)

    def write(self, index: int, activations: Activations, contents: EntryContents | None) -> None:
        """Checkpoint block ``index`` now (every rank calls it, or none)."""
        started = time.monotonic()
        gathered = [gathered_on_main(tensor, self.ranks) for tensor in _listed(activations)]
        if self.writer is None:
            return
        assert contents is not None and all(tensor is not None for tensor in gathered)
        whole = gathered if isinstance(activations, list) else gathered[0]
        self.writer.checkpoint_block(index, whole, contents, started)  # type: ignore[arg-type]


class CheckpointSet(Generic[K]):
    """The checkpoints of entries one pass computes together (RegMean++ with
    ``keep_statistics``: every task's entry). They are written together, on one schedule (the
    first entry's), and resumed only together: a run killed between two of their writes left
    them at different blocks, and then every one starts from the first block."""

    def __init__(self, writers: Mapping[K, EntryWriter | None], ranks: Ranks) -> None:
        self.members = {key: RankCheckpoint(writer, ranks) for key, writer in writers.items()}
        self.resumable = all(member.resumable for member in self.members.values())

    def resume_point(self) -> tuple[int, dict[K, ResumePoint]] | None:
        """The block every entry's checkpoint stopped before, with each entry's resume point."""
        if not self.resumable:
            return None
        points = {key: member.resume_point() for key, member in self.members.items()}
        blocks = {None if point is None else point.next_block for point in points.values()}
        if len(blocks) == 1 and None not in blocks:
            return blocks.pop(), points  # type: ignore[return-value]
        if blocks != {None}:
            for member in self.members.values():
                member.restart(f"the checkpoints of this pass's entries stop at blocks {blocks}")
        return None

    def block_finished(
        self,
        index: int,
        activations: Mapping[K, Activations],
        contents: Mapping[K, EntryContents | None],
    ) -> None:
        """Block ``index`` is done: checkpoint every entry, if due."""
        if next(iter(self.members.values())).due():
            for key, member in self.members.items():
                member.write(index, activations[key], contents[key])


def _count(activations: Activations) -> int | None:
    """How many tensors a list of activations holds; None for a single tensor."""
    return len(activations) if isinstance(activations, list) else None


def _listed(activations: Activations) -> list[torch.Tensor]:
    return activations if isinstance(activations, list) else [activations]
