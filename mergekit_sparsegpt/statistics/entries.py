"""A cache entry's file: a plain safetensors file, written and read here.

The whole matrices of an entry (up to 22 GB per task for a 7B model) never sit in memory all at
once: the writer streams them to a side file, and ``CachedMatrices`` reads one Hessian group's
matrices back when a kernel asks for them.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any, TypeVar

import torch
from safetensors import safe_open

from mergekit_sparsegpt.statistics.cache_dir import (
    LOG,
    READ_ERRORS,
    CacheFileError,
    require_regular,
)
from mergekit_sparsegpt.statistics.hessian import OPTIONAL_MATRICES
from mergekit_sparsegpt.statistics.keys import FORMAT_VERSION, canonical
from mergekit_sparsegpt.statistics.task_statistics import (
    StoredMatricesError,
    TaskStatistics,
    split_tensor_key,
    tensor_key,
)

T = TypeVar("T")

# safetensors' names of the dtypes statistics come in (they are float32 by construction).
DTYPES = {
    torch.float32: "F32",
    torch.float64: "F64",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
}
DTYPE_BY_NAME = {name: dtype for dtype, name in DTYPES.items()}
# Hessian groups whose matrices a ``CachedMatrices`` keeps after a read. mergekit's executor
# merges a block's linears in name order (k, o, q, v), so two keep q/k/v's group across o_proj.
RECENT_GROUPS = 2


def byte_count(tensors: dict[str, torch.Tensor]) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())


def replace_atomically(path: Path, temporary: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``temporary`` with ``write``, then rename it to ``path``; removed on any error."""
    try:
        with open(temporary, "wb") as handle:
            write(handle)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_tensors(handle: IO[bytes], header: bytes, tensors: Iterable[torch.Tensor]) -> None:
    """A safetensors file's start: the header's length and the header, then ``tensors``'
    bytes (all of the file if ``header`` describes no other tensor)."""
    handle.write(len(header).to_bytes(8, "little"))
    handle.write(header)
    for tensor in tensors:
        handle.write(raw_bytes(tensor))


def raw_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes without a copy (safetensors data is little-endian, like the hosts)."""
    return memoryview(tensor.detach().cpu().contiguous().view(torch.uint8).numpy())


def safetensors_header(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors' JSON header for ``tensors`` laid out in this order, padded to 8 bytes."""
    entries: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        entries[name] = {
            "dtype": DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    header = json.dumps(entries, separators=(",", ":")).encode()
    return header + b" " * (-len(header) % 8)


def read_statistics(path: Path, payload: dict[str, Any]) -> TaskStatistics:
    """The entry's statistics, its whole matrices left in the file until a kernel asks.

    Raises one of ``READ_ERRORS`` when the entry cannot be used.
    """
    key = canonical(payload)
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata() or {}
        check_identity(metadata, key)
        vectors, shapes = vectors_and_matrix_shapes(handle)
    return TaskStatistics.from_tensors(vectors, metadata, CachedMatrices(path, key, shapes))


def vectors_and_matrix_shapes(
    handle: Any,
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, ...]]]:
    """An open statistics file's per-column vectors, read, and the shapes of its whole
    matrices, which stay in the file until a kernel asks for them."""
    vectors, shapes = {}, {}
    for name in handle.keys():
        if split_tensor_key(name)[1] in OPTIONAL_MATRICES:
            shapes[name] = tuple(handle.get_slice(name).get_shape())
        else:
            vectors[name] = handle.get_tensor(name)
    return vectors, shapes


def check_identity(metadata: dict[str, str], key: str) -> None:
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
    return load_entry(path, payload, read_statistics)


def load_entry(
    path: Path, payload: dict[str, Any], read: Callable[[Path, dict[str, Any]], T]
) -> T | None:
    """``read(path, payload)``, or None (with a warning) when the entry is absent, stale or
    corrupt; ``CacheFileError`` when something other than a regular file is at ``path``."""
    try:
        require_regular(path)
    except ValueError as error:
        raise CacheFileError(
            f"{error}, so it is not read as a statistics cache entry. Remove it and rerun."
        ) from None
    if not path.exists():
        return None
    try:
        return read(path, payload)
    except READ_ERRORS as error:
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
            require_regular(self.path)  # a missing file fails in safe_open, saying so
            with safe_open(self.path, framework="pt") as handle:
                if (handle.metadata() or {}).get("key") != self._key:
                    raise ValueError("it now holds statistics of other inputs")
                matrices = {field: handle.get_tensor(tensor_key(group, field)) for field in shapes}
        except READ_ERRORS as error:
            raise StoredMatricesError(
                f"cache entry {self.path} can no longer be read ({error})"
            ) from None
        for field, matrix in matrices.items():
            if tuple(matrix.shape) != shapes[field] or not torch.isfinite(matrix).all():
                raise StoredMatricesError(
                    f"cache entry {self.path} is corrupt: {field} of {group} is malformed"
                )
        return matrices
