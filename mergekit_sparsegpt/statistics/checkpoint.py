"""A pre-pass checkpoint's state file: what the finished blocks left, and when to write one.

The state file holds what the entry has of the finished blocks (a task's statistics, or the
report records of a merge's solved linears), the next block's input activations (one tensor per
task for the passes that run several tasks together) and the list of the whole matrices already
streamed to the checkpoint's matrices file.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from mergekit_sparsegpt.statistics.entries import DTYPE_BY_NAME, check_identity
from mergekit_sparsegpt.statistics.keys import canonical
from mergekit_sparsegpt.statistics.merged_linears import KIND, MergedLinears
from mergekit_sparsegpt.statistics.task_statistics import TaskStatistics

# The resume checkpoint of an entry: a directory holding the state file (statistics of the
# finished blocks and the next block's input) and the matrices file the entry's whole matrices
# are streamed to. Its own layout version: the statistics it holds follow FORMAT_VERSION.
CHECKPOINT_VERSION = 1
_ACTIVATIONS = "activations"  # the state file's tensor of the next block's input
# The largest share of the pre-pass's time spent writing checkpoints (see CheckpointSchedule).
CHECKPOINT_OVERHEAD_VARIABLE = "MERGEKIT_SPARSEGPT_CHECKPOINT_OVERHEAD"
DEFAULT_CHECKPOINT_OVERHEAD = 0.1


# One task's block input, or every task's (in the order the pass gives them) for the passes
# that run several tasks together.
Activations = torch.Tensor | list[torch.Tensor]


@dataclass
class ResumePoint:
    """Where an interrupted pre-pass stopped: what the entry holds of the blocks before
    ``next_block`` (a task's statistics, or the merge's solved linears) and that block's input
    activations ([samples, seq_len, hidden] per task)."""

    next_block: int
    statistics: TaskStatistics | MergedLinears
    activations: Activations


def checkpoint_overhead() -> float:
    """The configured largest share of pre-pass time spent writing checkpoints."""
    text = os.environ.get(CHECKPOINT_OVERHEAD_VARIABLE)
    if text is None:
        return DEFAULT_CHECKPOINT_OVERHEAD
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= 1:
        raise ValueError(
            f"{CHECKPOINT_OVERHEAD_VARIABLE}={text!r} must be a number from 0 (never write a "
            "resume checkpoint) to 1 (after every block): the largest share of the pre-pass's "
            "time spent writing them"
        )
    return value


class CheckpointSchedule:
    """Which finished blocks to checkpoint.

    A checkpoint rewrites the next block's input activations (1 GiB per block for a 7B model at
    the default 128 x 512 windows), which on a GPU can take as long as the block. So one is
    written only once the time since the previous one is long enough that the previous write's
    duration is at most ``overhead`` of the two together; the first block is always written
    (its cost is not known before). On a CPU, where a block takes minutes, that is every block.
    """

    def __init__(self, overhead: float) -> None:
        self.overhead = overhead
        self._since = time.monotonic()
        self._cost: float | None = None  # seconds the last write took

    def due(self) -> bool:
        if self.overhead <= 0:
            return False
        if self._cost is None:
            return True
        elapsed = time.monotonic() - self._since
        return self._cost * (1 - self.overhead) <= self.overhead * elapsed

    def written(self, cost: float) -> None:
        self._cost = cost
        self._since = time.monotonic()


def read_checkpoint(
    state: Path, payload: dict[str, Any]
) -> tuple[ResumePoint, dict[str, torch.Tensor]]:
    """A checkpoint's resume point and its streamed matrices (name -> empty tensor of their
    dtype and shape, in file order). Raises one of ``READ_ERRORS`` when it cannot be used."""
    with safe_open(state, framework="pt") as handle:
        metadata = handle.metadata() or {}
        check_identity(metadata, canonical(payload))
        if metadata.get("checkpoint") != str(CHECKPOINT_VERSION):
            raise ValueError(f"it is not a version {CHECKPOINT_VERSION} pre-pass checkpoint")
        names = list(handle.keys())
        stored = [name for name in names if name.split(".")[0] == _ACTIVATIONS]
        if not stored:
            raise ValueError("it holds no activations")
        vectors = {name: handle.get_tensor(name) for name in names if name not in stored}
        activations = _activations_from({name: handle.get_tensor(name) for name in stored})
    try:
        next_block = int(metadata["next_block"])
        if next_block < 1:
            raise ValueError(f"next_block {next_block}")
        added = {
            name: torch.empty(shape, dtype=DTYPE_BY_NAME[dtype], device="meta")
            for name, dtype, shape in json.loads(metadata["matrices"])
        }
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"its metadata is incomplete ({error!r})") from None
    expected = payload.get("token_shape")
    for tensor in activations if isinstance(activations, list) else [activations]:
        if tensor.dim() != 3 or (expected and list(tensor.shape[:2]) != list(expected)):
            raise ValueError(f"its activations have shape {list(tensor.shape)}")
    statistics: TaskStatistics | MergedLinears = (
        MergedLinears.from_metadata(metadata)
        if metadata.get("kind") == KIND
        else TaskStatistics.from_tensors(vectors, metadata)
    )
    return ResumePoint(next_block, statistics, activations), added


def named_activations(activations: Activations) -> dict[str, torch.Tensor]:
    if isinstance(activations, torch.Tensor):
        return {_ACTIVATIONS: activations}
    return {f"{_ACTIVATIONS}.{index}": tensor for index, tensor in enumerate(activations)}


def _activations_from(stored: dict[str, torch.Tensor]) -> Activations:
    if list(stored) == [_ACTIVATIONS]:
        return stored[_ACTIVATIONS]
    try:
        order = sorted(stored, key=lambda name: int(name.split(".", 1)[1]))
    except (IndexError, ValueError):
        raise ValueError(f"its activations are named {sorted(stored)}") from None
    if [int(name.split(".", 1)[1]) for name in order] != list(range(len(order))):
        raise ValueError(f"its activations are named {sorted(stored)}")
    return [stored[name] for name in order]
