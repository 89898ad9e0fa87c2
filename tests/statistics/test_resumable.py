import json
import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from statistics_helpers import (
    PAYLOAD,
    in_memory_statistics,
    sample_layers,
    sample_statistics,
    save_statistics,
    streamed_statistics,
)

from mergekit_sparsegpt.statistics import cache_dir, entries, resumable
from mergekit_sparsegpt.statistics import keys as cache_keys
from mergekit_sparsegpt.statistics.task_statistics import TaskStatistics


def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(resumable.shutil, "copyfileobj", explode)  # after the header is written
    path = tmp_path / "entry.safetensors"
    with pytest.raises(OSError):
        save_statistics(path, sample_statistics(), PAYLOAD)
    assert list(tmp_path.iterdir()) == []


def test_failed_prepass_leaves_nothing_behind(tmp_path):
    path = tmp_path / "entry.safetensors"
    with pytest.raises(RuntimeError, match="forward pass failed"):
        with resumable.EntryWriter(path, PAYLOAD) as writer:
            streamed_statistics(writer, keep_factors=True)
            raise RuntimeError("forward pass failed")
    assert list(tmp_path.iterdir()) == []


# --- whole matrices: written group by group, read back per group when asked ---

Q, K, DOWN = (
    "model.layers.{}.self_attn.q_proj.weight",
    "model.layers.{}.self_attn.k_proj.weight",
    "model.layers.{}.mlp.down_proj.weight",
)


def _activations(block: int) -> torch.Tensor:
    return torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(100 + block))


def _add_block(writer: resumable.EntryWriter, statistics: TaskStatistics, block: int) -> None:
    statistics.add_layer(
        sample_layers()[block], 0.01, True, keep_hessians=True, store_matrix=writer.add
    )


def _interrupted_after_block_0(path, payload=PAYLOAD) -> TaskStatistics:
    """A resumable pre-pass stopped by Ctrl-C halfway through block 1's matrices."""
    with pytest.raises(KeyboardInterrupt):
        with resumable.EntryWriter(path, payload, resumable=True) as writer:
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
    checkpoint = cache_keys.checkpoint_dir(path)
    assert f"checkpoint {checkpoint} keeps the statistics of blocks 0-0: run" in caplog.text
    with resumable.EntryWriter(path, PAYLOAD, resumable=True) as writer:
        resumed = writer.take_resume_point()
        assert writer.take_resume_point() is None  # handed over once
        assert resumed.next_block == 1
        assert torch.equal(resumed.activations, _activations(0))
        assert sorted(resumed.statistics.groups) == sorted(sample_layers()[0].groups)
        _add_block(writer, resumed.statistics, 1)
        writer.commit(resumed.statistics)
    reference = tmp_path / "reference.safetensors"
    save_statistics(reference, in_memory_statistics(keep_factors=True), PAYLOAD)
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
        with resumable.EntryWriter(path, PAYLOAD, resumable=True) as writer:
            statistics = writer.take_resume_point().statistics
            _add_block(writer, statistics, 1)
            writer.save_checkpoint(2, statistics, _activations(1))
            raise RuntimeError("out of memory")  # not the inputs' fault: the checkpoint stays
    with resumable.EntryWriter(path, PAYLOAD, resumable=True) as writer:
        resumed = writer.take_resume_point()
        assert resumed.next_block == 2 and torch.equal(resumed.activations, _activations(1))
        writer.commit(resumed.statistics)
    loaded, eager = entries.read_statistics(path, PAYLOAD), in_memory_statistics(keep_factors=True)
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
        return f"it is not a version {resumable.CHECKPOINT_VERSION} pre-pass checkpoint"
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
    checkpoint = cache_keys.checkpoint_dir(path)
    reason = _damage_checkpoint(checkpoint, damage)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        with resumable.EntryWriter(path, PAYLOAD, resumable=True) as writer:
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
        in_memory_statistics(True).statistics[DOWN.format(1)].hessian,
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
        with resumable.EntryWriter(path, PAYLOAD, resumable=True) as writer:
            statistics = TaskStatistics.empty("model.layers")
            _add_block(writer, statistics, 0)
            writer.save_checkpoint(1, statistics, _activations(0))
            raise error("stopped")
    assert cache_keys.checkpoint_dir(path).exists() == kept
    assert not path.exists()


def test_a_prepass_stopped_before_its_first_checkpoint_leaves_nothing(tmp_path):
    path = tmp_path / "entry.safetensors"
    with pytest.raises(KeyboardInterrupt):
        with resumable.EntryWriter(path, PAYLOAD, resumable=True) as writer:
            _add_block(writer, TaskStatistics.empty("model.layers"), 0)
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_a_failed_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "entry.safetensors"
    _interrupted_after_block_0(path)
    state = cache_keys.checkpoint_dir(path) / "state.safetensors"
    before = state.read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with pytest.raises(cache_dir.CacheWriteError, match="No space left on device"):
        with resumable.EntryWriter(path, PAYLOAD, resumable=True) as writer:
            statistics = writer.take_resume_point().statistics
            _add_block(writer, statistics, 1)
            monkeypatch.setattr(resumable, "write_tensors", disk_full)
            writer.save_checkpoint(2, statistics, _activations(1))
    assert state.read_bytes() == before
    assert sorted(p.name for p in state.parent.iterdir()) == ["matrices", "state.safetensors"]


def test_a_failed_commit_keeps_the_checkpoint_and_no_partial_entry(tmp_path, monkeypatch):
    path = tmp_path / "entry.safetensors"
    _interrupted_after_block_0(path)
    copy = resumable.shutil.copyfileobj

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with pytest.raises(cache_dir.CacheWriteError, match="No space left on device"):
        with resumable.EntryWriter(path, PAYLOAD, resumable=True) as writer:
            statistics = writer.take_resume_point().statistics
            _add_block(writer, statistics, 1)
            writer.save_checkpoint(2, statistics, _activations(1))
            monkeypatch.setattr(resumable.shutil, "copyfileobj", disk_full)
            writer.commit(statistics)
    assert not path.exists()
    checkpoint = cache_keys.checkpoint_dir(path)
    assert sorted(p.name for p in checkpoint.iterdir()) == ["matrices", "state.safetensors"]
    monkeypatch.setattr(resumable.shutil, "copyfileobj", copy)  # space freed: the rerun commits
    with resumable.EntryWriter(path, PAYLOAD, resumable=True) as writer:
        writer.commit(writer.take_resume_point().statistics)
    assert torch.equal(
        load_file(path)[f"{DOWN.format(1)}::hessian"],
        in_memory_statistics(True).statistics[DOWN.format(1)].hessian,
    )
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_checkpoints_are_written_when_their_cost_is_a_small_share(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(resumable.time, "monotonic", lambda: clock[0])
    schedule = resumable.CheckpointSchedule(0.1)
    assert schedule.due()  # the first: its cost is not known yet
    schedule.written(2.0)  # 2 s for the write: the next only after 18 s more (2 / 20 = 0.1)
    clock[0] += 17.9
    assert not schedule.due()
    clock[0] += 0.1
    assert schedule.due()
    every, never = resumable.CheckpointSchedule(1.0), resumable.CheckpointSchedule(0.0)
    every.written(5.0)
    assert every.due() and not never.due()


@pytest.mark.parametrize("value", ["abc", "2", "-0.1", "nan"])
def test_checkpoint_overhead_must_be_a_share(monkeypatch, value):
    monkeypatch.setenv(resumable.CHECKPOINT_OVERHEAD_VARIABLE, value)
    with pytest.raises(
        ValueError, match=f"{resumable.CHECKPOINT_OVERHEAD_VARIABLE}='{value}' must"
    ):
        resumable.checkpoint_overhead()


def test_checkpoint_overhead_default_and_setting(monkeypatch):
    monkeypatch.delenv(resumable.CHECKPOINT_OVERHEAD_VARIABLE, raising=False)
    assert resumable.checkpoint_overhead() == resumable.DEFAULT_CHECKPOINT_OVERHEAD
    monkeypatch.setenv(resumable.CHECKPOINT_OVERHEAD_VARIABLE, "0.5")
    assert resumable.checkpoint_overhead() == 0.5


# --- the entry lock ---
