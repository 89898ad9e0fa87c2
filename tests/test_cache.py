import logging
import os
from dataclasses import replace

import pytest
import torch

from mergekit_sparsegpt import cache
from mergekit_sparsegpt.hessian import hessian_statistics
from mergekit_sparsegpt.statistics import TaskStatistics

PAYLOAD = {"format": cache.FORMAT_VERSION, "model": "./m", "tokens": "abc", "dampening": 0.01}


def _statistics() -> TaskStatistics:
    task = TaskStatistics.empty("model.layers")
    inputs = torch.randn(20, 4, generator=torch.Generator().manual_seed(0))
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"):
        task.groups[name] = name
        task.statistics[name] = hessian_statistics(2 / 20 * inputs.T @ inputs)
        task.samples[name] = 20
    task.groups["model.layers.0.self_attn.k_proj.weight"] = "model.layers.0.self_attn.q_proj.weight"
    task.linear_suffixes = frozenset({"self_attn.q_proj.weight", "self_attn.k_proj.weight"})
    return task


def test_round_trip_and_no_partial_files(tmp_path):
    path = cache.cache_path(tmp_path, PAYLOAD)
    original = _statistics()
    cache.save_statistics(path, original, PAYLOAD)
    loaded = cache.load_statistics(path, PAYLOAD)
    assert loaded is not None
    assert loaded.groups == original.groups and loaded.samples == original.samples
    assert loaded.linear_suffixes == original.linear_suffixes
    for group, stats in original.statistics.items():
        for key, value in stats.tensors().items():
            assert torch.equal(loaded.statistics[group].tensors()[key], value)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_round_trip_keeps_whole_hessians(tmp_path):
    path = cache.cache_path(tmp_path, PAYLOAD)
    original = _statistics()
    inputs = torch.randn(20, 4, generator=torch.Generator().manual_seed(1))
    name = "model.layers.0.mlp.down_proj.weight"
    original.statistics[name] = hessian_statistics(2 / 20 * inputs.T @ inputs, keep_hessian=True)
    cache.save_statistics(path, original, PAYLOAD)
    loaded = cache.load_statistics(path, PAYLOAD)
    assert torch.equal(loaded.statistics[name].hessian, original.statistics[name].hessian)
    assert loaded.statistics["model.layers.0.self_attn.q_proj.weight"].hessian is None


def test_malformed_hessian_is_rejected(tmp_path, caplog):
    path = cache.cache_path(tmp_path, PAYLOAD)
    statistics = _statistics()
    name = "model.layers.0.mlp.down_proj.weight"
    stats = statistics.statistics[name]
    statistics.statistics[name] = replace(stats, hessian=torch.ones(3, 3))
    cache.save_statistics(path, statistics, PAYLOAD)
    with caplog.at_level(logging.WARNING):
        assert cache.load_statistics(path, PAYLOAD) is None
    assert "hessian of" in caplog.text


def test_entries_holding_more_matrices_serve_a_merge_needing_fewer():
    needs_nothing = {**PAYLOAD, "factors": False, "hessians": False}
    served_by = cache.serving_payloads(needs_nothing)
    assert served_by[0] == needs_nothing
    assert [(p["factors"], p["hessians"]) for p in served_by[1:3]] in (
        [(True, False), (False, True)],
        [(False, True), (True, False)],
    )
    assert (served_by[3]["factors"], served_by[3]["hessians"]) == (True, True)
    needs_hessians = {**PAYLOAD, "factors": False, "hessians": True}
    assert cache.serving_payloads(needs_hessians) == [
        needs_hessians,
        {**needs_hessians, "factors": True},
    ]
    everything = {**PAYLOAD, "factors": True, "hessians": True}
    assert cache.serving_payloads(everything) == [everything]
    keys = {cache.cache_key(p) for p in served_by}
    assert len(keys) == 4


def test_key_changes_with_every_payload_field():
    keys = {cache.cache_key(PAYLOAD)}
    for field, value in [
        ("model", "./other"),
        ("tokens", "abd"),
        ("dampening", 0.1),
        ("format", 0),
        ("factors", True),
        ("hessians", True),
    ]:
        keys.add(cache.cache_key({**PAYLOAD, field: value}))
    assert len(keys) == 7


def test_entry_written_for_other_inputs_is_not_used(tmp_path, caplog):
    path = tmp_path / "entry.safetensors"
    cache.save_statistics(path, _statistics(), PAYLOAD)
    with caplog.at_level(logging.WARNING):
        assert cache.load_statistics(path, {**PAYLOAD, "tokens": "zzz"}) is None
    assert "different inputs" in caplog.text


@pytest.mark.parametrize("damage", ["truncate", "garbage", "nan"])
def test_corrupt_entry_is_rejected(tmp_path, caplog, damage):
    path = tmp_path / "entry.safetensors"
    statistics = _statistics()
    if damage == "nan":
        next(iter(statistics.statistics.values())).inverse_diagonal[0] = float("nan")
    cache.save_statistics(path, statistics, PAYLOAD)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:-10])
    elif damage == "garbage":
        path.write_bytes(b"not a safetensors file at all")
    with caplog.at_level(logging.WARNING):
        assert cache.load_statistics(path, PAYLOAD) is None
    assert "recomputing" in caplog.text


def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(cache, "save_file", explode)
    path = tmp_path / "entry.safetensors"
    with pytest.raises(OSError):
        cache.save_statistics(path, _statistics(), PAYLOAD)
    assert list(tmp_path.iterdir()) == []


def test_fingerprint_sees_changed_bytes(tmp_path):
    weights = tmp_path / "model.safetensors"
    data = bytearray(range(256)) * 4096  # 1 MiB
    weights.write_bytes(bytes(data))
    before = cache.weights_fingerprint([str(weights)])
    data[0] ^= 1
    weights.write_bytes(bytes(data))
    assert cache.weights_fingerprint([str(weights)]) != before


def test_default_cache_dir_honours_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MERGEKIT_SPARSEGPT_CACHE", str(tmp_path / "c"))
    assert cache.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("MERGEKIT_SPARSEGPT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache.default_cache_dir() == tmp_path / "mergekit_sparsegpt"


def test_fingerprint_sees_an_in_place_edit_between_samples(tmp_path):
    weights = tmp_path / "model.safetensors"
    data = bytearray(8 << 20)  # 8 MiB: most bytes lie outside the sampled chunks
    weights.write_bytes(bytes(data))
    before = cache.weights_fingerprint([str(weights)])
    data[(1 << 20) + 12345] = 7
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(0, os.stat(weights).st_mtime_ns + 1_000_000))
    assert cache.weights_fingerprint([str(weights)]) != before


def test_config_fingerprint_changes_with_architecture_settings():
    from transformers import LlamaConfig

    one = LlamaConfig(hidden_size=32, rms_norm_eps=1e-6)
    two = LlamaConfig(hidden_size=32, rms_norm_eps=1e-1)
    assert cache.config_fingerprint(one) == cache.config_fingerprint(
        LlamaConfig(hidden_size=32, rms_norm_eps=1e-6)
    )
    assert cache.config_fingerprint(one) != cache.config_fingerprint(two)
