"""Layer-by-layer activation capture, SparseGPT's sequential pipeline.

Only the current decoder block's weights are materialised, plus the activations of the whole
calibration set, so peak memory does not grow with depth. The model skeleton lives on the
``meta`` device; weights come from mergekit's lazy loader one block at a time. The activations
stay on the host (CPU), each batch moved to the block's device as it runs: RegMean++ holds every
task's activations at once, and the accelerator then holds about one block and one batch.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from mergekit_sparsegpt.capture.accumulate import LayerHessians
from mergekit_sparsegpt.capture.architecture import decoder_layers
from mergekit_sparsegpt.capture.head import capture_head_hessians
from mergekit_sparsegpt.capture.hooks import HessianHooks, UnitCaptured, error_source
from mergekit_sparsegpt.capture.memory import (
    activation_bytes,
    map_large_allocations,
    release_freed_memory,
)
from mergekit_sparsegpt.capture.model import (
    BlockStandIn,
    TensorSource,
    materialise,
    output_head_prefix,
    release,
)

LayerCall = tuple[tuple[Any, ...], dict[str, Any]]  # the positional and keyword arguments
HOST = torch.device("cpu")  # where the calibration activations are kept between blocks


class _StopForward(Exception):
    """Raised once the last block's arguments are recorded: nothing after it needs to run."""


class _ArgumentRecorder(BlockStandIn):
    """Stands in for a decoder block during the embedding pass.

    Records the arguments the model gives this block (attention masks and rotary tables can
    differ per block: sliding-window and global layers) and passes the hidden states through,
    so no block weight is needed. Attribute reads (``attention_type``) go to the real block.
    The first block also keeps its hidden-state inputs in ``hidden``, each moved to ``host``.
    """

    def __init__(
        self,
        block: torch.nn.Module,
        calls: list[LayerCall],
        last: bool,
        hidden: list[torch.Tensor] | None = None,
        host: torch.device | str = HOST,
    ):
        super().__init__(block)
        self.calls, self.last, self.hidden, self.host = calls, last, hidden, host

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.calls.append((args, kwargs))
        if self.hidden is not None:
            self.hidden.append(hidden_states.to(self.host))
        if self.last:
            raise _StopForward
        return hidden_states


def _layer_inputs(
    model: torch.nn.Module,
    layers: torch.nn.ModuleList,
    windows: torch.Tensor,
    device: torch.device | str,
    batch_size: int,
    host: torch.device | str = HOST,
) -> tuple[torch.Tensor, list[list[LayerCall]]]:
    """Run the embedding stage on ``device``; return the first block's hidden states (on
    ``host``) and, per block and batch, the other arguments the model passes to that block."""
    originals = list(layers)
    calls: list[list[LayerCall]] = [[] for _ in originals]
    hidden: list[torch.Tensor] = []
    for index, block in enumerate(originals):
        last = index == len(originals) - 1
        first_hidden = None if index else hidden
        layers[index] = _ArgumentRecorder(block, calls[index], last, first_hidden, host)
    try:
        with torch.no_grad():
            for batch in windows.split(batch_size):
                try:
                    model(input_ids=batch.to(device), use_cache=False)
                except _StopForward:
                    continue
                raise RuntimeError(f"{type(model).__name__} never reached its last decoder layer")
    finally:
        for index, block in enumerate(originals):
            layers[index] = block
    return _concatenate_releasing(hidden), calls


def _concatenate_releasing(batches: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(batches)``, releasing each batch once copied: at most one batch more than the
    result is held, where ``torch.cat`` holds the activations twice."""
    result = batches[0].new_empty((sum(len(b) for b in batches), *batches[0].shape[1:]))
    start = 0
    while batches:
        batch = batches.pop(0)
        result[start : start + len(batch)] = batch
        start += len(batch)
    return result


def _run_layer(
    layer: torch.nn.Module,
    hidden: torch.Tensor,
    calls: list[LayerCall],
    batch_size: int,
    in_place: bool = False,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The block's output for every batch, each run on ``device`` (default: ``hidden``'s) and
    written back beside ``hidden``; ``in_place`` writes it over ``hidden`` (each batch's input
    is done with once its output exists), so the calibration activations are held once."""
    outputs = hidden if in_place else torch.empty_like(hidden)
    batches = zip(hidden.split(batch_size), calls, strict=True)
    with torch.no_grad():
        for index, (batch, (args, kwargs)) in enumerate(batches):
            # A no-op on the host's own device: the batch stays a view of ``hidden``.
            result = layer(batch.to(device or hidden.device), *args, **kwargs)
            start = index * batch_size
            outputs[start : start + len(batch)] = result[0] if isinstance(result, tuple) else result
    return outputs


@dataclass
class _Block:
    """One decoder block while its weights are materialised."""

    index: int
    prefix: str  # its checkpoint name: "model.layers.3"
    module: torch.nn.Module
    loaded: bool = field(default=True, init=False)

    def unload(self) -> None:
        """Put its weights back on ``meta`` (once: a pipeline may do it before the runner)."""
        if self.loaded:
            self.module.to_empty(device="meta")
            self.loaded = False


class _BlockRunner:
    """What both pipelines share: the embedding pass that records every block's arguments (one
    per window set), then each block in turn materialised on ``device`` and released again.
    ``hidden`` (task -> [samples, seq_len, hidden]) stays on ``host``; each batch goes to
    ``device`` when a block runs it (with ``device`` the CPU, nothing is copied)."""

    def __init__(
        self,
        model: torch.nn.Module,
        load_tensor: TensorSource,
        windows: Mapping[Hashable, torch.Tensor],
        device: torch.device | str,
        batch_size: int,
        *,
        host: torch.device | str = HOST,
        whole_matrices: bool = True,
    ):
        # Only where the blocks' consumers hold d x d matrices (whole Hessians, factors, solves):
        # there the heap fragments without it, while its fresh mappings cost a page fault per
        # page of every batch temporary, which a pass of diagonals alone need not pay.
        if whole_matrices:
            map_large_allocations()
        self.model = model
        self.load_tensor = load_tensor
        self.device = device
        self.host = host
        self.batch_size = batch_size
        self.prefix, self.layers = decoder_layers(model)
        skip = (self.prefix, output_head_prefix(model))
        self.dtype = materialise(model, load_tensor, device, skip=skip)
        recorded = {
            task: _layer_inputs(model, self.layers, task_windows, device, batch_size, host)
            for task, task_windows in windows.items()
        }
        release(model, skip_prefix=self.prefix)
        self.hidden = {task: states for task, (states, _) in recorded.items()}
        self.calls = {task: calls for task, (_, calls) in recorded.items()}

    @property
    def activation_bytes(self) -> int:
        """Host memory every task's activations take (the runner holds them from its start)."""
        return sum(activation_bytes(*h.shape, h.dtype) for h in self.hidden.values())

    def resume(self, inputs: Mapping[Hashable, torch.Tensor]) -> None:
        """Make ``inputs`` (saved by an interrupted run) each task's inputs of the next block
        run, kept where and in the dtype the runner keeps activations."""
        for task, hidden in self.hidden.items():
            self.hidden[task] = inputs[task].to(hidden.device, hidden.dtype)

    def blocks(
        self,
        description: str,
        progress: bool,
        first: int = 0,
        block_source: Callable[[torch.nn.Module, str], TensorSource] | None = None,
    ) -> Iterator[_Block]:
        """Each block from ``first`` on, materialised from ``block_source(block, prefix)`` (by
        default the model's source); released once the caller is done with it."""
        indices = tqdm(
            range(first, len(self.layers)),
            desc=description,
            leave=False,
            disable=not progress,
            initial=first,
            total=len(self.layers),
        )
        for index in indices:
            block = _Block(index, f"{self.prefix}.{index}", self.layers[index])
            source = block_source(block.module, block.prefix) if block_source else self.load_tensor
            name_prefix = f"{block.prefix}."
            materialise(block.module, source, self.device, name_prefix, dtype=self.dtype)
            yield block
            block.unload()
            release_freed_memory()

    def run(self, block: _Block, task: Hashable, in_place: bool = False) -> torch.Tensor:
        """Block ``block`` on task ``task``'s current inputs; ``in_place`` makes its outputs
        that task's inputs of the next block."""
        calls = self.calls[task][block.index]
        outputs = _run_layer(
            block.module, self.hidden[task], calls, self.batch_size, in_place, self.device
        )
        if in_place:
            self.hidden[task] = outputs
        return outputs

    def feed(self, block: _Block, task: Hashable) -> None:
        """Block ``block`` on task ``task``'s current inputs for its hooks only: no output is
        kept, and a batch ends where the hooks raise ``UnitCaptured``."""
        calls = self.calls[task][block.index]
        batches = zip(self.hidden[task].split(self.batch_size), calls, strict=True)
        with torch.no_grad():
            for batch, (args, kwargs) in batches:
                try:
                    block.module(batch.to(self.device), *args, **kwargs)
                except UnitCaptured:
                    continue


_TASK = "task"  # the single window set of ``capture_layer_hessians``


def capture_layer_hessians(
    model: torch.nn.Module,
    load_tensor: TensorSource,
    windows: torch.Tensor,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    description: str = "layers",
    progress: bool = True,
    resume: tuple[int, torch.Tensor] | None = None,
    block_done: Callable[[int, torch.Tensor], None] | None = None,
    diagonal: bool = False,
) -> Iterator[LayerHessians]:
    """Yield each decoder block's linear-input Hessians, first block first, then the output
    head's (``capture.head``; a resumed run past the last block yields only the head's).

    ``load_tensor(name)`` returns a checkpoint tensor by its state-dict name; ``windows`` is
    [samples, seq_len] token ids. ``diagonal``: every linear input's diag H alone (a vector),
    for a merge that reads nothing else.

    Resuming an interrupted pre-pass: ``resume = (k, inputs)`` starts at block ``k`` with its
    saved ``inputs`` ([samples, seq_len, hidden], kept on the host, overwritten in place when in
    the activations' dtype); blocks before it do not run. ``block_done(index, outputs)`` is
    called once the consumer has taken block ``index``'s Hessians (when it asks for the next
    block), with that block's outputs (on the host): block index+1's input.
    """
    runner = _BlockRunner(
        model, load_tensor, {_TASK: windows}, device, batch_size, whole_matrices=not diagonal
    )
    first = 0
    if resume is not None:  # the embedding pass still ran: it records every block's arguments
        first = resume[0]
        runner.resume({_TASK: resume[1]})
    source = error_source(load_tensor)
    for block in runner.blocks(description, progress, first):
        hooks = HessianHooks(block.module, block.prefix, device, source=source, diagonal=diagonal)
        with hooks:
            hidden = runner.run(block, _TASK, in_place=True)
        block.unload()
        yield hooks.result()
        del hooks  # the block's Grams: the consumer has taken them
        if block_done is not None:
            block_done(block.index, hidden)
    yield from capture_head_hessians(runner, [_TASK], source, diagonal=diagonal).values()
