"""On-disk cache of task statistics: safetensors files keyed by everything that shapes them.

The key is a hash of a JSON payload (model identity and weights fingerprint, the exact token ids
fed to it, damping, format version, which whole matrices were kept); the payload is also stored
in the file and compared on load, so a hash collision or a hand-copied file cannot be used for
the wrong task.

Entries are plain safetensors files. The whole matrices of an entry (up to 22 GB per task for a
7B model) never sit in memory all at once: ``EntryWriter`` appends them to a side file as each
Hessian group is done and assembles the entry at the end, and ``CachedMatrices`` reads one
group's matrices back when a kernel asks for them.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import torch
from mergekit.common import ModelReference
from mergekit.io.tasks import LoaderCache
from safetensors import SafetensorError, safe_open
from transformers import PretrainedConfig

from mergekit_sparsegpt.hessian import OPTIONAL_MATRICES
from mergekit_sparsegpt.statistics import (
    StoredMatricesError,
    TaskStatistics,
    split_tensor_key,
    tensor_key,
)

LOG = logging.getLogger(__name__)

FORMAT_VERSION = 3  # bump whenever the statistics a given key maps to change (3: "hessians")
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
_COPY_CHUNK = 1 << 24
# Hessian groups whose matrices a ``CachedMatrices`` keeps after a read. mergekit's executor
# merges a block's linears in name order (k, o, q, v), so two keep q/k/v's group across o_proj.
RECENT_GROUPS = 2
# Exceptions of reading a safetensors file that is missing, truncated or not one at all.
_READ_ERRORS = (SafetensorError, OSError, ValueError, RuntimeError)


def default_cache_dir() -> Path:
    configured = os.environ.get("MERGEKIT_SPARSEGPT_CACHE")
    if configured:
        return Path(configured)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(xdg) / "mergekit_sparsegpt"


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
    """The model's architecture settings (activation, norm epsilon, RoPE...) shape its Hessians."""
    return hashlib.sha256(config.to_json_string(use_diff=False).encode()).hexdigest()


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


def cache_key(payload: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical(payload).encode()).hexdigest()


def cache_path(cache_dir: str | os.PathLike[str], payload: dict[str, Any]) -> Path:
    return Path(cache_dir) / f"{cache_key(payload)}.safetensors"


class CacheWriteError(OSError):
    """A cache entry could not be written (disk full, read-only directory...)."""


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Turn an OSError into one message that names the entry and the fix."""
    try:
        yield
    except OSError as error:
        raise CacheWriteError(
            f"Could not write the statistics cache entry {path} "
            f"({error.strerror or error}). Free space there, make {path.parent} writable, or set "
            "cache_dir (or MERGEKIT_SPARSEGPT_CACHE) to a writable directory with room for it."
        ) from None


class EntryWriter:
    """Writes one cache entry atomically: a reader sees the old file, the new file, or nothing.

    ``add`` appends a whole matrix to a side file as soon as it is computed, so the pre-pass holds
    one Hessian group's matrices, not a task's. ``commit`` writes the entry: the header (which
    safetensors needs first, so it can only be written once every tensor is known), the tensors
    the statistics hold in memory, then the side file copied over; into a temporary file that is
    renamed into place. Leaving the ``with`` block removes the side file, and on an error the
    temporary entry too.
    """

    def __init__(self, path: Path, payload: dict[str, Any]) -> None:
        if sys.byteorder != "little":  # the raw bytes written below must be little-endian
            raise RuntimeError("writing the statistics cache needs a little-endian machine")
        self.path = path
        self.payload = payload
        with _writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            self._side: IO[bytes] = tempfile.NamedTemporaryFile(  # closed (deleted) by __exit__
                dir=path.parent, prefix=path.stem, suffix=".matrices.partial"
            )
        self._added: dict[str, torch.Tensor] = {}  # name -> an empty tensor of its dtype, shape

    def __enter__(self) -> EntryWriter:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._side.close()  # deletes it

    def add(self, name: str, tensor: torch.Tensor) -> None:
        with _writing(self.path):
            self._side.write(_raw_bytes(tensor))
        self._added[name] = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")

    def commit(self, statistics: TaskStatistics) -> None:
        in_memory, metadata = statistics.to_tensors()
        metadata = {**metadata, "key": _canonical(self.payload), "format": str(FORMAT_VERSION)}
        header = _header({**in_memory, **self._added}, metadata)
        with _writing(self.path):
            self._side.flush()
            self._side.seek(0)
            handle, temporary = tempfile.mkstemp(
                dir=self.path.parent, prefix=self.path.stem, suffix=".partial"
            )
            try:
                with os.fdopen(handle, "wb") as entry:
                    entry.write(len(header).to_bytes(8, "little"))
                    entry.write(header)
                    for tensor in in_memory.values():
                        entry.write(_raw_bytes(tensor))
                    shutil.copyfileobj(self._side, entry, _COPY_CHUNK)
                os.replace(temporary, self.path)
            except BaseException:
                Path(temporary).unlink(missing_ok=True)
                raise


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
        if metadata.get("key") != key:
            raise ValueError("it was written for different inputs")
        vectors, shapes = {}, {}
        for name in handle.keys():
            if split_tensor_key(name)[1] in OPTIONAL_MATRICES:
                shapes[name] = tuple(handle.get_slice(name).get_shape())
            else:
                vectors[name] = handle.get_tensor(name)
    return TaskStatistics.from_tensors(vectors, metadata, CachedMatrices(path, key, shapes))


def load_statistics(path: Path, payload: dict[str, Any]) -> TaskStatistics | None:
    """The cached statistics, or None (with a warning) when absent, stale or corrupt."""
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
