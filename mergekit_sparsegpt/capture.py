"""Layer-by-layer activation capture, SparseGPT's sequential pipeline.

Only the current decoder block's weights are materialised, plus the activations of the whole
calibration set, so peak memory does not grow with depth. The model skeleton lives on the
``meta`` device; weights come from mergekit's lazy loader one block at a time.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable, Collection, Hashable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, PretrainedConfig

from mergekit_sparsegpt.hessian import HessianAccumulator

TensorSource = Callable[[str], torch.Tensor]


@dataclass
class LayerHessians:
    """Hessians of one decoder block: one per distinct linear input (q/k/v share one)."""

    hessians: dict[str, torch.Tensor]  # group name (first reader's weight name) -> H
    groups: dict[str, str]  # weight name -> group name
    samples: dict[str, int]  # group name -> sequences seen (0 if the linear never ran)


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


def empty_model(config: PretrainedConfig, trust_remote_code: bool = False) -> torch.nn.Module:
    """The model skeleton with parameters on ``meta``; buffers (rotary tables) stay real.

    In eval mode: dropout during calibration would make the Hessians random.
    """
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch.float32, trust_remote_code=trust_remote_code
        )
    return model.eval()


def decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The repeated decoder blocks: the ``ModuleList`` holding most parameters."""
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0
    ]
    if not candidates:
        raise ValueError(f"{type(model).__name__} has no list of decoder layers")
    return max(candidates, key=lambda item: sum(p.numel() for p in item[1].parameters()))


def capture_layer_hessians(
    model: torch.nn.Module,
    load_tensor: TensorSource,
    windows: torch.Tensor,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    description: str = "layers",
    progress: bool = True,
) -> Iterator[LayerHessians]:
    """Yield each decoder block's linear-input Hessians, first block first.

    ``load_tensor(name)`` returns a checkpoint tensor by its state-dict name; ``windows`` is
    [samples, seq_len] token ids.
    """
    map_large_allocations()
    prefix, layers = decoder_layers(model)
    _materialise(model, load_tensor, device, skip=(prefix, _output_head_prefix(model)))
    hidden, layer_calls = _layer_inputs(model, layers, windows, device, batch_size)
    _release(model, skip_prefix=prefix)

    for index in tqdm(range(len(layers)), desc=description, leave=False, disable=not progress):
        layer = layers[index]
        layer_prefix = f"{prefix}.{index}"
        _materialise(layer, load_tensor, device, name_prefix=f"{layer_prefix}.")
        with _HessianHooks(layer, layer_prefix, device) as hooks:
            hidden = _run_layer(layer, hidden, layer_calls[index], batch_size, in_place=True)
        layer.to_empty(device="meta")
        yield hooks.result()
        release_freed_memory()


# Weight name -> merged value, for the linears of one input group (``merge_group`` below).
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
    map_large_allocations()
    prefix, layers = decoder_layers(model)
    _materialise(model, load_tensor, device, skip=(prefix, _output_head_prefix(model)))
    inputs = {
        task: _layer_inputs(model, layers, task_windows, device, batch_size)
        for task, task_windows in windows.items()
    }
    _release(model, skip_prefix=prefix)
    hidden = {task: states for task, (states, _) in inputs.items()}
    for index in tqdm(range(len(layers)), desc=description, leave=False, disable=not progress):
        layer = layers[index]
        layer_prefix = f"{prefix}.{index}"
        linears = {
            f"{layer_prefix}.{name}.weight": name
            for name, module in layer.named_modules()
            if isinstance(module, torch.nn.Linear)
        }
        shapes = {w: layer.get_submodule(m).weight.shape for w, m in linears.items()}

        def load_block_tensor(name: str, shapes: dict = shapes) -> torch.Tensor:
            return torch.zeros(shapes[name]) if name in shapes else load_tensor(name)

        _materialise(layer, load_block_tensor, device, name_prefix=f"{layer_prefix}.")
        calls = {task: layer_calls[index] for task, (_, layer_calls) in inputs.items()}
        for group in _input_groups(layer, layer_prefix, device, hidden, calls, batch_size):
            hessians = {}
            for task in windows:
                with _HessianHooks(layer, layer_prefix, device, only=group) as hooks:
                    _run_layer(layer, hidden[task], calls[task], batch_size)
                hessians[task] = hooks.result()
            for name, value in merge_group(hessians).items():
                set_module_tensor_to_device(
                    layer, f"{linears[name]}.weight", device, value=value.to(torch.float32)
                )
        hidden = {
            task: _run_layer(layer, hidden[task], calls[task], batch_size, in_place=True)
            for task in windows
        }
        layer.to_empty(device="meta")
        release_freed_memory()


def _input_groups(
    layer: torch.nn.Module,
    layer_prefix: str,
    device: torch.device | str,
    hidden: Mapping[Hashable, torch.Tensor],
    calls: Mapping[Hashable, list[LayerCall]],
    batch_size: int,
) -> list[list[str]]:
    """The block's linears grouped by shared input, in the order the forward pass reaches them
    (one batch of one task is enough to see which linear reads which tensor)."""
    task = next(iter(hidden))
    with _HessianHooks(layer, layer_prefix, device) as hooks:
        _run_layer(layer, hidden[task][:batch_size], calls[task][:1], batch_size)
    groups: dict[str, list[str]] = {}
    for weight, group in hooks.groups.items():
        groups.setdefault(group, []).append(weight)
    never_ran = [[weight] for weight in hooks.linears if weight not in hooks.groups]
    return [*groups.values(), *never_ran]


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


_GLIBC = _glibc()
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number, from glibc's malloc.h
MMAP_THRESHOLD_BYTES = 1 << 20


def map_large_allocations() -> None:
    """Have glibc give every allocation of 1 MiB or more its own mapping, returned on free.

    By default glibc raises this threshold (up to 32 MiB) whenever a mapped block is freed, so
    the per-batch activations of a block then come from its heap, where freed pieces of
    different sizes fragment it: the peak inside a block rose with every block (0.92 GiB after
    the first of 16 blocks, 1.20 GiB at the last; 0.74 GiB flat with this; benchmarks/perf).
    Setting the threshold also turns glibc's raising off, for the rest of the process. A no-op
    off glibc.
    """
    if _GLIBC is not None:
        _GLIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def release_freed_memory() -> None:
    """Hand memory freed by the finished block back to the system.

    glibc keeps freed blocks of up to 32 MB in its heap once larger ones have been freed, so a
    block's weights and Hessians, freed after the block, stayed resident: peak RSS grew with
    depth (1.3 GiB at 4 layers, 3.0 GiB at 16, benchmarks/perf). A no-op off glibc.
    """
    if _GLIBC is not None:
        _GLIBC.malloc_trim(0)


def _output_head_prefix(model: torch.nn.Module) -> str | None:
    head = model.get_output_embeddings()
    for name, module in model.named_modules():
        if module is head:
            return name
    return None


def _materialise(
    module: torch.nn.Module,
    load_tensor: TensorSource,
    device: torch.device | str,
    name_prefix: str = "",
    skip: tuple[str | None, ...] = (),
) -> None:
    """Load ``module``'s parameters (checkpoint name = ``name_prefix`` + module name)."""
    for name, _ in list(module.named_parameters()):
        if any(prefix and (name == prefix or name.startswith(prefix + ".")) for prefix in skip):
            continue
        value = load_tensor(name_prefix + name).to(torch.float32)
        set_module_tensor_to_device(module, name, device, value=value)
    for name, buffer in list(module.named_buffers()):
        if buffer.device.type != "meta":
            set_module_tensor_to_device(module, name, device, value=buffer)


def _release(model: torch.nn.Module, skip_prefix: str) -> None:
    for name, param in list(model.named_parameters()):
        if not name.startswith(skip_prefix + ".") and param.device.type != "meta":
            set_module_tensor_to_device(model, name, "meta")


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


class _HessianHooks:
    """Pre-hooks on a block's linears; linears fed the same tensor share one accumulator."""

    def __init__(
        self,
        layer: torch.nn.Module,
        layer_prefix: str,
        device: torch.device | str,
        only: Collection[str] | None = None,
    ):
        self.layer = layer
        self.linears = {
            f"{layer_prefix}.{name}.weight": module
            for name, module in layer.named_modules()
            if isinstance(module, torch.nn.Linear)
        }
        if only is not None:  # weight names: hook just these linears
            self.linears = {name: self.linears[name] for name in only}
        self.device = device
        self.groups: dict[str, str] = {}  # in the order the forward pass reaches the linears
        self.accumulators: dict[str, HessianAccumulator] = {}
        # Inputs seen during the current block call: identity, not equality, defines sharing.
        self._seen: list[tuple[torch.Tensor, str]] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> _HessianHooks:
        for weight_name, module in self.linears.items():
            self._handles.append(module.register_forward_pre_hook(self._make_hook(weight_name)))
        self._handles.append(self.layer.register_forward_hook(lambda *_: self._seen.clear()))
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._seen.clear()

    def _make_hook(self, weight_name: str) -> Callable[..., None]:
        def hook(_module: torch.nn.Module, args: tuple) -> None:
            inputs = args[0]
            if weight_name not in self.groups:
                self.groups[weight_name] = self._group_of(inputs, weight_name)
            group = self.groups[weight_name]
            if group == weight_name:
                if group not in self.accumulators:
                    self.accumulators[group] = HessianAccumulator(inputs.shape[-1], self.device)
                self.accumulators[group].add_batch(inputs)

        return hook

    def _group_of(self, inputs: torch.Tensor, weight_name: str) -> str:
        for seen, group in self._seen:
            if seen is inputs:
                return group
        self._seen.append((inputs, weight_name))
        return weight_name

    def result(self) -> LayerHessians:
        # A linear that never ran (e.g. an expert no token was routed to) gets an all-zero
        # Hessian: every column counts as dead, so its entries are ranked by |tau|.
        for weight_name, module in self.linears.items():
            if weight_name not in self.groups:
                self.groups[weight_name] = weight_name
                self.accumulators[weight_name] = HessianAccumulator(module.in_features, self.device)
        return LayerHessians(
            hessians={name: acc.hessian for name, acc in self.accumulators.items()},
            groups=dict(self.groups),
            samples={name: acc.samples for name, acc in self.accumulators.items()},
        )
