"""The model skeleton on ``meta``, and loading and releasing its weights a block at a time."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from transformers import AutoModelForCausalLM, PretrainedConfig

TensorSource = Callable[[str], torch.Tensor]


def empty_model(config: PretrainedConfig, trust_remote_code: bool = False) -> torch.nn.Module:
    """The model skeleton with parameters on ``meta``; buffers (rotary tables) stay real.

    In eval mode: dropout during calibration would make the Hessians random.
    """
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch.float32, trust_remote_code=trust_remote_code
        )
    return model.eval()


class BlockStandIn(torch.nn.Module):
    """Takes a decoder block's place in the model's own forward without its weights: the real
    block is kept as a plain attribute (not a submodule: its weights stay on ``meta``), and
    attribute reads the model makes of its blocks (``attention_type``) go to it."""

    def __init__(self, block: torch.nn.Module):
        super().__init__()
        object.__setattr__(self, "block", block)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "block"), name)


def with_zeros(load_tensor: TensorSource, shapes: Mapping[str, torch.Size]) -> TensorSource:
    """``load_tensor``, with zeros for the tensors ``shapes`` names: tensors of a merge not
    built yet, whose values reach nothing the pass captures."""

    def load(name: str) -> torch.Tensor:
        return torch.zeros(shapes[name]) if name in shapes else load_tensor(name)

    return load


def module_name(model: torch.nn.Module, module: torch.nn.Module | None) -> str | None:
    """``module``'s name in ``model`` (None when it is not one of its modules)."""
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    return None


def output_head_prefix(model: torch.nn.Module) -> str | None:
    return module_name(model, model.get_output_embeddings())


# Checkpoint dtypes the calibration forward runs in as stored; any other (float8) runs in float32.
FORWARD_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def forward_dtype(stored: torch.dtype) -> torch.dtype:
    return stored if stored in FORWARD_DTYPES else torch.float32


def materialise(
    module: torch.nn.Module,
    load_tensor: TensorSource,
    device: torch.device | str,
    name_prefix: str = "",
    skip: tuple[str | None, ...] = (),
    dtype: torch.dtype | None = None,
) -> torch.dtype | None:
    """Load ``module``'s parameters (checkpoint name = ``name_prefix`` + module name) in
    ``dtype``; return it. ``None``: the forward dtype of the first one loaded (the embeddings).

    The calibration forward runs as the model would in its checkpoint's dtype (float16 or
    bfloat16 activations included), in a single dtype: a float32 norm weight in a bfloat16
    checkpoint would otherwise turn the activations float32 and fail the next bfloat16 matmul.
    """
    for name, _ in list(module.named_parameters()):
        if any(prefix and (name == prefix or name.startswith(prefix + ".")) for prefix in skip):
            continue
        value = load_tensor(name_prefix + name)
        dtype = dtype or forward_dtype(value.dtype)
        set_module_tensor_to_device(module, name, device, value=value, dtype=dtype)
    for name, buffer in list(module.named_buffers()):
        if buffer.device.type != "meta":
            set_module_tensor_to_device(module, name, device, value=buffer)
    return dtype


def release(model: torch.nn.Module, skip_prefix: str) -> None:
    for name, param in list(model.named_parameters()):
        if not name.startswith(skip_prefix + ".") and param.device.type != "meta":
            set_module_tensor_to_device(model, name, "meta")
