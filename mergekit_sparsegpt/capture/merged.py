"""RegMean++'s pipeline: every task's Hessians on the inputs the *merged* model gives each
linear, the merge built unit by unit as it is measured (Nguyen et al. 2025)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Mapping

import torch
from accelerate.utils import set_module_tensor_to_device

from mergekit_sparsegpt.capture.accumulate import LayerHessians, tensor_of
from mergekit_sparsegpt.capture.architecture import hooked_tensors
from mergekit_sparsegpt.capture.blocks import _Block, _BlockRunner, _run_layer
from mergekit_sparsegpt.capture.distributed import (
    SINGLE_PROCESS,
    Ranks,
    all_reduced,
    decided_by_main,
    together,
)
from mergekit_sparsegpt.capture.head import capture_head_hessians, head_units
from mergekit_sparsegpt.capture.hooks import HessianHooks
from mergekit_sparsegpt.capture.model import TensorSource, with_zeros

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
    held: Callable[[int], None] | None = None,
    resume: tuple[int, Mapping[Hashable, torch.Tensor]] | None = None,
    block_finished: Callable[[int, dict[Hashable, torch.Tensor]], None] | None = None,
    ranks: Ranks = SINGLE_PROCESS,
) -> None:
    """Capture every task's Hessians on the inputs the *merged* model gives each linear.

    RegMean++ (Nguyen et al. 2025): task ``k``'s windows run through the merged model, so the
    merge is built as it is measured, in forward order. ``load_tensor`` returns the merged value
    of a tensor that has no Hessian (embeddings, biases) and is not asked for the linears; per
    block and per input group (q/k/v, o, gate/up, down), the block runs with everything before
    the group merged, ``merge_group`` receives each task's Hessians of that group and returns
    the group's merged weights, which the block then holds (a norm's scale is a unit of its
    own, before the linears that read its output). Each block's output is the next block's
    input. Tensors not merged yet hold zeros: they run after the group, so their value cannot
    reach its inputs. The final norm and then the output head are the last units.

    ``block_finished(index, outputs)`` and ``resume = (k, inputs)`` are as for
    ``capture_lockstep_hessians``: the merged linears of the blocks before ``k`` are done, and
    a task's inputs of block ``k`` carry everything they did.

    With several ``ranks`` each holds its share of every task's windows; each unit's Hessians
    are all-reduced, so every rank merges the same unit and holds the same merged block.
    """
    with together(ranks):
        runner = _BlockRunner(model, load_tensor, windows, device, batch_size)
    if held is not None:  # told the host memory the activations take, once they exist
        held(runner.activation_bytes)
    first = 0
    if resume is not None:
        first = resume[0]
        runner.resume(resume[1])
    block_source = functools.partial(_zeros_for_hooked, load_tensor)
    for block in runner.blocks(description, progress, first, block_source):
        with together(ranks):
            units = _merge_units(runner, block)
        for unit in decided_by_main(units, ranks):  # a rank's batch may miss an expert
            hessians = {}
            for task in windows:
                with together(ranks):
                    with HessianHooks(
                        block.module, block.prefix, device, only=unit, stop_when_captured=True
                    ) as hooks:
                        runner.feed(block, task)  # up to the unit's inputs
                    layer = hooks.result()
                hessians[task] = all_reduced(layer, ranks)
            with together(ranks):
                merged = merge_group(hessians)
            for name, value in merged.items():  # the unit's tensors and their biases
                in_block = name.removeprefix(f"{block.prefix}.")
                set_module_tensor_to_device(
                    block.module, in_block, device, value=value, dtype=runner.dtype
                )
        with together(ranks):
            for task in windows:
                runner.run(block, task, in_place=True)
        if block_finished is not None:
            block_finished(block.index, dict(runner.hidden))
    for unit in head_units(runner):  # the final norm merged before the head reads it
        with together(ranks):
            heads = capture_head_hessians(runner, list(windows), only=unit)
        hessians = {task: all_reduced(layer, ranks) for task, layer in heads.items()}
        with together(ranks):
            merge_group(hessians)


def _zeros_for_hooked(
    load_tensor: TensorSource, layer: torch.nn.Module, layer_prefix: str
) -> TensorSource:
    """``load_tensor``, with zeros for the block's hooked tensors and their modules' biases
    (merged with them): not merged yet."""
    shapes: dict[str, torch.Size] = {}
    for name, tensor in hooked_tensors(layer).items():
        shapes[f"{layer_prefix}.{name}"] = layer.get_parameter(name).shape
        bias = getattr(tensor.module, "bias", None)
        if isinstance(bias, torch.nn.Parameter) and tensor.kind == "input":
            shapes[f"{layer_prefix}.{tensor.module_name}.bias"] = bias.shape
    return with_zeros(load_tensor, shapes)


def _merge_units(runner: _BlockRunner, block: _Block) -> list[list[str]]:
    """The block's hooked tensors in units merged together, in the order the forward pass
    reaches them: tensors that share an input (q/k/v), and all experts of one fused tensor
    (their inputs all follow the router). One batch of one task is enough to see which tensor
    reads which input."""
    task = next(iter(runner.hidden))
    calls = runner.calls[task][block.index][:1]
    inputs = runner.hidden[task][: runner.batch_size]
    with HessianHooks(block.module, block.prefix, runner.device) as hooks:
        _run_layer(block.module, inputs, calls, runner.batch_size, device=runner.device)
    unit_of: dict[str, str] = {}  # tensor -> the first tensor of its unit
    units: dict[str, list[str]] = {}
    for matrix, group in hooks.groups.items():
        tensor = tensor_of(matrix)
        unit = unit_of.setdefault(tensor, unit_of.get(tensor_of(group), tensor))
        if tensor not in units.setdefault(unit, []):
            units[unit].append(tensor)
    never_ran = [[tensor] for tensor in hooks.tensors if tensor not in unit_of]
    return [*units.values(), *never_ran]
