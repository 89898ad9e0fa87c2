import gc
import json
import logging
import struct
import weakref
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from statistics_helpers import (
    DOWN,
    PAYLOAD,
    K,
    Q,
    in_memory_statistics,
    rekeyed_to_current_format,
    sample_layers,
    sample_statistics,
    save_statistics,
    streamed_statistics,
)

from mergekit_sparsegpt.statistics import entries, resumable
from mergekit_sparsegpt.statistics import keys as cache_keys
from mergekit_sparsegpt.statistics.hessian import hessian_statistics
from mergekit_sparsegpt.statistics.task_statistics import StoredMatricesError


def test_round_trip_and_no_partial_files(tmp_path):
    path = cache_keys.cache_path(tmp_path, PAYLOAD)
    original = sample_statistics()
    save_statistics(path, original, PAYLOAD)
    loaded = entries.load_statistics(path, PAYLOAD)
    assert loaded is not None
    assert loaded.groups == original.groups and loaded.samples == original.samples
    assert loaded.linear_suffixes == original.linear_suffixes
    for group, stats in original.statistics.items():
        for key, value in stats.tensors().items():
            assert torch.equal(loaded.statistics[group].tensors()[key], value)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_round_trip_keeps_whole_hessians(tmp_path):
    path = cache_keys.cache_path(tmp_path, PAYLOAD)
    original = sample_statistics()
    inputs = torch.randn(20, 4, generator=torch.Generator().manual_seed(1))
    name = "model.layers.0.mlp.down_proj.weight"
    original.statistics[name] = hessian_statistics(2 / 20 * inputs.T @ inputs, keep_hessian=True)
    save_statistics(path, original, PAYLOAD)
    loaded = entries.load_statistics(path, PAYLOAD)
    assert loaded.statistics[name].hessian is None  # left in the file until asked for
    assert torch.equal(loaded.for_weight(name).hessian, original.statistics[name].hessian)
    assert loaded.for_weight("model.layers.0.self_attn.q_proj.weight").hessian is None


def test_malformed_hessian_is_rejected(tmp_path, caplog):
    path = cache_keys.cache_path(tmp_path, PAYLOAD)
    statistics = sample_statistics()
    name = "model.layers.0.mlp.down_proj.weight"
    stats = statistics.statistics[name]
    statistics.statistics[name] = replace(stats, hessian=torch.ones(3, 3))
    save_statistics(path, statistics, PAYLOAD)
    with caplog.at_level(logging.WARNING):
        assert entries.load_statistics(path, PAYLOAD) is None
    assert "hessian of" in caplog.text


def test_entry_written_for_other_inputs_is_not_used(tmp_path, caplog):
    path = tmp_path / "entry.safetensors"
    save_statistics(path, sample_statistics(), PAYLOAD)
    with caplog.at_level(logging.WARNING):
        assert entries.load_statistics(path, {**PAYLOAD, "tokens": "zzz"}) is None
    assert "different inputs" in caplog.text


@pytest.mark.parametrize("damage", ["truncate", "garbage", "nan"])
def test_corrupt_entry_is_rejected(tmp_path, caplog, damage):
    path = tmp_path / "entry.safetensors"
    statistics = sample_statistics()
    if damage == "nan":
        next(iter(statistics.statistics.values())).inverse_diagonal[0] = float("nan")
    save_statistics(path, statistics, PAYLOAD)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:-10])
    elif damage == "garbage":
        path.write_bytes(b"not a safetensors file at all")
    with caplog.at_level(logging.WARNING):
        assert entries.load_statistics(path, PAYLOAD) is None
    assert "recomputing" in caplog.text


def test_streamed_entry_equals_one_written_from_memory(tmp_path):
    streamed_path, memory_path = tmp_path / "streamed.safetensors", tmp_path / "memory.safetensors"
    with resumable.EntryWriter(streamed_path, PAYLOAD) as writer:
        streamed = streamed_statistics(writer, keep_factors=True)
        # Each matrix left memory as soon as its group was done.
        assert all(
            s.hessian is None and s.cholesky_factor is None for s in streamed.statistics.values()
        )
        writer.commit(streamed)
    save_statistics(memory_path, in_memory_statistics(keep_factors=True), PAYLOAD)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "memory.safetensors",
        "streamed.safetensors",
    ]
    streamed_tensors, memory_tensors = load_file(streamed_path), load_file(memory_path)
    assert streamed_tensors.keys() == memory_tensors.keys()
    assert sum(key.endswith("::hessian") for key in memory_tensors) == 4
    assert all(torch.equal(streamed_tensors[k], memory_tensors[k]) for k in memory_tensors)
    with safe_open(streamed_path, "pt") as one, safe_open(memory_path, "pt") as other:
        assert one.metadata() == other.metadata()


@pytest.mark.parametrize("keep_factors", [False, True])
def test_lazy_statistics_equal_the_in_memory_ones(tmp_path, keep_factors):
    path = tmp_path / "entry.safetensors"
    with resumable.EntryWriter(path, PAYLOAD) as writer:
        writer.commit(streamed_statistics(writer, keep_factors))
    lazy, eager = entries.read_statistics(path, PAYLOAD), in_memory_statistics(keep_factors)
    for name in eager.groups:
        ours, theirs = lazy.for_weight(name), eager.for_weight(name)
        for field, value in vars(theirs).items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(getattr(ours, field), value), (name, field)
            else:
                assert getattr(ours, field) == value, (name, field)
        # With H kept the factor never is: it is recomputed from H, the same either way.
        assert ours.cholesky_factor is None and ours.hessian is not None
        assert torch.equal(ours.upper_factor(), theirs.upper_factor()), name


def test_only_the_most_recent_groups_are_kept_in_memory(tmp_path, monkeypatch):
    path = tmp_path / "entry.safetensors"
    save_statistics(path, in_memory_statistics(keep_factors=True), PAYLOAD)
    loaded = entries.read_statistics(path, PAYLOAD)
    assert all(s.hessian is None and s.cholesky_factor is None for s in loaded.statistics.values())
    reads = []
    original = entries.CachedMatrices._load

    def counting(self, group):
        reads.append(group)
        return original(self, group)

    monkeypatch.setattr(entries.CachedMatrices, "_load", counting)
    monkeypatch.setattr(entries, "RECENT_GROUPS", 2)
    query = loaded.for_weight(Q.format(0))
    assert loaded.for_weight(K.format(0)).hessian is query.hessian  # q and k share a group
    released = [weakref.ref(query.hessian)]
    del query
    loaded.for_weight(DOWN.format(0))
    loaded.for_weight(Q.format(0))  # still one of the two most recent
    assert reads == [Q.format(0), DOWN.format(0)]
    loaded.for_weight(Q.format(1))
    loaded.for_weight(DOWN.format(1))
    assert reads == [Q.format(0), DOWN.format(0), Q.format(1), DOWN.format(1)]
    gc.collect()
    assert all(ref() is None for ref in released)
    loaded.for_weight(K.format(0))
    assert reads[-1] == Q.format(0)  # read again once dropped


def _overwrite_last_element(path, key: str, value: float) -> None:
    """Set the last float32 of tensor ``key`` in the file, in place."""
    data = bytearray(path.read_bytes())
    header_size = int.from_bytes(data[:8], "little")
    _, end = json.loads(data[8 : 8 + header_size])[key]["data_offsets"]
    data[8 + header_size + end - 4 : 8 + header_size + end] = struct.pack("<f", value)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["delete", "truncate", "garbage", "nan"])
def test_entry_damaged_after_loading_is_a_clear_error_naming_the_file(tmp_path, damage):
    path = tmp_path / "entry.safetensors"
    save_statistics(path, in_memory_statistics(keep_factors=False), PAYLOAD)
    loaded = entries.read_statistics(path, PAYLOAD)
    if damage == "delete":
        path.unlink()
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:-10])
    elif damage == "garbage":
        path.write_bytes(b"not a safetensors file at all")
    else:
        _overwrite_last_element(path, f"{DOWN.format(1)}::hessian", float("nan"))
    with pytest.raises(StoredMatricesError, match=f"cache entry {path}"):
        loaded.for_weight(DOWN.format(1))
    # Statistics without whole matrices need no read.
    assert loaded.for_weight("model.embed_tokens.weight") is None


@pytest.mark.parametrize("kind", ["no metadata", "foreign", "old version", "newer version"])
def test_an_entry_that_is_not_this_versions_is_rejected_saying_why(tmp_path, caplog, kind):
    path = cache_keys.cache_path(tmp_path, PAYLOAD)
    if kind == "no metadata":
        save_file({"weight": torch.ones(2)}, path)
        reason = (
            "it has no metadata, so it is not a mergekit_sparsegpt statistics entry "
            "(another program's file?)"
        )
    elif kind == "foreign":
        save_file({"weight": torch.ones(2)}, path, metadata={"format": "pt"})
        reason = (
            "its metadata (format) has no cache key, so it is not a mergekit_sparsegpt "
            "statistics entry (another program's file?)"
        )
    else:
        version = cache_keys.FORMAT_VERSION + (-1 if kind == "old version" else 1)
        save_statistics(path, sample_statistics(), PAYLOAD)
        tensors = load_file(path)
        with safe_open(path, "pt") as handle:
            metadata = handle.metadata()
        save_file(tensors, path, {**metadata, "format": str(version)})
        reason = (
            f"it has cache format version {version}; this version of mergekit_sparsegpt "
            f"reads version {cache_keys.FORMAT_VERSION} only"
        )
    with caplog.at_level(logging.WARNING):
        assert entries.load_statistics(path, PAYLOAD) is None
    assert [r.getMessage() for r in caplog.records] == [
        f"Ignoring statistics cache {path}: {reason}; recomputing."
    ]


FORMAT4_ENTRY = Path(__file__).parent / "data" / "entry_format4.safetensors"
FORMAT4_PAYLOAD = {
    "format": 4,
    "model": "org/model@main",
    "weights": "wwwwwwww",
    "config": "cccccccc",
    "tokens": "tttttttt",
    "token_shape": [2, 8],
    "dampening": 0.01,
    "factors": True,
    "hessians": True,
}


def test_an_entry_with_both_matrices_stored_still_serves_its_factor_and_hessian(tmp_path):
    """Entries written before H alone was kept hold the factor too; it is used as stored. (The
    data file is of format 4, which the version bump retired: it is re-keyed to the current
    format here, its contents unchanged.)"""
    entry = tmp_path / FORMAT4_ENTRY.name
    raw = load_file(FORMAT4_ENTRY)
    payload = rekeyed_to_current_format(FORMAT4_ENTRY, FORMAT4_PAYLOAD, entry)
    assert entries.load_statistics(entry, FORMAT4_PAYLOAD) is None  # format 4: recomputed
    loaded = entries.load_statistics(entry, payload)
    assert loaded is not None
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"):
        stats = loaded.for_weight(name)
        assert torch.equal(stats.cholesky_factor, raw[f"{name}::cholesky_factor"])
        assert torch.equal(stats.hessian, raw[f"{name}::hessian"])
        assert stats.upper_factor() is stats.cholesky_factor
        # What H alone gives instead: the same factor (to the rounding of the BLAS that wrote it).
        recomputed = replace(stats, cholesky_factor=None).upper_factor()
        torch.testing.assert_close(recomputed, stats.cholesky_factor, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("streamed", [False, True])
def test_an_entry_for_factors_and_hessians_stores_the_hessian_only(tmp_path, streamed):
    payload = {**PAYLOAD, "factors": True, "hessians": True}
    path = tmp_path / "entry.safetensors"
    if streamed:
        with resumable.EntryWriter(path, payload) as writer:
            writer.commit(streamed_statistics(writer, keep_factors=True))
    else:
        save_statistics(path, in_memory_statistics(keep_factors=True), payload)
    stored = load_file(path)
    assert sum(key.endswith("::hessian") for key in stored) == 4
    assert not any(key.endswith("::cholesky_factor") for key in stored)
    loaded = entries.load_statistics(path, payload)
    for layer in sample_layers():
        for group, hessian in layer.hessians.items():
            factor = hessian_statistics(hessian, 0.01, keep_factor=True).cholesky_factor
            stats = loaded.for_weight(group)
            assert stats.cholesky_factor is None
            assert torch.equal(stats.upper_factor(), factor), group
