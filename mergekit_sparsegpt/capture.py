"""Layer-by-layer activation capture, SparseGPT's sequential pipeline.

Only the current decoder block's weights are materialised, plus the activations of the whole
calibration set, so peak memory does not grow with depth. The model skeleton lives on the
``meta`` device; weights come from mergekit's lazy loader one block at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
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


class _StopForward(Exception):
    """Raised by the first block's pre-hook once its inputs are captured."""

    def __init__(self, hidden_states: torch.Tensor, kwargs: dict[str, Any]):
        super().__init__()
        self.hidden_states = hidden_states
        self.kwargs = kwargs


def empty_model(config: PretrainedConfig, trust_remote_code: bool = False) -> torch.nn.Module:
    """The model skeleton with parameters on ``meta``; buffers (rotary tables) stay real."""
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(
            config, dtype=torch.float32, trust_remote_code=trust_remote_code
        )


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
) -> Iterator[LayerHessians]:
    """Yield each decoder block's linear-input Hessians, first block first.

    ``load_tensor(name)`` returns a checkpoint tensor by its state-dict name; ``windows`` is
    [samples, seq_len] token ids.
    """
    prefix, layers = decoder_layers(model)
    _materialise(model, load_tensor, device, skip=(prefix, _output_head_prefix(model)))
    hidden, layer_kwargs = _first_layer_inputs(model, layers[0], windows, device, batch_size)
    _release(model, skip_prefix=prefix)

    for index in tqdm(range(len(layers)), desc=description, leave=False):
        layer = layers[index]
        layer_prefix = f"{prefix}.{index}"
        _materialise(layer, load_tensor, device, name_prefix=f"{layer_prefix}.")
        with _HessianHooks(layer, layer_prefix, device) as hooks:
            hidden = _run_layer(layer, hidden, layer_kwargs, batch_size)
        layer.to_empty(device="meta")
        yield hooks.result()


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


def _first_layer_inputs(
    model: torch.nn.Module,
    first_layer: torch.nn.Module,
    windows: torch.Tensor,
    device: torch.device | str,
    batch_size: int,
) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Run the embedding stage and stop at the first block, keeping its inputs per batch."""

    def stop(_module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        hidden_states = args[0] if args else kwargs.pop("hidden_states")
        raise _StopForward(hidden_states, kwargs)

    handle = first_layer.register_forward_pre_hook(stop, with_kwargs=True)
    hidden, layer_kwargs = [], []
    try:
        with torch.no_grad():
            for batch in windows.split(batch_size):
                try:
                    model(input_ids=batch.to(device), use_cache=False)
                except _StopForward as captured:
                    hidden.append(captured.hidden_states)
                    layer_kwargs.append(captured.kwargs)
                else:
                    raise RuntimeError("The model never reached its first decoder layer")
    finally:
        handle.remove()
    return torch.cat(hidden), layer_kwargs


def _run_layer(
    layer: torch.nn.Module,
    hidden: torch.Tensor,
    layer_kwargs: list[dict[str, Any]],
    batch_size: int,
) -> torch.Tensor:
    outputs = torch.empty_like(hidden)
    with torch.no_grad():
        for index, batch in enumerate(hidden.split(batch_size)):
            result = layer(batch, **layer_kwargs[index])
            start = index * batch_size
            outputs[start : start + len(batch)] = result[0] if isinstance(result, tuple) else result
    return outputs


class _HessianHooks:
    """Pre-hooks on a block's linears; linears fed the same tensor share one accumulator."""

    def __init__(self, layer: torch.nn.Module, layer_prefix: str, device: torch.device | str):
        self.layer = layer
        self.linears = {
            f"{layer_prefix}.{name}.weight": module
            for name, module in layer.named_modules()
            if isinstance(module, torch.nn.Linear)
        }
        self.device = device
        self.groups: dict[str, str] = {}
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
