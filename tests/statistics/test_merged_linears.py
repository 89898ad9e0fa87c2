"""The solved-linears entry: written by the ordinary entry writer, read back lazily."""

import json

import pytest
import torch
from safetensors.torch import save_file

from mergekit_sparsegpt.statistics.keys import FORMAT_VERSION, canonical
from mergekit_sparsegpt.statistics.merged_linears import (
    KIND,
    MergedLinears,
    load_merged_linears,
    read_merged_linears,
)
from mergekit_sparsegpt.statistics.resumable import EntryWriter
from mergekit_sparsegpt.statistics.task_statistics import StoredMatricesError

PAYLOAD = {"format": 4, "kind": KIND, "merge": "m"}
REPORTS = {
    "model.layers.0.mlp.down_proj.weight": {"path": "regmean", "models": {}, "solve": {"x": 1}},
    "model.layers.0.self_attn.q_proj.weight": {"path": "regmean", "models": {"a": {"k": 0.5}}},
}


def _write(path, tensors, reports=REPORTS):
    with EntryWriter(path, PAYLOAD) as writer:
        for name, tensor in tensors.items():
            writer.add(name, tensor)
        writer.commit(MergedLinears(reports))


def _tensors():
    generator = torch.Generator().manual_seed(0)
    return {
        "model.layers.0.mlp.down_proj.weight": torch.randn(4, 6, generator=generator),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(3, 3, generator=generator).bfloat16(),
    }


def test_round_trip_keeps_every_tensor_and_record(tmp_path):
    path = tmp_path / "entry.safetensors"
    tensors = _tensors()
    _write(path, tensors)
    loaded = load_merged_linears(path, PAYLOAD)
    assert loaded is not None
    assert loaded.reports == REPORTS
    for name, tensor in tensors.items():
        assert name in loaded
        value = loaded.tensor(name)
        assert value.dtype == tensor.dtype and torch.equal(value, tensor)
    assert "model.embed_tokens.weight" not in loaded


def test_other_inputs_or_kinds_are_not_served(tmp_path, caplog):
    path = tmp_path / "entry.safetensors"
    _write(path, _tensors())
    assert load_merged_linears(path, {**PAYLOAD, "merge": "other"}) is None
    assert "written for different inputs" in caplog.text
    assert load_merged_linears(tmp_path / "absent.safetensors", PAYLOAD) is None
    # A task's statistics entry under the same key is not a solved-linears entry.
    metadata = {"key": canonical(PAYLOAD), "format": str(FORMAT_VERSION), "layout": "{}"}
    save_file({"x::hessian_diagonal": torch.ones(2)}, path, metadata=metadata)
    with pytest.raises(ValueError, match="not a merged-linears entry"):
        read_merged_linears(path, PAYLOAD)


def test_records_that_do_not_match_the_tensors_are_refused(tmp_path):
    path = tmp_path / "entry.safetensors"
    tensors = _tensors()
    _write(path, tensors, reports={next(iter(REPORTS)): REPORTS[next(iter(REPORTS))]})
    with pytest.raises(ValueError, match="do not match its tensors"):
        read_merged_linears(path, PAYLOAD)
    metadata = {
        "key": canonical(PAYLOAD),
        "format": str(FORMAT_VERSION),
        "kind": KIND,
        "merged_linears": "{",
    }
    save_file(tensors, path, metadata=metadata)
    with pytest.raises(ValueError, match="unreadable"):
        read_merged_linears(path, PAYLOAD)


def test_entry_removed_or_replaced_after_loading_is_one_clear_error(tmp_path):
    path = tmp_path / "entry.safetensors"
    _write(path, _tensors())
    loaded = read_merged_linears(path, PAYLOAD)
    name = next(iter(REPORTS))
    other = {**PAYLOAD, "merge": "other"}
    metadata = {"key": canonical(other), "format": str(FORMAT_VERSION), "kind": KIND}
    save_file(_tensors(), path, metadata={**metadata, "merged_linears": json.dumps(REPORTS)})
    with pytest.raises(StoredMatricesError, match="another merge"):
        loaded.tensor(name)
    path.unlink()
    with pytest.raises(StoredMatricesError, match="can no longer be read"):
        loaded.tensor(name)
