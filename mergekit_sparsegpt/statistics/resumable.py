"""Writing an entry so that an interrupted pre-pass can resume.

The writer keeps a checkpoint next to the entry (``<key>.checkpoint/``: the statistics of the
finished blocks, the whole matrices streamed so far and the next block's input activations), and
a rerun with the same key continues after the last checkpointed block.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Protocol

import torch

from mergekit_sparsegpt.statistics.cache_dir import (
    LOG,
    READ_ERRORS,
    CacheFileError,
    require_regular,
    writing,
)
from mergekit_sparsegpt.statistics.checkpoint import (
    CHECKPOINT_OVERHEAD_VARIABLE,
    CHECKPOINT_VERSION,
    DEFAULT_CHECKPOINT_OVERHEAD,
    Activations,
    CheckpointSchedule,
    ResumePoint,
    checkpoint_overhead,
    named_activations,
    read_checkpoint,
)
from mergekit_sparsegpt.statistics.entries import (
    DTYPES,
    byte_count,
    raw_bytes,
    replace_atomically,
    safetensors_header,
    write_tensors,
)
from mergekit_sparsegpt.statistics.keys import FORMAT_VERSION, canonical, checkpoint_dir

# Re-exported: the checkpoint's settings, where the writer is.
__all__ = [
    "CHECKPOINT_OVERHEAD_VARIABLE",
    "DEFAULT_CHECKPOINT_OVERHEAD",
    "EntryContents",
    "EntryWriter",
    "ResumePoint",
    "checkpoint_overhead",
    "remove_checkpoint",
]

_COPY_CHUNK = 1 << 24
# The resume checkpoint of an entry: a directory holding the state file (see
# ``checkpoint.read_checkpoint``) and the matrices file the entry's whole matrices are streamed to.
_STATE_FILE = "state.safetensors"
_MATRICES_FILE = "matrices"
_ENTRY_PARTIAL = "entry.partial"


class EntryContents(Protocol):
    """What an entry holds besides the tensors streamed to it: a task's statistics, or the
    records of a merge's solved linears."""

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]: ...


def remove_checkpoint(path: Path) -> None:
    """Remove entry ``path``'s checkpoint, if any: the entry is there, nothing will resume."""
    shutil.rmtree(checkpoint_dir(path), ignore_errors=True)


class EntryWriter:
    """Writes one cache entry atomically: a reader sees the old file, the new file, or nothing.

    ``add`` appends a whole matrix to a side file as soon as it is computed, so the pre-pass holds
    one Hessian group's matrices, not a task's. ``commit`` writes the entry: the header (which
    safetensors needs first, so it can only be written once every tensor is known), the tensors
    the statistics hold in memory, then the side file copied over; into a temporary file that is
    renamed into place.

    A ``resumable`` writer (one process, holding ``entry_lock``) keeps everything it writes in
    the entry's checkpoint directory, the side file included, and ``checkpoint_block`` saves the
    statistics so far with the next block's input there when ``checkpoint_due`` (see
    ``rank_checkpoint``, which every process of a run calls). It opens a checkpoint a previous run
    left (``resume_point``), or discards one that does not match with a message. ``commit``
    removes the checkpoint; an interruption or an unexpected error keeps it for a rerun, while a
    ``ValueError`` (these inputs' own fault, met again by a rerun) removes it. A writer that is
    not resumable removes its side file and temporary entry when the ``with`` block ends.
    """

    def __init__(self, path: Path, payload: dict[str, Any], resumable: bool = False) -> None:
        if sys.byteorder != "little":  # the raw bytes written below must be little-endian
            raise RuntimeError("writing the statistics cache needs a little-endian machine")
        self.path = path
        self.payload = payload
        self.checkpoint = checkpoint_dir(path) if resumable else None
        self.resume_point: ResumePoint | None = None
        self._added: dict[str, torch.Tensor] = {}  # name -> an empty tensor of its dtype, shape
        self._checkpointed: int | None = None  # blocks the checkpoint on disk holds
        self._schedule = CheckpointSchedule(checkpoint_overhead()) if resumable else None
        with writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            self._side: IO[bytes] = (
                self._open_checkpoint()
                if resumable
                else tempfile.NamedTemporaryFile(  # closed (deleted) by __exit__
                    dir=path.parent, prefix=path.stem, suffix=".matrices.partial"
                )
            )

    @property
    def resumable(self) -> bool:
        return self.checkpoint is not None

    def __enter__(self) -> EntryWriter:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._side.close()  # a temporary side file is deleted with it
        if self.checkpoint is None or not self.checkpoint.exists():
            return
        if self._checkpointed is None or kind is None or issubclass(kind, ValueError):
            shutil.rmtree(self.checkpoint, ignore_errors=True)
            return
        LOG.warning(
            "Pre-pass stopped (%s); checkpoint %s keeps the statistics of blocks 0-%d: run the "
            "same command again to resume after them, or delete it.",
            str(error) or kind.__name__,  # Terminated says which signal
            self.checkpoint,
            self._checkpointed - 1,
        )

    def add(self, name: str, tensor: torch.Tensor) -> None:
        with writing(self.path):
            self._side.write(raw_bytes(tensor))
        self._added[name] = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")

    def take_resume_point(self) -> ResumePoint | None:
        """The checkpoint found when opening, handed over once (its activations are large)."""
        point, self.resume_point = self.resume_point, None
        return point

    def restart(self, reason: str) -> None:
        """Discard the checkpoint this writer opened (``reason`` says why, as a warning): the
        run starts from the first block, and nothing of the checkpoint's stays."""
        assert self.checkpoint is not None
        LOG.warning(
            "Discarding pre-pass checkpoint %s: %s; starting from the first block.",
            self.checkpoint,
            reason,
        )
        self.resume_point = None
        self._added = {}
        self._checkpointed = None
        with writing(self.path):
            self._side.seek(0)
            self._side.truncate()
            (self.checkpoint / _STATE_FILE).unlink(missing_ok=True)

    def checkpoint_due(self) -> bool:
        """Whether the schedule asks for a checkpoint now (never for a writer that cannot
        resume)."""
        return self._schedule is not None and self._schedule.due()

    def checkpoint_block(
        self, index: int, activations: Activations, statistics: EntryContents, started: float
    ) -> None:
        """Checkpoint block ``index`` now; the write's cost, counted from ``started`` (the
        monotonic time its preparation began), sets when the next one is due."""
        assert self._schedule is not None
        size = self.save_checkpoint(index + 1, statistics, activations)
        cost = time.monotonic() - started
        self._schedule.written(cost)
        LOG.debug(
            "Checkpoint %s after block %d: %d bytes, %.3f s", self.checkpoint, index, size, cost
        )

    def save_checkpoint(
        self, next_block: int, statistics: EntryContents, activations: Activations
    ) -> int:
        """Make the blocks before ``next_block`` resumable, replacing the last checkpoint;
        return the bytes written (the matrices file is written as they come, not here)."""
        if self.checkpoint is None:
            raise RuntimeError("this entry writer is not resumable")
        in_memory, metadata = statistics.to_tensors()
        metadata = {
            **metadata,
            **self._identity(),
            "checkpoint": str(CHECKPOINT_VERSION),
            "next_block": str(next_block),
            "matrices": json.dumps(
                [[name, DTYPES[t.dtype], list(t.shape)] for name, t in self._added.items()]
            ),
        }
        tensors = {**in_memory, **named_activations(activations)}
        header = safetensors_header(tensors, metadata)
        with writing(self.path):
            self._side.flush()  # what Python still buffers would die with a killed process
            state = self.checkpoint / _STATE_FILE
            replace_atomically(
                state,
                _fresh(state.with_name(state.name + ".partial")),
                lambda handle: write_tensors(handle, header, tensors.values()),
            )
        self._checkpointed = next_block
        return 8 + len(header) + byte_count(tensors)

    def commit(self, contents: EntryContents) -> None:
        """Write the entry: ``contents``' tensors and metadata, then the streamed tensors."""
        in_memory, metadata = contents.to_tensors()
        metadata = {**metadata, **self._identity()}
        header = safetensors_header({**in_memory, **self._added}, metadata)

        def write(entry: IO[bytes]) -> None:
            write_tensors(entry, header, in_memory.values())
            self._side.flush()
            self._side.seek(0)
            shutil.copyfileobj(self._side, entry, _COPY_CHUNK)

        with writing(self.path):
            replace_atomically(self.path, self._temporary_entry(), write)
        if self.checkpoint is not None:
            self._side.close()
            shutil.rmtree(self.checkpoint, ignore_errors=True)

    def _identity(self) -> dict[str, str]:
        return {"key": canonical(self.payload), "format": str(FORMAT_VERSION)}

    def _temporary_entry(self) -> Path:
        if self.checkpoint is not None:  # the lock's holder is the only writer: a fixed name
            return _fresh(self.checkpoint / _ENTRY_PARTIAL)
        handle, temporary = tempfile.mkstemp(
            dir=self.path.parent, prefix=self.path.stem, suffix=".partial"
        )
        os.close(handle)
        return Path(temporary)

    def _open_checkpoint(self) -> IO[bytes]:
        """The checkpoint's side file, after its last checkpointed byte (a fresh one if there
        is nothing to resume)."""
        assert self.checkpoint is not None
        if self.checkpoint.exists() and not self.checkpoint.is_dir():
            raise CacheFileError(
                f"{self.checkpoint} is not a directory, so it is not used as the pre-pass "
                f"checkpoint of {self.path}. Remove it and rerun."
            )
        self.resume_point = self._read_checkpoint()
        if self.resume_point is None:
            shutil.rmtree(self.checkpoint, ignore_errors=True)
            self.checkpoint.mkdir(exist_ok=True)
            return open(self.checkpoint / _MATRICES_FILE, "w+b")
        side = open(self.checkpoint / _MATRICES_FILE, "r+b")
        # Bytes past the checkpoint belong to a block that did not finish.
        side.truncate(byte_count(self._added))
        side.seek(0, os.SEEK_END)
        self._checkpointed = self.resume_point.next_block
        return side

    def _read_checkpoint(self) -> ResumePoint | None:
        assert self.checkpoint is not None
        state = self.checkpoint / _STATE_FILE
        matrices = self.checkpoint / _MATRICES_FILE
        try:
            require_regular(state)
            if not state.exists():  # no checkpoint, or stopped before its first block finished
                return None
            point, added = read_checkpoint(state, self.payload)
            needed = byte_count(added)
            require_regular(matrices)
            available = matrices.stat().st_size
            if available < needed:
                raise ValueError(f"its matrices file holds {available} of {needed} bytes")
        except READ_ERRORS as error:
            LOG.warning(
                "Discarding pre-pass checkpoint %s: %s; starting from the first block.",
                self.checkpoint,
                error,
            )
            return None
        self._added = added
        return point


def _fresh(temporary: Path) -> Path:
    """A fixed temporary name of the checkpoint directory with nothing left there: opening a
    FIFO left at it would block the write, and whatever is there is this writer's scratch."""
    temporary.unlink(missing_ok=True)
    return temporary
