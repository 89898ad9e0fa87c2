"""Checkpoint tensors for the pre-pass, read one at a time by the model's own parameter names.

safetensors shards are read with plain file reads at the offsets their header gives, not
memory-mapped: a mapped shard's pages stay in the process's resident set while the shard is
open, so reading a model block by block through ``safe_open`` costs up to a whole shard (1-5 GB
in published checkpoints) on top of the block, and more with every block read until the shard
changes. Other formats (PyTorch pickles) go through mergekit's own lazy loader.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch
from mergekit.architecture.conversion import convert_checkpoint_tensors
from mergekit.common import ModelReference
from mergekit.io.lazy_tensor_loader import ShardedTensorIndex
from mergekit.io.tasks import LoaderCache
from safetensors import SafetensorError

from mergekit_sparsegpt.special_files import special_file_kind

# safetensors' dtype names (https://github.com/huggingface/safetensors, format spec).
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
# A header larger than this is not a safetensors header (the format caps it at 100 MB).
MAX_HEADER_BYTES = 100_000_000
# The fix for every damaged checkpoint file.
REFETCH = "Re-download or re-save the model."


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read as what it claims to be."""


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor's bytes are in a safetensors file."""

    path: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int


def safetensors_header(path: str) -> dict[str, StoredTensor]:
    """Every tensor of a safetensors file, from its JSON header (no tensor data is read)."""
    size = _regular_size(path)
    try:
        with open(path, "rb") as handle:
            length = _header_length(path, handle.read(8), size)
            header = json.loads(handle.read(length))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        data_start = 8 + length
        return {
            name: StoredTensor(
                path,
                SAFETENSORS_DTYPES[entry["dtype"]],
                tuple(entry["shape"]),
                data_start + entry["data_offsets"][0],
                data_start + entry["data_offsets"][1],
            )
            for name, entry in header.items()
            if name != "__metadata__"
        }
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error) as error:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({type(error).__name__}: {error}). "
            f"{REFETCH}"
        ) from None


def check_safetensors_file(path: str) -> None:
    """Raise a ``CheckpointError`` unless ``path`` is a whole safetensors file: a readable
    header, and every tensor's bytes within the file (a cut download fails here, not in the
    middle of the pre-pass)."""
    tensors = safetensors_header(path)
    size = os.stat(path).st_size
    end = max((tensor.end for tensor in tensors.values()), default=0)
    if end > size:
        raise CheckpointError(
            f"{path} is truncated: its header describes {end} bytes, the file has {size}. {REFETCH}"
        )


def _regular_size(path: str) -> int:
    """The size of the regular file at ``path``; anything else is refused before it is opened
    (opening a FIFO blocks until something writes to it)."""
    try:
        status = os.stat(path)
    except OSError as error:
        raise CheckpointError(f"{path} cannot be read ({error.strerror}). {REFETCH}") from None
    if not stat.S_ISREG(status.st_mode):
        raise CheckpointError(f"{path} is {special_file_kind(path)}, not a regular file. {REFETCH}")
    return status.st_size


def _header_length(path: str, start: bytes, size: int) -> int:
    """The header length the file's first 8 bytes give, checked against the file's size."""
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes). {REFETCH}")
    if len(start) < 8:
        raise CheckpointError(
            f"{path} is truncated: {size} bytes, fewer than the 8 that give a safetensors "
            f"file's header length. {REFETCH}"
        )
    (length,) = struct.unpack("<Q", start)
    if length > MAX_HEADER_BYTES:
        raise CheckpointError(
            f"{path} is not a safetensors file: its first 8 bytes give a header of {length} "
            f"bytes, more than the format's {MAX_HEADER_BYTES}. {REFETCH}"
        )
    if 8 + length > size:
        raise CheckpointError(
            f"{path} is truncated: its header needs {8 + length} bytes, the file has {size}. "
            f"{REFETCH}"
        )
    return length


def read_stored(tensor: StoredTensor, name: str) -> torch.Tensor:
    """The tensor's values, read into fresh memory."""
    item_size = torch.empty((), dtype=tensor.dtype).element_size()
    expected = item_size * _numel(tensor.shape)
    if tensor.end - tensor.start != expected:
        raise CheckpointError(
            f"{tensor.path}: tensor {name!r} spans {tensor.end - tensor.start} bytes, but shape "
            f"{list(tensor.shape)} of {tensor.dtype} needs {expected}. {REFETCH}"
        )
    raw = torch.empty(expected, dtype=torch.uint8)
    view = memoryview(raw.numpy())
    filled = 0
    with open(tensor.path, "rb", buffering=0) as handle:
        handle.seek(tensor.start)
        while filled < expected:
            count = handle.readinto(view[filled:])
            if not count:
                raise CheckpointError(
                    f"{tensor.path} ends inside tensor {name!r} (the file is truncated). {REFETCH}"
                )
            filled += count
    return raw.view(tensor.dtype).reshape(tensor.shape)


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def checked_weight_index(model: ModelReference) -> ShardedTensorIndex:
    """mergekit's index of ``model``'s weight files, each safetensors file checked whole.

    mergekit opens a single-file checkpoint to list its tensors and lets safetensors' own
    error out, naming no file; the shards of a sharded one it does not open at all, so a cut
    download would fail only when the pre-pass reaches it.
    """
    _refuse_special_weight_files(model.model.path)
    try:
        index = LoaderCache().get(model).index
    except SafetensorError as error:
        raise _single_file_error(model, error) from None
    for shard in sorted(set(index.tensor_paths.values())):
        if shard.lower().endswith(".safetensors"):
            check_safetensors_file(os.path.join(index.base_path, shard))
    return index


def _refuse_special_weight_files(directory: str) -> None:
    """mergekit opens a single weight file to list its tensors: a FIFO there would hang it."""
    if not os.path.isdir(directory):
        return
    for name in sorted(os.listdir(directory)):
        if name.endswith((".safetensors", ".bin")):
            path = os.path.join(directory, name)
            kind = special_file_kind(path)
            if kind is not None:
                raise CheckpointError(f"{path} is {kind}, not a regular file. {REFETCH}")


def _single_file_error(model: ModelReference, error: SafetensorError) -> CheckpointError:
    """What is wrong with the one safetensors file mergekit could not open."""
    if model.lora is not None:  # the file may be the adapter's or the base's
        return CheckpointError(
            f"its weights are not a readable safetensors checkpoint ({error}). {REFETCH}"
        )
    path = os.path.join(model.local_path(LoaderCache().hf_cache_dir), "model.safetensors")
    try:
        check_safetensors_file(path)
    except CheckpointError as diagnosed:
        return diagnosed
    return CheckpointError(f"{path} is not a readable safetensors file ({error}). {REFETCH}")


class CheckpointReader:
    """Tensors of one model by state-dict name; ``reader(name)`` returns a fresh CPU tensor.

    Names the checkpoint does not hold are built by mergekit's checkpoint converter
    (transformers 5 keeps fused MoE experts in a different layout in memory than on disk).
    """

    def __init__(self, model: ModelReference, model_type: str) -> None:
        self.model = model
        self.model_type = model_type
        self.loader = LoaderCache().get(model)
        self.index = self.loader.index
        self._headers: dict[str, dict[str, StoredTensor]] = {}
        self._sources: dict[str, Callable[[], torch.Tensor]] = {
            key: (lambda key=key: self(key)) for key in self.index.tensor_paths
        }

    @property
    def tensor_names(self) -> Collection[str]:
        """The names of the checkpoint's tensors."""
        return self.index.tensor_paths.keys()

    def stored(self, name: str) -> StoredTensor | None:
        """Where ``name`` is stored; None unless it is in a safetensors shard."""
        shard = self.index.tensor_paths.get(name)
        if shard is None or not shard.lower().endswith(".safetensors"):
            return None
        path = os.path.join(self.index.base_path, shard)
        if path not in self._headers:  # one header read per shard
            self._headers[path] = safetensors_header(path)
        return self._headers[path].get(name)

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self.index.tensor_paths:
            return self._converted(name)
        stored = self.stored(name)
        if stored is None:
            return self.loader.get_tensor(name, device="cpu")
        return read_stored(stored, name)

    def _converted(self, name: str) -> torch.Tensor:
        converted = convert_checkpoint_tensors(self.model_type, self._sources, name)
        if converted is None:
            raise ValueError(
                f"Model {self.model} has no checkpoint tensor {name!r}, which its transformers "
                "architecture needs for the calibration forward pass"
            )
        return converted
