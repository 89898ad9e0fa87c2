"""Every task's Hessians, block by block in lockstep: the pass that solves RegMean as it goes.

RegMean's merged linear needs every task's Hessian of that linear at once, and nothing else:
running the tasks one after another would hold every task's Hessians of the whole model (a
task's Grams are 33 GB for an 8B model). Here each forward model (the base, or each fine-tuned
model) has its own block runner over its own tasks' windows; per block index, each model's block
is materialised in turn, runs its tasks and is released, and the consumer then has every task's
Hessians of that block, and of no other.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass

import torch

from mergekit_sparsegpt.capture.accumulate import LayerHessians
from mergekit_sparsegpt.capture.blocks import _Block, _BlockRunner
from mergekit_sparsegpt.capture.distributed import SINGLE_PROCESS, Ranks, all_reduced, together
from mergekit_sparsegpt.capture.head import capture_head_hessians
from mergekit_sparsegpt.capture.hooks import HessianHooks, error_source
from mergekit_sparsegpt.capture.model import TensorSource


@dataclass(frozen=True)
class ForwardModel:
    """A model the calibration text runs through, and the tasks that run through it."""

    skeleton: torch.nn.Module  # on the meta device: ``capture.model.empty_model``
    load_tensor: TensorSource
    windows: Mapping[Hashable, torch.Tensor]  # task -> [samples, seq_len] token ids


def capture_lockstep_hessians(
    models: list[ForwardModel],
    block_done: Callable[[int, dict[Hashable, LayerHessians]], None],
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    description: str = "layers",
    progress: bool = True,
    resume: tuple[int, Mapping[Hashable, torch.Tensor]] | None = None,
    block_finished: Callable[[int, dict[Hashable, torch.Tensor]], None] | None = None,
    held: Callable[[int], None] | None = None,
    ranks: Ranks = SINGLE_PROCESS,
) -> None:
    """Call ``block_done(index, hessians)`` for each decoder block, first block first, with
    every task's Hessians of that block (task -> its linears' Hessians); then once more, with
    index = the depth, with every task's Hessian of the output head (``capture.head``).

    At most one block is materialised at a time; each task's block outputs become its inputs of
    the next block. ``block_finished(index, outputs)`` follows each ``block_done`` with every
    task's outputs of the block (its inputs of the next), for a resume checkpoint; ``resume =
    (k, inputs)`` starts at block ``k`` with every task's saved inputs (the embedding pass still
    runs: it records each block's other arguments). ``held(bytes)`` is told the host memory
    every task's activations take, once they exist.

    With several ``ranks`` each holds its share of every task's windows, and each task's
    Hessians are all-reduced: every rank's ``block_done`` receives the same Hessians.
    """
    with together(ranks):
        runners = [
            _BlockRunner(model.skeleton, model.load_tensor, model.windows, device, batch_size)
            for model in models
        ]
    depths = {len(runner.layers) for runner in runners}
    if len(depths) != 1:
        raise ValueError(f"the forward models have different depths {sorted(depths)}")
    if held is not None:
        held(sum(runner.activation_bytes for runner in runners))
    first = 0
    if resume is not None:
        first = resume[0]
        for runner in runners:
            runner.resume(resume[1])
    blocks = [
        runner.blocks(description, progress and index == 0, first)
        for index, runner in enumerate(runners)
    ]
    depth = depths.pop()
    for index in range(first, depth):
        block_done(index, _block_hessians(runners, blocks, device, ranks))
        if block_finished is not None:
            block_finished(index, {t: h for r in runners for t, h in r.hidden.items()})
    for model_blocks in blocks:
        next(model_blocks, None)  # each runner's last release
    heads: dict[Hashable, LayerHessians] = {}
    for runner in runners:
        with together(ranks):
            found = capture_head_hessians(
                runner, list(runner.hidden), error_source(runner.load_tensor)
            )
        heads.update({task: all_reduced(layer, ranks) for task, layer in found.items()})
    if heads:
        block_done(depth, heads)


def _block_hessians(
    runners: list[_BlockRunner],
    blocks: list[Iterator[_Block]],
    device: torch.device | str,
    ranks: Ranks,
) -> dict[Hashable, LayerHessians]:
    """Every task's Hessians of the next block, each model's block materialised in turn."""
    hessians: dict[Hashable, LayerHessians] = {}
    for runner, model_blocks in zip(runners, blocks, strict=True):
        with together(ranks):
            block = next(model_blocks)  # materialised here, released below
        for task in runner.hidden:
            source = error_source(runner.load_tensor)
            with together(ranks):
                with HessianHooks(block.module, block.prefix, device, source=source) as hooks:
                    runner.run(block, task, in_place=True)
                layer = hooks.result()
            hessians[task] = all_reduced(layer, ranks)
        block.unload()
    return hessians
