"""Checkpoint reading without memory maps: same values as safetensors, clear errors on damage."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from mergekit.common import ModelReference
from safetensors import safe_open
from safetensors.torch import save_file

from mergekit_sparsegpt.capture.weights import (
    CheckpointError,
    CheckpointReader,
    check_safetensors_file,
    read_stored,
    safetensors_header,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool]


def _tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for index, dtype in enumerate(DTYPES):
        values = torch.randn(3, 5 + index, generator=generator) * 10
        tensors[f"t{index}"] = values.to(dtype) if dtype != torch.bool else values > 0
    tensors["scalar"] = torch.tensor(2.5)
    tensors["empty"] = torch.zeros(0, 4)
    return tensors


def test_reads_every_dtype_and_shape_like_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file(_tensors(), path, metadata={"format": "pt"})
    header = safetensors_header(str(path))
    assert set(header) == set(_tensors())
    with safe_open(path, framework="pt") as handle:
        for name in handle.keys():
            expected = handle.get_tensor(name)
            actual = read_stored(header[name], name)
            assert actual.dtype == expected.dtype and actual.shape == expected.shape
            assert torch.equal(actual, expected)


def test_reader_serves_stored_names_and_refuses_missing_ones(tiny_models) -> None:
    model = ModelReference.parse(str(tiny_models.base))
    reader = CheckpointReader(model, "llama")
    with safe_open(Path(tiny_models.base) / "model.safetensors", framework="pt") as handle:
        for name in handle.keys():
            assert torch.equal(reader(name), handle.get_tensor(name))
            assert reader.stored(name).shape == tuple(handle.get_slice(name).get_shape())
    with pytest.raises(ValueError, match="has no checkpoint tensor 'model.nope.weight'"):
        reader("model.nope.weight")


def test_tensors_read_own_their_memory(tmp_path: Path) -> None:
    """No view of a file mapping: writing to the result must not need the file."""
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(4, 4)}, path)
    tensor = read_stored(safetensors_header(str(path))["w"], "w")
    path.unlink()
    tensor.add_(1)
    assert torch.equal(tensor, torch.full((4, 4), 2.0))


def test_truncated_file_names_file_and_tensor(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.ones(8), "b": torch.ones(1000)}, path)
    header = safetensors_header(str(path))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors ends inside tensor 'b'"):
        read_stored(header["b"], "b")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", r"is empty \(0 bytes\)"),
        (b"\x05\x00", r"is truncated: 2 bytes, fewer than the 8 that give a safetensors file's"),
        (struct.pack("<Q", 10**12) + b"{}", r"is not a safetensors file: its first 8 bytes give"),
        (struct.pack("<Q", 4) + b"{no", r"is truncated: its header needs 12 bytes, the file has"),
        (struct.pack("<Q", 3) + b"{no", r"is not a readable safetensors file \(JSONDecodeError"),
        (struct.pack("<Q", 2) + b"[]", r"is not a readable safetensors file \(ValueError: the"),
    ],
    ids=["empty", "short", "huge-header", "header past the end", "bad-json", "not an object"],
)
def test_corrupt_header_names_the_file(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "model-00001-of-00002.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"model-00001-of-00002\.safetensors " + message):
        safetensors_header(str(path))
    with pytest.raises(CheckpointError, match=r"\. Re-download or re-save the model\.$"):
        safetensors_header(str(path))


def test_a_file_cut_inside_its_tensors_is_found_before_reading_them(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.ones(8), "b": torch.ones(1000)}, path)
    check_safetensors_file(str(path))  # whole: nothing to say
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[:-100])
    pattern = rf"is truncated: its header describes {size} bytes, the file has {size - 100}\."
    with pytest.raises(CheckpointError, match=pattern):
        check_safetensors_file(str(path))


def test_header_with_wrong_byte_span_is_refused(tmp_path: Path) -> None:
    header = {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}
    encoded = json.dumps(header).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + bytes(12))
    with pytest.raises(CheckpointError, match=r"tensor 'w' spans 12 bytes.*needs 16"):
        read_stored(safetensors_header(str(path))["w"], "w")
