"""Layer-by-layer activation capture, SparseGPT's sequential pipeline.

Only the current decoder block's weights are materialised, plus the activations of the whole
calibration set, so peak memory does not grow with depth. The model skeleton lives on the
``meta`` device; weights come from mergekit's lazy loader one block at a time.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.utils import set_module_tensor_to_device
from tqdm.auto import tqdm

from mergekit_sparsegpt.capture.accumulate import LayerHessians, tensor_of
from mergekit_sparsegpt.capture.architecture import decoder_layers, hooked_tensors
from mergekit_sparsegpt.capture.hooks import HessianHooks, error_source
from mergekit_sparsegpt.capture.memory import map_large_allocations, release_freed_memory
from mergekit_sparsegpt.capture.model import (
    TensorSource,
    materialise,
    output_head_prefix,
    release,
)

LayerCall = tuple[tuple[Any, ...], dict[str, Any]]  # the positional and keyword arguments


class _StopForward(Exception):
    """Raised once the last block's arguments are recorded: nothing after it needs to run."""


class _ArgumentRecorder(torch.nn.Module):
    """Stands in for a decoder block during the embedding pass.

    Records the arguments the model gives this block (attention masks and rotary tables can
    differ per block: sliding-window and global layers) and passes the hidden states through,
    so no block weight is needed. Attribute reads (``attention_type``) go to the real block.
    """

    def __init__(
        self,
        block: torch.nn.Module,
        calls: list[LayerCall],
        last: bool,
        hidden: list[torch.Tensor] | None = None,
    ):
        super().__init__()
        object.__setattr__(self, "block", block)  # not a submodule: its weights stay on meta
        self.calls = calls
        self.last = last
        self.hidden = hidden  # the first block also keeps its hidden-state input

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "block"), name)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.calls.append((args, kwargs))
        if self.hidden is not None:
            self.hidden.append(hidden_states)
        if self.last:
            raise _StopForward
        return hidden_states


def _layer_inputs(
    model: torch.nn.Module,
    layers: torch.nn.ModuleList,
    windows: torch.Tensor,
    device: torch.device | str,
    batch_size: int,
) -> tuple[torch.Tensor, list[list[LayerCall]]]:
    """Run the embedding stage; return the first block's hidden states and, per block and
    batch, the other arguments the model passes to that block."""
    originals = list(layers)
    calls: list[list[LayerCall]] = [[] for _ in originals]
    hidden: list[torch.Tensor] = []
    for index, block in enumerate(originals):
        layers[index] = _ArgumentRecorder(
            block, calls[index], last=index == len(originals) - 1, hidden=None if index else hidden
        )
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
) -> torch.Tensor:
    """The block's output for every batch; ``in_place`` writes it over ``hidden`` (each batch's
    input is done with once its output exists), so the calibration activations are held once."""
    outputs = hidden if in_place else torch.empty_like(hidden)
    batches = zip(hidden.split(batch_size), calls, strict=True)
    with torch.no_grad():
        for index, (batch, (args, kwargs)) in enumerate(batches):
            result = layer(batch, *args, **kwargs)
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
    per window set), then each block in turn materialised on ``device`` and released again."""

    def __init__(
        self,
        model: torch.nn.Module,
        load_tensor: TensorSource,
        windows: Mapping[Hashable, torch.Tensor],
        device: torch.device | str,
        batch_size: int,
    ):
        map_large_allocations()
        self.load_tensor = load_tensor
        self.device = device
        self.batch_size = batch_size
        self.prefix, self.layers = decoder_layers(model)
        skip = (self.prefix, output_head_prefix(model))
        self.dtype = materialise(model, load_tensor, device, skip=skip)
        recorded = {
            task: _layer_inputs(model, self.layers, task_windows, device, batch_size)
            for task, task_windows in windows.items()
        }
        release(model, skip_prefix=self.prefix)
        self.hidden = {task: states for task, (states, _) in recorded.items()}
        self.calls = {task: calls for task, (_, calls) in recorded.items()}

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
        outputs = _run_layer(block.module, self.hidden[task], calls, self.batch_size, in_place)
        if in_place:
            self.hidden[task] = outputs
        return outputs


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
) -> Iterator[LayerHessians]:
    """Yield each decoder block's linear-input Hessians, first block first.

    ``load_tensor(name)`` returns a checkpoint tensor by its state-dict name; ``windows`` is
    [samples, seq_len] token ids.

    Resuming an interrupted pre-pass: ``resume = (k, inputs)`` starts at block ``k`` with its
    saved ``inputs`` ([samples, seq_len, hidden], overwritten in place); blocks before it do not
    run. ``block_done(index, outputs)`` is called once the consumer has taken block ``index``'s
    Hessians (when it asks for the next block), with that block's outputs: block index+1's input.
    """
    runner = _BlockRunner(model, load_tensor, {_TASK: windows}, device, batch_size)
    first = 0
    if resume is not None:  # the embedding pass still ran: it records every block's arguments
        dtype = runner.hidden[_TASK].dtype
        first, runner.hidden[_TASK] = resume[0], resume[1].to(device=device, dtype=dtype)
    for block in runner.blocks(description, progress, first):
        with HessianHooks(
            block.module, block.prefix, device, source=error_source(load_tensor)
        ) as hooks:
            hidden = runner.run(block, _TASK, in_place=True)
        block.unload()
        yield hooks.result()
        if block_done is not None:
            block_done(block.index, hidden)


# Tensor name -> merged value, for the tensors of one merge unit (``merge_group`` below).
MergedWeights = dict[str, torch.Tensor]


def capture_merged_hessians(
    model: torch.nn.Module,
    load_tensor: TensorSource,
    windows: Mapping[Hashable, torch.Tensor],
    merge_group: Callable[[dict[Hashable, LayerHessians]], MergedWeights],
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    description: str = "layers",
    progress: bool = True,
) -> None:
    """Capture every task's Hessians on the inputs the *merged* model gives each linear.

    RegMean++ (Nguyen et al. 2025): task ``k``'s windows run through the merged model, so the
    merge is built as it is measured, in forward order. ``load_tensor`` returns the merged value
    of a tensor that has no Hessian (embeddings, norms) and is not asked for the linears; per
    block and per input group (q/k/v, o, gate/up, down), the block runs with everything before
    the group merged, ``merge_group`` receives each task's Hessians of that group and returns
    the group's merged weights, which the block then holds. Each block's output is the next
    block's input. Linears not merged yet hold zeros: they run after the group, so their value
    cannot reach its inputs.
    """
    runner = _BlockRunner(model, load_tensor, windows, device, batch_size)
    block_source = functools.partial(_zeros_for_hooked, load_tensor)
    for block in runner.blocks(description, progress, block_source=block_source):
        hooked = {f"{block.prefix}.{name}": name for name in hooked_tensors(block.module)}
        for unit in _merge_units(runner, block):
            hessians = {}
            for task in windows:
                with HessianHooks(block.module, block.prefix, device, only=unit) as hooks:
                    runner.run(block, task)
                hessians[task] = hooks.result()
            for name, value in merge_group(hessians).items():
                set_module_tensor_to_device(
                    block.module, hooked[name], device, value=value, dtype=runner.dtype
                )
        for task in windows:
            runner.run(block, task, in_place=True)


def _zeros_for_hooked(
    load_tensor: TensorSource, layer: torch.nn.Module, layer_prefix: str
) -> TensorSource:
    """``load_tensor``, with zeros for the block's hooked tensors: not merged yet."""
    shapes = {
        f"{layer_prefix}.{name}": layer.get_parameter(name).shape for name in hooked_tensors(layer)
    }

    def load_block_tensor(name: str) -> torch.Tensor:
        return torch.zeros(shapes[name]) if name in shapes else load_tensor(name)

    return load_block_tensor


def _merge_units(runner: _BlockRunner, block: _Block) -> list[list[str]]:
    """The block's hooked tensors in units merged together, in the order the forward pass
    reaches them: tensors that share an input (q/k/v), and all experts of one fused tensor
    (their inputs all follow the router). One batch of one task is enough to see which tensor
    reads which input."""
    task = next(iter(runner.hidden))
    calls = runner.calls[task][block.index][:1]
    inputs = runner.hidden[task][: runner.batch_size]
    with HessianHooks(block.module, block.prefix, runner.device) as hooks:
        _run_layer(block.module, inputs, calls, runner.batch_size)
    unit_of: dict[str, str] = {}  # tensor -> the first tensor of its unit
    units: dict[str, list[str]] = {}
    for matrix, group in hooks.groups.items():
        tensor = tensor_of(matrix)
        unit = unit_of.setdefault(tensor, unit_of.get(tensor_of(group), tensor))
        if tensor not in units.setdefault(unit, []):
            units[unit].append(tensor)
    never_ran = [[tensor] for tensor in hooks.tensors if tensor not in unit_of]
    return [*units.values(), *never_ran]
