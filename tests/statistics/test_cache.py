import fcntl
import gc
import json
import logging
import os
import queue
import struct
import threading
import weakref
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mergekit_sparsegpt.capture.blocks import LayerHessians
from mergekit_sparsegpt.statistics import cache
from mergekit_sparsegpt.statistics.hessian import hessian_statistics
from mergekit_sparsegpt.statistics.task_statistics import StoredMatricesError, TaskStatistics

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
    assert loaded.statistics[name].hessian is None  # left in the file until asked for
    assert torch.equal(loaded.for_weight(name).hessian, original.statistics[name].hessian)
    assert loaded.for_weight("model.layers.0.self_attn.q_proj.weight").hessian is None


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

    monkeypatch.setattr(cache.shutil, "copyfileobj", explode)  # after the header is written
    path = tmp_path / "entry.safetensors"
    with pytest.raises(OSError):
        cache.save_statistics(path, _statistics(), PAYLOAD)
    assert list(tmp_path.iterdir()) == []


def test_failed_prepass_leaves_nothing_behind(tmp_path):
    path = tmp_path / "entry.safetensors"
    with pytest.raises(RuntimeError, match="forward pass failed"):
        with cache.EntryWriter(path, PAYLOAD) as writer:
            _streamed(writer, keep_factors=True)
            raise RuntimeError("forward pass failed")
    assert list(tmp_path.iterdir()) == []


# --- whole matrices: written group by group, read back per group when asked ---

Q, K, DOWN = (
    "model.layers.{}.self_attn.q_proj.weight",
    "model.layers.{}.self_attn.k_proj.weight",
    "model.layers.{}.mlp.down_proj.weight",
)


def _layers() -> list[LayerHessians]:
    """Two blocks, each with an attention group (q, k) and a down_proj group of other width."""
    generator = torch.Generator().manual_seed(3)
    layers = []
    for index in range(2):
        hessians = {}
        for name, columns in ((Q.format(index), 4), (DOWN.format(index), 6)):
            inputs = torch.randn(30, columns, generator=generator)
            hessians[name] = 2 / 30 * inputs.T @ inputs
        groups = {Q.format(index): Q.format(index), K.format(index): Q.format(index)}
        groups[DOWN.format(index)] = DOWN.format(index)
        layers.append(LayerHessians(hessians, groups, dict.fromkeys(hessians, 30)))
    return layers


def _streamed(writer, keep_factors: bool) -> TaskStatistics:
    statistics = TaskStatistics.empty("model.layers")
    for layer in _layers():
        statistics.add_layer(layer, 0.01, keep_factors, keep_hessians=True, store_matrix=writer.add)
    return statistics


def _in_memory(keep_factors: bool) -> TaskStatistics:
    statistics = TaskStatistics.empty("model.layers")
    for layer in _layers():
        statistics.add_layer(layer, 0.01, keep_factors, keep_hessians=True)
    return statistics


def test_streamed_entry_equals_one_written_from_memory(tmp_path):
    streamed_path, memory_path = tmp_path / "streamed.safetensors", tmp_path / "memory.safetensors"
    with cache.EntryWriter(streamed_path, PAYLOAD) as writer:
        streamed = _streamed(writer, keep_factors=True)
        # Each matrix left memory as soon as its group was done.
        assert all(
            s.hessian is None and s.cholesky_factor is None for s in streamed.statistics.values()
        )
        writer.commit(streamed)
    cache.save_statistics(memory_path, _in_memory(keep_factors=True), PAYLOAD)
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
    with cache.EntryWriter(path, PAYLOAD) as writer:
        writer.commit(_streamed(writer, keep_factors))
    lazy, eager = cache.read_statistics(path, PAYLOAD), _in_memory(keep_factors)
    for name in eager.groups:
        ours, theirs = lazy.for_weight(name), eager.for_weight(name)
        for field, value in vars(theirs).items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(getattr(ours, field), value), (name, field)
            else:
                assert getattr(ours, field) == value, (name, field)
        assert (ours.cholesky_factor is None) == (not keep_factors)


def test_only_the_most_recent_groups_are_kept_in_memory(tmp_path, monkeypatch):
    path = tmp_path / "entry.safetensors"
    cache.save_statistics(path, _in_memory(keep_factors=True), PAYLOAD)
    loaded = cache.read_statistics(path, PAYLOAD)
    assert all(s.hessian is None and s.cholesky_factor is None for s in loaded.statistics.values())
    reads = []
    original = cache.CachedMatrices._load

    def counting(self, group):
        reads.append(group)
        return original(self, group)

    monkeypatch.setattr(cache.CachedMatrices, "_load", counting)
    monkeypatch.setattr(cache, "RECENT_GROUPS", 2)
    query = loaded.for_weight(Q.format(0))
    assert loaded.for_weight(K.format(0)).hessian is query.hessian  # q and k share a group
    released = [weakref.ref(query.hessian), weakref.ref(query.cholesky_factor)]
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
    cache.save_statistics(path, _in_memory(keep_factors=False), PAYLOAD)
    loaded = cache.read_statistics(path, PAYLOAD)
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
    elsewhere = LlamaConfig(hidden_size=32, rms_norm_eps=1e-6, name_or_path="/other/spelling")
    assert cache.config_fingerprint(one) == cache.config_fingerprint(elsewhere)


# --- resume checkpoints: what an interrupted pre-pass leaves, and how a rerun uses it ---


def _activations(block: int) -> torch.Tensor:
    return torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(100 + block))


def _add_block(writer: cache.EntryWriter, statistics: TaskStatistics, block: int) -> None:
    statistics.add_layer(_layers()[block], 0.01, True, keep_hessians=True, store_matrix=writer.add)


def _interrupted_after_block_0(path, payload=PAYLOAD) -> TaskStatistics:
    """A resumable pre-pass stopped by Ctrl-C halfway through block 1's matrices."""
    with pytest.raises(KeyboardInterrupt):
        with cache.EntryWriter(path, payload, resumable=True) as writer:
            statistics = TaskStatistics.empty("model.layers")
            _add_block(writer, statistics, 0)
            writer.save_checkpoint(1, statistics, _activations(0))
            writer.add("model.layers.1.self_attn.q_proj.weight::hessian", torch.ones(4, 4))
            raise KeyboardInterrupt
    return statistics


def test_a_resumed_writer_continues_after_the_checkpointed_block(tmp_path, caplog):
    path = tmp_path / "entry.safetensors"
    with caplog.at_level(logging.WARNING):
        _interrupted_after_block_0(path)
    checkpoint = cache.checkpoint_dir(path)
    assert f"checkpoint {checkpoint} keeps the statistics of blocks 0-0: run" in caplog.text
    with cache.EntryWriter(path, PAYLOAD, resumable=True) as writer:
        resumed = writer.take_resume_point()
        assert writer.take_resume_point() is None  # handed over once
        assert resumed.next_block == 1
        assert torch.equal(resumed.activations, _activations(0))
        assert sorted(resumed.statistics.groups) == sorted(_layers()[0].groups)
        _add_block(writer, resumed.statistics, 1)
        writer.commit(resumed.statistics)
    reference = tmp_path / "reference.safetensors"
    cache.save_statistics(reference, _in_memory(keep_factors=True), PAYLOAD)
    resumed_tensors, reference_tensors = load_file(path), load_file(reference)
    assert resumed_tensors.keys() == reference_tensors.keys()
    assert all(torch.equal(resumed_tensors[k], v) for k, v in reference_tensors.items())
    with safe_open(path, "pt") as one, safe_open(reference, "pt") as other:
        assert one.metadata() == other.metadata()
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name, reference.name]


def test_a_checkpoint_can_be_resumed_twice(tmp_path):
    path = tmp_path / "entry.safetensors"
    _interrupted_after_block_0(path)
    with pytest.raises(RuntimeError, match="out of memory"):
        with cache.EntryWriter(path, PAYLOAD, resumable=True) as writer:
            statistics = writer.take_resume_point().statistics
            _add_block(writer, statistics, 1)
            writer.save_checkpoint(2, statistics, _activations(1))
            raise RuntimeError("out of memory")  # not the inputs' fault: the checkpoint stays
    with cache.EntryWriter(path, PAYLOAD, resumable=True) as writer:
        resumed = writer.take_resume_point()
        assert resumed.next_block == 2 and torch.equal(resumed.activations, _activations(1))
        writer.commit(resumed.statistics)
    loaded, eager = cache.read_statistics(path, PAYLOAD), _in_memory(keep_factors=True)
    for name in eager.groups:
        assert torch.equal(loaded.for_weight(name).hessian, eager.for_weight(name).hessian)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def _damage_checkpoint(checkpoint, damage: str) -> str:
    """Damage the checkpoint of ``_interrupted_after_block_0``; return the reason expected."""
    state = checkpoint / "state.safetensors"
    if damage == "other inputs":
        tensors = load_file(state)
        with safe_open(state, "pt") as handle:
            metadata = handle.metadata()
        other = json.dumps({**PAYLOAD, "tokens": "zzz"}, sort_keys=True, separators=(",", ":"))
        save_file(tensors, state, {**metadata, "key": other})
        return "it was written for different inputs"
    if damage == "truncated":
        state.write_bytes(state.read_bytes()[:-10])
        return "Error while deserializing header"
    if damage == "garbage":
        state.write_bytes(b"not a safetensors file at all")
        return "Error while deserializing header"
    if damage == "other version":
        tensors = load_file(state)
        with safe_open(state, "pt") as handle:
            metadata = handle.metadata()
        save_file(tensors, state, {**metadata, "checkpoint": "0"})
        return f"it is not a version {cache.CHECKPOINT_VERSION} pre-pass checkpoint"
    if damage == "no activations":
        tensors = load_file(state)
        with safe_open(state, "pt") as handle:
            metadata = handle.metadata()
        del tensors["activations"]
        save_file(tensors, state, metadata)
        return "it holds no activations"
    (checkpoint / "matrices").write_bytes(b"short")
    return "its matrices file holds 5 of "


@pytest.mark.parametrize(
    "damage",
    ["other inputs", "truncated", "garbage", "other version", "no activations", "short matrices"],
)
def test_a_checkpoint_that_does_not_fit_is_discarded_with_a_message(tmp_path, caplog, damage):
    path = tmp_path / "entry.safetensors"
    _interrupted_after_block_0(path)
    checkpoint = cache.checkpoint_dir(path)
    reason = _damage_checkpoint(checkpoint, damage)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        with cache.EntryWriter(path, PAYLOAD, resumable=True) as writer:
            assert writer.take_resume_point() is None
            assert (checkpoint / "matrices").stat().st_size == 0
            assert not (checkpoint / "state.safetensors").exists()
            statistics = TaskStatistics.empty("model.layers")
            for block in range(2):
                _add_block(writer, statistics, block)
            writer.commit(statistics)
    (message,) = [r.getMessage() for r in caplog.records]
    assert message.startswith(f"Discarding pre-pass checkpoint {checkpoint}: ")
    assert reason in message and message.endswith("; starting from the first block.")
    assert "\n" not in message
    assert torch.equal(
        load_file(path)[f"{DOWN.format(1)}::hessian"],
        _in_memory(True).statistics[DOWN.format(1)].hessian,
    )
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


@pytest.mark.parametrize(
    ("error", "kept"),
    [(KeyboardInterrupt, True), (RuntimeError, True), (OSError, True), (ValueError, False)],
)
def test_a_failed_prepass_keeps_its_checkpoint_unless_the_inputs_are_at_fault(
    tmp_path, error, kept
):
    path = tmp_path / "entry.safetensors"
    with pytest.raises(error):
        with cache.EntryWriter(path, PAYLOAD, resumable=True) as writer:
            statistics = TaskStatistics.empty("model.layers")
            _add_block(writer, statistics, 0)
            writer.save_checkpoint(1, statistics, _activations(0))
            raise error("stopped")
    assert cache.checkpoint_dir(path).exists() == kept
    assert not path.exists()


def test_a_prepass_stopped_before_its_first_checkpoint_leaves_nothing(tmp_path):
    path = tmp_path / "entry.safetensors"
    with pytest.raises(KeyboardInterrupt):
        with cache.EntryWriter(path, PAYLOAD, resumable=True) as writer:
            _add_block(writer, TaskStatistics.empty("model.layers"), 0)
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_a_failed_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "entry.safetensors"
    _interrupted_after_block_0(path)
    state = cache.checkpoint_dir(path) / "state.safetensors"
    before = state.read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with pytest.raises(cache.CacheWriteError, match="No space left on device"):
        with cache.EntryWriter(path, PAYLOAD, resumable=True) as writer:
            statistics = writer.take_resume_point().statistics
            _add_block(writer, statistics, 1)
            monkeypatch.setattr(cache, "_write_tensors", disk_full)
            writer.save_checkpoint(2, statistics, _activations(1))
    assert state.read_bytes() == before
    assert sorted(p.name for p in state.parent.iterdir()) == ["matrices", "state.safetensors"]


def test_a_failed_commit_keeps_the_checkpoint_and_no_partial_entry(tmp_path, monkeypatch):
    path = tmp_path / "entry.safetensors"
    _interrupted_after_block_0(path)
    copy = cache.shutil.copyfileobj

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with pytest.raises(cache.CacheWriteError, match="No space left on device"):
        with cache.EntryWriter(path, PAYLOAD, resumable=True) as writer:
            statistics = writer.take_resume_point().statistics
            _add_block(writer, statistics, 1)
            writer.save_checkpoint(2, statistics, _activations(1))
            monkeypatch.setattr(cache.shutil, "copyfileobj", disk_full)
            writer.commit(statistics)
    assert not path.exists()
    checkpoint = cache.checkpoint_dir(path)
    assert sorted(p.name for p in checkpoint.iterdir()) == ["matrices", "state.safetensors"]
    monkeypatch.setattr(cache.shutil, "copyfileobj", copy)  # space freed: the rerun commits
    with cache.EntryWriter(path, PAYLOAD, resumable=True) as writer:
        writer.commit(writer.take_resume_point().statistics)
    assert torch.equal(
        load_file(path)[f"{DOWN.format(1)}::hessian"],
        _in_memory(True).statistics[DOWN.format(1)].hessian,
    )
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_checkpoints_are_written_when_their_cost_is_a_small_share(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(cache.time, "monotonic", lambda: clock[0])
    schedule = cache.CheckpointSchedule(0.1)
    assert schedule.due()  # the first: its cost is not known yet
    schedule.written(2.0)  # 2 s for the write: the next only after 18 s more (2 / 20 = 0.1)
    clock[0] += 17.9
    assert not schedule.due()
    clock[0] += 0.1
    assert schedule.due()
    every, never = cache.CheckpointSchedule(1.0), cache.CheckpointSchedule(0.0)
    every.written(5.0)
    assert every.due() and not never.due()


@pytest.mark.parametrize("value", ["abc", "2", "-0.1", "nan"])
def test_checkpoint_overhead_must_be_a_share(monkeypatch, value):
    monkeypatch.setenv(cache.CHECKPOINT_OVERHEAD_VARIABLE, value)
    with pytest.raises(ValueError, match=f"{cache.CHECKPOINT_OVERHEAD_VARIABLE}='{value}' must"):
        cache.checkpoint_overhead()


def test_checkpoint_overhead_default_and_setting(monkeypatch):
    monkeypatch.delenv(cache.CHECKPOINT_OVERHEAD_VARIABLE, raising=False)
    assert cache.checkpoint_overhead() == cache.DEFAULT_CHECKPOINT_OVERHEAD
    monkeypatch.setenv(cache.CHECKPOINT_OVERHEAD_VARIABLE, "0.5")
    assert cache.checkpoint_overhead() == 0.5


# --- the entry lock ---


def test_a_second_holder_waits_is_told_and_gets_the_lock_once_released(tmp_path):
    path = tmp_path / "entry.safetensors"
    told, acquired = threading.Event(), threading.Event()
    waiting_on = []

    def second() -> None:
        def on_wait(lock):
            waiting_on.append(lock)
            told.set()

        with cache.entry_lock(path, on_wait):
            acquired.set()

    with cache.entry_lock(path, lambda lock: pytest.fail("nobody held it")):
        assert cache.lock_path(path).exists()
        thread = threading.Thread(target=second)
        thread.start()
        assert told.wait(60)
        assert not acquired.is_set()
    thread.join(60)
    assert acquired.is_set() and waiting_on == [cache.lock_path(path)]
    assert list(tmp_path.iterdir()) == []  # the lock file goes with the last holder


def test_a_waiter_on_a_removed_lock_file_locks_the_file_there_now(tmp_path, monkeypatch):
    """Holders remove the lock file on release; a process that was waiting on the removed file
    must not hold the lock alongside one that locked the new file in between."""
    path = tmp_path / "entry.safetensors"
    lock = cache.lock_path(path)
    checks: queue.Queue[bool] = queue.Queue()
    is_at = cache._is_at

    def reporting_is_at(handle: int, where) -> bool:
        result = is_at(handle, where)
        checks.put(result)
        return result

    monkeypatch.setattr(cache, "_is_at", reporting_is_at)
    first = os.open(lock, os.O_RDWR | os.O_CREAT)  # a holder about to release
    fcntl.flock(first, fcntl.LOCK_EX)
    told, acquired = threading.Event(), threading.Event()

    def waiter() -> None:
        with cache.entry_lock(path, lambda _: told.set()):
            acquired.set()

    thread = threading.Thread(target=waiter)
    thread.start()
    assert told.wait(60)  # the waiter has the first file open
    lock.unlink()  # the first holder's release: the file goes, then its lock
    with cache.entry_lock(path):  # a third process locks the new file in between
        assert checks.get(timeout=60) is True
        os.close(first)
        assert checks.get(timeout=60) is False  # the waiter's flock returned, on the old file
        assert not acquired.is_set()
    thread.join(60)
    assert acquired.is_set()
    assert list(tmp_path.iterdir()) == []


def test_a_cache_that_cannot_be_locked_is_still_read(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with cache.entry_lock(blocker / "entry.safetensors"):
        pass  # nothing to lock in: reading goes on unlocked, and writing fails with its message


# --- entries of another program or another format version ---


@pytest.mark.parametrize("kind", ["no metadata", "foreign", "old version", "newer version"])
def test_an_entry_that_is_not_this_versions_is_rejected_saying_why(tmp_path, caplog, kind):
    path = cache.cache_path(tmp_path, PAYLOAD)
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
        version = cache.FORMAT_VERSION + (-1 if kind == "old version" else 1)
        cache.save_statistics(path, _statistics(), PAYLOAD)
        tensors = load_file(path)
        with safe_open(path, "pt") as handle:
            metadata = handle.metadata()
        save_file(tensors, path, {**metadata, "format": str(version)})
        reason = (
            f"it has cache format version {version}; this version of mergekit_sparsegpt "
            f"reads version {cache.FORMAT_VERSION} only"
        )
    with caplog.at_level(logging.WARNING):
        assert cache.load_statistics(path, PAYLOAD) is None
    assert [r.getMessage() for r in caplog.records] == [
        f"Ignoring statistics cache {path}: {reason}; recomputing."
    ]
