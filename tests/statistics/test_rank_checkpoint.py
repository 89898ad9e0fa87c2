"""Checkpoints seen from every process, here one (torchrun: tests/capture/test_distributed.py)."""

import logging

import torch
from safetensors.torch import load_file
from statistics_helpers import PAYLOAD, sample_layers

from mergekit_sparsegpt.capture.distributed import SINGLE_PROCESS
from mergekit_sparsegpt.statistics import keys as cache_keys
from mergekit_sparsegpt.statistics import resumable
from mergekit_sparsegpt.statistics.rank_checkpoint import CheckpointSet, RankCheckpoint
from mergekit_sparsegpt.statistics.task_statistics import TaskStatistics


def _activations(block: int) -> torch.Tensor:
    return torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(100 + block))


def _payload(task: str) -> dict:
    return {**PAYLOAD, "task": task}


def _finish_blocks(
    writer: resumable.EntryWriter, checkpoint: RankCheckpoint, statistics: TaskStatistics, blocks
) -> None:
    for block in blocks:
        statistics.add_layer(
            sample_layers()[block], 0.01, False, keep_hessians=True, store_matrix=writer.add
        )
        checkpoint.block_finished(block, _activations(block), statistics)


def test_a_writer_that_cannot_resume_is_never_checkpointed(tmp_path):
    with resumable.EntryWriter(tmp_path / "e.safetensors", PAYLOAD) as writer:
        checkpoint = RankCheckpoint(writer)
        assert not checkpoint.resumable and not checkpoint.due()
        assert checkpoint.resume_point() is None
    assert RankCheckpoint(None).resumable is False  # a rank other than the main one, alone


def test_block_finished_checkpoints_when_due_and_resumes_there(tmp_path, monkeypatch):
    monkeypatch.setenv(resumable.CHECKPOINT_OVERHEAD_VARIABLE, "1")  # after every block
    path = tmp_path / "e.safetensors"
    writer = resumable.EntryWriter(path, PAYLOAD, resumable=True)
    checkpoint = RankCheckpoint(writer)
    _finish_blocks(writer, checkpoint, TaskStatistics.empty("model.layers"), [0])
    writer._side.close()  # the run dies here
    with resumable.EntryWriter(path, PAYLOAD, resumable=True) as again:
        point = RankCheckpoint(again).resume_point()
        assert point.next_block == 1 and torch.equal(point.activations, _activations(0))
        assert sorted(point.statistics.groups) == sorted(sample_layers()[0].groups)


def _two_tasks_stopped_at(tmp_path, monkeypatch, blocks: dict[str, list[int]]):
    """Two entries of one pass, each with blocks ``blocks[task]`` checkpointed, then killed."""
    monkeypatch.setenv(resumable.CHECKPOINT_OVERHEAD_VARIABLE, "1")
    paths = {task: tmp_path / f"{task}.safetensors" for task in blocks}
    for task, done in blocks.items():
        writer = resumable.EntryWriter(paths[task], _payload(task), resumable=True)
        _finish_blocks(writer, RankCheckpoint(writer), TaskStatistics.empty("model.layers"), done)
        writer._side.close()
    return paths


def test_a_set_resumes_only_where_every_entry_stopped_at_the_same_block(tmp_path, monkeypatch):
    paths = _two_tasks_stopped_at(tmp_path, monkeypatch, {"a": [0], "b": [0]})
    writers = {t: resumable.EntryWriter(p, _payload(t), resumable=True) for t, p in paths.items()}
    resumed = CheckpointSet(writers, SINGLE_PROCESS).resume_point()
    assert resumed is not None and resumed[0] == 1
    assert all(torch.equal(point.activations, _activations(0)) for point in resumed[1].values())
    for writer in writers.values():
        writer.__exit__(None, None, None)


def test_a_set_stopped_at_different_blocks_starts_over_saying_why(tmp_path, monkeypatch, caplog):
    paths = _two_tasks_stopped_at(tmp_path, monkeypatch, {"a": [0, 1], "b": [0]})
    writers = {t: resumable.EntryWriter(p, _payload(t), resumable=True) for t, p in paths.items()}
    checkpoints = CheckpointSet(writers, SINGLE_PROCESS)
    with caplog.at_level(logging.WARNING):
        assert checkpoints.resume_point() is None
    assert (
        caplog.text.count("stop at blocks") == 2 and "starting from the first block" in caplog.text
    )
    for task, writer in writers.items():
        checkpoint = cache_keys.checkpoint_dir(paths[task])
        assert not (checkpoint / "state.safetensors").exists()
        assert (checkpoint / "matrices").stat().st_size == 0
        # The rerun from block 0 writes an entry equal to an uninterrupted run's.
        statistics = TaskStatistics.empty("model.layers")
        _finish_blocks(writer, checkpoints.members[task], statistics, [0, 1])
        writer.commit(statistics)
        writer.__exit__(None, None, None)
    reference = tmp_path / "reference" / "a.safetensors"
    with resumable.EntryWriter(reference, _payload("a")) as writer:
        statistics = TaskStatistics.empty("model.layers")
        _finish_blocks(writer, RankCheckpoint(writer), statistics, [0, 1])
        writer.commit(statistics)
    ours, expected = load_file(paths["a"]), load_file(reference)
    assert ours.keys() == expected.keys()
    assert all(torch.equal(ours[key], value) for key, value in expected.items())
