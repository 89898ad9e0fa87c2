"""On-disk cache of task statistics: safetensors files keyed by everything that shapes them.

The key is a hash of a JSON payload (model identity and weights fingerprint, the exact token ids
fed to it, damping, format version, which whole matrices were kept); the payload is also stored
in the file and compared on load, so a hash collision or a hand-copied file cannot be used for
the wrong task.

Entries are plain safetensors files. The whole matrices of an entry (up to 22 GB per task for a
7B model) never sit in memory all at once: ``EntryWriter`` appends them to a side file as each
Hessian group is done and assembles the entry at the end, and ``CachedMatrices`` reads one
group's matrices back when a kernel asks for them.

A pre-pass that is interrupted can resume: its writer keeps a checkpoint next to the entry
(``<key>.checkpoint/``: the statistics of the finished blocks, the whole matrices streamed so
far and the next block's input activations), and a rerun with the same key continues after the
last checkpointed block. ``entry_lock`` lets one process at a time compute an entry; another
that wants it waits, then reads the committed entry.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import torch
from mergekit.common import ModelReference
from mergekit.io.tasks import LoaderCache
from safetensors import SafetensorError, safe_open
from transformers import PretrainedConfig

from mergekit_sparsegpt.special_files import special_file_kind
from mergekit_sparsegpt.statistics.hessian import OPTIONAL_MATRICES
from mergekit_sparsegpt.statistics.task_statistics import (
    StoredMatricesError,
    TaskStatistics,
    split_tensor_key,
    tensor_key,
)

try:
    import fcntl
except ImportError:  # not POSIX: entries are still written atomically, but not locked
    fcntl = None  # type: ignore[assignment]
try:
    import resource
except ImportError:  # not POSIX: no per-process file-size limit to name
    resource = None  # type: ignore[assignment]

LOG = logging.getLogger(__name__)

FORMAT_VERSION = 4  # bump whenever the statistics a given key maps to change (3: "hessians";
# 4: Conv1D and fused-expert Hessians, forward pass in the checkpoint's dtype)
# Payload flags for the optional whole matrices an entry holds (``HessianStatistics``'s
# cholesky_factor and hessian). An entry holding more than a merge needs serves it too.
OPTIONAL_CONTENTS = ("factors", "hessians")
# Bytes hashed from each weight file: the start (safetensors header), the end, and evenly spaced
# samples between; reading whole multi-GB checkpoints would cost more than the pre-pass.
_FINGERPRINT_CHUNK = 1 << 16
_FINGERPRINT_SAMPLES = 16
# safetensors' names of the dtypes statistics come in (they are float32 by construction).
_DTYPES = {
    torch.float32: "F32",
    torch.float64: "F64",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
}
_DTYPE_BY_NAME = {name: dtype for dtype, name in _DTYPES.items()}
_COPY_CHUNK = 1 << 24
# The resume checkpoint of an entry: a directory holding the state file (statistics of the
# finished blocks and the next block's input) and the matrices file the entry's whole matrices
# are streamed to. Its own layout version: the statistics it holds follow FORMAT_VERSION.
CHECKPOINT_VERSION = 1
_STATE_FILE = "state.safetensors"
_MATRICES_FILE = "matrices"
_ENTRY_PARTIAL = "entry.partial"
_ACTIVATIONS = "activations"  # the state file's tensor of the next block's input
# The largest share of the pre-pass's time spent writing checkpoints (see CheckpointSchedule).
CHECKPOINT_OVERHEAD_VARIABLE = "MERGEKIT_SPARSEGPT_CHECKPOINT_OVERHEAD"
DEFAULT_CHECKPOINT_OVERHEAD = 0.1
# Hessian groups whose matrices a ``CachedMatrices`` keeps after a read. mergekit's executor
# merges a block's linears in name order (k, o, q, v), so two keep q/k/v's group across o_proj.
RECENT_GROUPS = 2
# Exceptions of reading a safetensors file that is missing, truncated or not one at all.
_READ_ERRORS = (SafetensorError, OSError, ValueError, RuntimeError)


def default_cache_dir() -> Path:
    configured = os.environ.get("MERGEKIT_SPARSEGPT_CACHE")
    if configured:
        return resolved_cache_dir(configured)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return resolved_cache_dir(Path(xdg) / "mergekit_sparsegpt")


def resolved_cache_dir(cache_dir: str | os.PathLike[str]) -> Path:
    """``cache_dir`` as an absolute path: ``~`` expanded, a relative path taken against the
    current directory (mergekit's ``run_merge`` is not told where the config file lies).

    Every name of an entry (lock, checkpoint, messages) derives from this one path, so a
    ``calibrate`` and a merge started in different directories name different entries in
    what they print, instead of silently using two caches under one relative name.
    """
    return Path(cache_dir).expanduser().absolute()


def file_fingerprint(path: str | os.PathLike[str]) -> str:
    """Size, modification time and sampled bytes of one file.

    The modification time catches an in-place edit the samples miss; a copied checkpoint gets a
    new one and is recomputed once, which is the safe direction.
    """
    digest = hashlib.sha256()
    status = os.stat(path)
    size = status.st_size
    digest.update(f"{size}:{status.st_mtime_ns}".encode())
    with open(path, "rb") as handle:
        offsets = {0, max(0, size - _FINGERPRINT_CHUNK)}
        offsets.update(
            size * k // (_FINGERPRINT_SAMPLES + 1) for k in range(1, _FINGERPRINT_SAMPLES)
        )
        for offset in sorted(offsets):
            handle.seek(offset)
            digest.update(handle.read(_FINGERPRINT_CHUNK))
    return digest.hexdigest()


def weights_fingerprint(weight_files: list[str]) -> str:
    digest = hashlib.sha256()
    for path in sorted(weight_files):
        digest.update(os.path.basename(path).encode())
        digest.update(file_fingerprint(path).encode())
    return digest.hexdigest()


def model_weights_fingerprint(model: ModelReference) -> str:
    """``weights_fingerprint`` of every weight file mergekit's loader indexes for ``model``."""
    index = LoaderCache().get(model).index
    return weights_fingerprint(
        [os.path.join(index.base_path, name) for name in set(index.tensor_paths.values())]
    )


def config_fingerprint(config: PretrainedConfig) -> str:
    """The model's architecture settings (activation, norm epsilon, RoPE...) shape its Hessians.
    Where the config was read from does not: another spelling of the model's path shares its
    entries."""
    settings = {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def tokens_fingerprint(windows: torch.Tensor) -> str:
    return hashlib.sha256(windows.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def serving_payloads(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """The payloads whose entries can serve ``payload``: itself first, then every entry that
    also holds optional matrices ``payload`` does not ask for (fewest extras first)."""
    missing = [flag for flag in OPTIONAL_CONTENTS if not payload.get(flag)]
    extras = [
        {flag: True for flag, take in zip(missing, choice, strict=True) if take}
        for choice in itertools.product((False, True), repeat=len(missing))
    ]
    return [{**payload, **extra} for extra in sorted(extras, key=len)]


def older_format_entries(
    cache_dir: str | os.PathLike[str], payload: dict[str, Any]
) -> list[tuple[Path, int]]:
    """Entries of earlier format versions for the same inputs: the version is part of the key,
    so they are never read, only named so that the user knows why the cache missed."""
    found = []
    for version in range(1, FORMAT_VERSION):
        for candidate in serving_payloads({**payload, "format": version}):
            path = cache_path(cache_dir, candidate)
            if path.is_file():
                found.append((path, version))
    return found


def cache_key(payload: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical(payload).encode()).hexdigest()


def cache_path(cache_dir: str | os.PathLike[str], payload: dict[str, Any]) -> Path:
    return resolved_cache_dir(cache_dir) / f"{cache_key(payload)}.safetensors"


def checkpoint_dir(path: Path) -> Path:
    """Where the pre-pass of entry ``path`` keeps what it needs to resume."""
    return path.with_suffix(".checkpoint")


def lock_path(path: Path) -> Path:
    return path.with_suffix(".lock")


def remove_checkpoint(path: Path) -> None:
    """Remove entry ``path``'s checkpoint, if any: the entry is there, nothing will resume."""
    shutil.rmtree(checkpoint_dir(path), ignore_errors=True)


class CacheWriteError(OSError):
    """A cache entry could not be written (disk full, read-only directory...)."""


class CacheFileError(ValueError):
    """Something other than a regular file where the cache keeps an entry."""


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Turn an OSError into one message that names the entry and the fix."""
    try:
        yield
    except OSError as error:
        raise CacheWriteError(
            f"Could not write the statistics cache entry {path} ({error.strerror or error})"
            f"{_write_fix(error, path.parent)}"
        ) from None


def _write_fix(error: OSError, directory: Path) -> str:
    """The end of a failed write's message: what to change, which depends on why it failed."""
    if error.errno != errno.EFBIG:
        return (
            f". Free space there, make {directory} writable, or set cache_dir (or "
            "MERGEKIT_SPARSEGPT_CACHE) to a writable directory with room for it."
        )
    limit = file_size_limit()
    if limit is not None:
        return (
            f": this process may write files of at most {limit} bytes (ulimit -f). Raise that "
            "limit (ulimit -f unlimited) and rerun."
        )
    return (
        f": the file system of {directory} does not take files this large. Set cache_dir (or "
        "MERGEKIT_SPARSEGPT_CACHE) to a directory on another file system."
    )


def file_size_limit() -> int | None:
    """The largest file this process may write (``ulimit -f``, in bytes); None if unlimited.

    Python ignores SIGXFSZ, so a write past the limit fails with EFBIG instead of killing the
    process, and the limit can be named.
    """
    if resource is None:
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else soft


def _require_regular(path: Path) -> None:
    """Raise a ``ValueError`` naming what is at ``path`` unless it is a regular file (links
    followed) or nothing. Opening a FIFO blocks until another process writes to it, and reading
    a device may never end, so nothing but a regular file is opened."""
    kind = special_file_kind(path)
    if kind is not None:
        raise ValueError(f"{path} is {kind}, not a regular file")


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


@dataclass
class ResumePoint:
    """Where an interrupted pre-pass stopped: the statistics of the blocks before
    ``next_block`` and that block's input activations ([samples, seq_len, hidden])."""

    next_block: int
    statistics: TaskStatistics
    activations: torch.Tensor


def checkpoint_overhead() -> float:
    """The configured largest share of pre-pass time spent writing checkpoints."""
    text = os.environ.get(CHECKPOINT_OVERHEAD_VARIABLE)
    if text is None:
        return DEFAULT_CHECKPOINT_OVERHEAD
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= 1:
        raise ValueError(
            f"{CHECKPOINT_OVERHEAD_VARIABLE}={text!r} must be a number from 0 (never write a "
            "resume checkpoint) to 1 (after every block): the largest share of the pre-pass's "
            "time spent writing them"
        )
    return value


class CheckpointSchedule:
    """Which finished blocks to checkpoint.

    A checkpoint rewrites the next block's input activations (1 GiB per block for a 7B model at
    the default 128 x 512 windows), which on a GPU can take as long as the block. So one is
    written only once the time since the previous one is long enough that the previous write's
    duration is at most ``overhead`` of the two together; the first block is always written
    (its cost is not known before). On a CPU, where a block takes minutes, that is every block.
    """

    def __init__(self, overhead: float) -> None:
        self.overhead = overhead
        self._since = time.monotonic()
        self._cost: float | None = None  # seconds the last write took

    def due(self) -> bool:
        if self.overhead <= 0:
            return False
        if self._cost is None:
            return True
        elapsed = time.monotonic() - self._since
        return self._cost * (1 - self.overhead) <= self.overhead * elapsed

    def written(self, cost: float) -> None:
        self._cost = cost
        self._since = time.monotonic()


class EntryWriter:
    """Writes one cache entry atomically: a reader sees the old file, the new file, or nothing.

    ``add`` appends a whole matrix to a side file as soon as it is computed, so the pre-pass holds
    one Hessian group's matrices, not a task's. ``commit`` writes the entry: the header (which
    safetensors needs first, so it can only be written once every tensor is known), the tensors
    the statistics hold in memory, then the side file copied over; into a temporary file that is
    renamed into place.

    A ``resumable`` writer (one process, holding ``entry_lock``) keeps everything it writes in
    the entry's checkpoint directory, the side file included, and ``block_finished`` saves the
    statistics so far with the next block's input there. It opens a checkpoint a previous run
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
        with _writing(path):
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
        with _writing(self.path):
            self._side.write(_raw_bytes(tensor))
        self._added[name] = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")

    def take_resume_point(self) -> ResumePoint | None:
        """The checkpoint found when opening, handed over once (its activations are large)."""
        point, self.resume_point = self.resume_point, None
        return point

    def block_finished(
        self, index: int, activations: torch.Tensor, statistics: TaskStatistics
    ) -> None:
        """Block ``index`` is in ``statistics`` and gave ``activations``: checkpoint it if due."""
        if self._schedule is None or not self._schedule.due():
            return
        started = time.monotonic()
        size = self.save_checkpoint(index + 1, statistics, activations)
        cost = time.monotonic() - started
        self._schedule.written(cost)
        LOG.debug(
            "Checkpoint %s after block %d: %d bytes, %.3f s", self.checkpoint, index, size, cost
        )

    def save_checkpoint(
        self, next_block: int, statistics: TaskStatistics, activations: torch.Tensor
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
                [[name, _DTYPES[t.dtype], list(t.shape)] for name, t in self._added.items()]
            ),
        }
        tensors = {**in_memory, _ACTIVATIONS: activations}
        header = _header(tensors, metadata)
        with _writing(self.path):
            self._side.flush()  # what Python still buffers would die with a killed process
            state = self.checkpoint / _STATE_FILE
            _replace_atomically(
                state,
                _fresh(state.with_name(state.name + ".partial")),
                lambda handle: _write_tensors(handle, header, tensors.values()),
            )
        self._checkpointed = next_block
        return 8 + len(header) + _byte_count(tensors)

    def commit(self, statistics: TaskStatistics) -> None:
        in_memory, metadata = statistics.to_tensors()
        metadata = {**metadata, **self._identity()}
        header = _header({**in_memory, **self._added}, metadata)

        def write(entry: IO[bytes]) -> None:
            _write_tensors(entry, header, in_memory.values())
            self._side.flush()
            self._side.seek(0)
            shutil.copyfileobj(self._side, entry, _COPY_CHUNK)

        with _writing(self.path):
            _replace_atomically(self.path, self._temporary_entry(), write)
        if self.checkpoint is not None:
            self._side.close()
            shutil.rmtree(self.checkpoint, ignore_errors=True)

    def _identity(self) -> dict[str, str]:
        return {"key": _canonical(self.payload), "format": str(FORMAT_VERSION)}

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
        side.truncate(_byte_count(self._added))
        side.seek(0, os.SEEK_END)
        self._checkpointed = self.resume_point.next_block
        return side

    def _read_checkpoint(self) -> ResumePoint | None:
        assert self.checkpoint is not None
        state = self.checkpoint / _STATE_FILE
        matrices = self.checkpoint / _MATRICES_FILE
        try:
            _require_regular(state)
            if not state.exists():  # no checkpoint, or stopped before its first block finished
                return None
            point, added = read_checkpoint(state, self.payload)
            needed = _byte_count(added)
            _require_regular(matrices)
            available = matrices.stat().st_size
            if available < needed:
                raise ValueError(f"its matrices file holds {available} of {needed} bytes")
        except _READ_ERRORS as error:
            LOG.warning(
                "Discarding pre-pass checkpoint %s: %s; starting from the first block.",
                self.checkpoint,
                error,
            )
            return None
        self._added = added
        return point


def read_checkpoint(
    state: Path, payload: dict[str, Any]
) -> tuple[ResumePoint, dict[str, torch.Tensor]]:
    """A checkpoint's resume point and its streamed matrices (name -> empty tensor of their
    dtype and shape, in file order). Raises one of ``_READ_ERRORS`` when it cannot be used."""
    with safe_open(state, framework="pt") as handle:
        metadata = handle.metadata() or {}
        _check_identity(metadata, _canonical(payload))
        if metadata.get("checkpoint") != str(CHECKPOINT_VERSION):
            raise ValueError(f"it is not a version {CHECKPOINT_VERSION} pre-pass checkpoint")
        names = list(handle.keys())
        if _ACTIVATIONS not in names:
            raise ValueError("it holds no activations")
        activations = handle.get_tensor(_ACTIVATIONS)
        vectors = {name: handle.get_tensor(name) for name in names if name != _ACTIVATIONS}
    try:
        next_block = int(metadata["next_block"])
        if next_block < 1:
            raise ValueError(f"next_block {next_block}")
        added = {
            name: torch.empty(shape, dtype=_DTYPE_BY_NAME[dtype], device="meta")
            for name, dtype, shape in json.loads(metadata["matrices"])
        }
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"its metadata is incomplete ({error!r})") from None
    expected = payload.get("token_shape")
    if activations.dim() != 3 or (expected and list(activations.shape[:2]) != list(expected)):
        raise ValueError(f"its activations have shape {list(activations.shape)}")
    statistics = TaskStatistics.from_tensors(vectors, metadata)
    return ResumePoint(next_block, statistics, activations), added


def _fresh(temporary: Path) -> Path:
    """A fixed temporary name of the checkpoint directory with nothing left there: opening a
    FIFO left at it would block the write, and whatever is there is this writer's scratch."""
    temporary.unlink(missing_ok=True)
    return temporary


def _byte_count(tensors: dict[str, torch.Tensor]) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())


def _replace_atomically(path: Path, temporary: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``temporary`` with ``write``, then rename it to ``path``; removed on any error."""
    try:
        with open(temporary, "wb") as handle:
            write(handle)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _write_tensors(handle: IO[bytes], header: bytes, tensors: Iterable[torch.Tensor]) -> None:
    """A safetensors file's start: the header's length and the header, then ``tensors``'
    bytes (all of the file if ``header`` describes no other tensor)."""
    handle.write(len(header).to_bytes(8, "little"))
    handle.write(header)
    for tensor in tensors:
        handle.write(_raw_bytes(tensor))


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes without a copy (safetensors data is little-endian, like the hosts)."""
    return memoryview(tensor.detach().cpu().contiguous().view(torch.uint8).numpy())


def _header(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors' JSON header for ``tensors`` laid out in this order, padded to 8 bytes."""
    entries: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        entries[name] = {
            "dtype": _DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    header = json.dumps(entries, separators=(",", ":")).encode()
    return header + b" " * (-len(header) % 8)


def save_statistics(path: Path, statistics: TaskStatistics, payload: dict[str, Any]) -> None:
    """Write statistics held in memory (with their matrices) as one entry, atomically."""
    with EntryWriter(path, payload) as writer:
        writer.commit(statistics)


def read_statistics(path: Path, payload: dict[str, Any]) -> TaskStatistics:
    """The entry's statistics, its whole matrices left in the file until a kernel asks.

    Raises one of ``_READ_ERRORS`` when the entry cannot be used.
    """
    key = _canonical(payload)
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata() or {}
        _check_identity(metadata, key)
        vectors, shapes = {}, {}
        for name in handle.keys():
            if split_tensor_key(name)[1] in OPTIONAL_MATRICES:
                shapes[name] = tuple(handle.get_slice(name).get_shape())
            else:
                vectors[name] = handle.get_tensor(name)
    return TaskStatistics.from_tensors(vectors, metadata, CachedMatrices(path, key, shapes))


def _check_identity(metadata: dict[str, str], key: str) -> None:
    """Raise a ``ValueError`` saying why a file is not this program's entry for ``key``."""
    if not metadata:
        raise ValueError(
            "it has no metadata, so it is not a mergekit_sparsegpt statistics entry "
            "(another program's file?)"
        )
    if "key" not in metadata:
        raise ValueError(
            f"its metadata ({', '.join(sorted(metadata))}) has no cache key, so it is not a "
            "mergekit_sparsegpt statistics entry (another program's file?)"
        )
    version = metadata.get("format", "(none)")
    if version != str(FORMAT_VERSION):
        raise ValueError(
            f"it has cache format version {version}; this version of mergekit_sparsegpt reads "
            f"version {FORMAT_VERSION} only"
        )
    if metadata["key"] != key:
        raise ValueError("it was written for different inputs")


def load_statistics(path: Path, payload: dict[str, Any]) -> TaskStatistics | None:
    """The cached statistics, or None (with a warning) when absent, stale or corrupt.

    Raises ``CacheFileError`` when something other than a regular file is at ``path``.
    """
    try:
        _require_regular(path)
    except ValueError as error:
        raise CacheFileError(
            f"{error}, so it is not read as a statistics cache entry. Remove it and rerun."
        ) from None
    if not path.exists():
        return None
    try:
        return read_statistics(path, payload)
    except _READ_ERRORS as error:
        LOG.warning("Ignoring statistics cache %s: %s; recomputing.", path, error)
        return None


class CachedMatrices:
    """The whole matrices of one cache entry, read one Hessian group at a time.

    The file is opened for each read, not held open or memory-mapped: a file deleted or
    truncated mid-merge then gives a clear error instead of a crash, and no descriptor is held
    per task. The ``RECENT_GROUPS`` most recently used groups are kept, because linears that
    share an input (q/k/v, gate/up) share a group and are merged close together; the oldest is
    dropped before another group is read, so memory holds at most that many groups per entry.
    """

    def __init__(self, path: Path, key: str, shapes: dict[str, tuple[int, ...]]) -> None:
        self.path = path
        self._key = key  # the payload the entry was loaded for, checked again on every read
        self._shapes: dict[str, dict[str, tuple[int, ...]]] = {}
        for name, shape in shapes.items():
            group, field = split_tensor_key(name)
            self._shapes.setdefault(group, {})[field] = shape
        self._recent: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()  # mergekit's multi-GPU executor runs kernels in threads

    def shapes(self, group: str) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes.get(group, {}))

    def read(self, group: str) -> dict[str, torch.Tensor]:
        with self._lock:
            matrices = self._recent.pop(group, None)
            if matrices is None:
                while len(self._recent) >= RECENT_GROUPS:
                    self._recent.popitem(last=False)
                matrices = self._load(group)
            self._recent[group] = matrices
            return dict(matrices)

    def _load(self, group: str) -> dict[str, torch.Tensor]:
        shapes = self._shapes.get(group, {})
        try:
            _require_regular(self.path)  # a missing file fails in safe_open, saying so
            with safe_open(self.path, framework="pt") as handle:
                if (handle.metadata() or {}).get("key") != self._key:
                    raise ValueError("it now holds statistics of other inputs")
                matrices = {field: handle.get_tensor(tensor_key(group, field)) for field in shapes}
        except _READ_ERRORS as error:
            raise StoredMatricesError(
                f"cache entry {self.path} can no longer be read ({error})"
            ) from None
        for field, matrix in matrices.items():
            if tuple(matrix.shape) != shapes[field] or not torch.isfinite(matrix).all():
                raise StoredMatricesError(
                    f"cache entry {self.path} is corrupt: {field} of {group} is malformed"
                )
        return matrices


def _canonical(payload: dict[str, Any]) -> str:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"))
