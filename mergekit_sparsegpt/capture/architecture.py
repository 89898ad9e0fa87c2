"""Which models the pre-pass supports, and which tensors of a decoder block it hooks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PretrainedConfig
from transformers.pytorch_utils import Conv1D

from mergekit_sparsegpt.capture.accumulate import TensorLayout
from mergekit_sparsegpt.capture.model import empty_model


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


@dataclass(frozen=True)
class HookedTensor:
    """A checkpoint tensor of a decoder block whose input Hessians the pre-pass captures.

    ``kind`` says where its input comes from: "input", the module's first argument (nn.Linear,
    GPT-2's Conv1D, a MoE router); "experts_up" / "experts_down", the up (gate_up_proj or
    up_proj) and down projections of a fused MoE experts module, one matrix per expert; "norm",
    a norm's scale, whose input is the normalized activation it multiplies (a diagonal linear:
    only the diagonal of its Hessian exists).
    """

    module_name: str  # in the block: "self_attn.q_proj", "mlp.experts"
    parameter: str  # "weight", "gate_up_proj", "down_proj"
    module: torch.nn.Module
    kind: str
    layout: TensorLayout

    @property
    def columns(self) -> int:
        """Input features of each of its matrices: the size of its Hessians."""
        return self.module.get_parameter(self.parameter).shape[self.layout.input_axis]


def hooked_tensors(block: torch.nn.Module) -> dict[str, HookedTensor]:
    """The block's tensors that get input Hessians, by name in the block, in module order."""
    found: dict[str, HookedTensor] = {}
    for name, module in block.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, torch.nn.Linear) or _is_router(module):
            found[f"{prefix}weight"] = HookedTensor(name, "weight", module, "input", TensorLayout())
        elif isinstance(module, Conv1D):
            layout = TensorLayout(input_axis=-2)  # W is [in, out]: x @ W + b
            found[f"{prefix}weight"] = HookedTensor(name, "weight", module, "input", layout)
        elif _is_fused_experts(module):
            layout = TensorLayout(-2 if module.is_transposed else -1, module.down_proj.shape[0])
            up = "gate_up_proj" if module.has_gate else "up_proj"
            found[prefix + up] = HookedTensor(name, up, module, "experts_up", layout)
            found[f"{prefix}down_proj"] = HookedTensor(
                name, "down_proj", module, "experts_down", layout
            )
        elif is_norm(module):
            found[f"{prefix}weight"] = HookedTensor(name, "weight", module, "norm", TensorLayout())
    return found


def is_norm(module: torch.nn.Module) -> bool:
    """A normalization layer with a per-channel scale (RMSNorm, LayerNorm, Gemma's 1 + w): by
    its class name, as transformers names every one, and a 1-D ``weight`` of its own."""
    weight = module._parameters.get("weight")
    return "norm" in type(module).__name__.lower() and weight is not None and weight.dim() == 1


def _is_router(module: torch.nn.Module) -> bool:
    """transformers 5's MoE routers (``MixtralTopKRouter``, ``Qwen3MoeTopKRouter``): a bare
    [experts, hidden] weight that the router applies to its input with ``F.linear``."""
    weight = module._parameters.get("weight")
    is_router = type(module).__name__.lower().endswith("topkrouter")
    return is_router and weight is not None and weight.dim() == 2


_EXPERT_FLAGS = ("has_gate", "has_bias", "is_transposed")


def _is_fused_experts(module: torch.nn.Module) -> bool:
    """An experts module of transformers' ``use_experts_implementation``: every expert's weights
    stacked in 3-D parameters, computed by whichever experts kernel the config names."""
    if not all(hasattr(module, flag) for flag in _EXPERT_FLAGS):
        return False
    up = module._parameters.get("gate_up_proj" if module.has_gate else "up_proj")
    down = module._parameters.get("down_proj")
    return up is not None and down is not None and up.dim() == down.dim() == 3


def _unhooked_matrices(block: torch.nn.Module) -> list[str]:
    """Parameters of ``block`` with two or more axes that no Hessian covers, described.

    Vectors (norms, biases, scales) and the biases of hooked modules take statistics of their
    own kinds or none; any other matrix would be silently merged by the stock rule.
    """
    hooked = hooked_tensors(block)
    owners = {id(tensor.module) for tensor in hooked.values()}
    unhooked = []
    for module_name, module in block.named_modules():
        for name, parameter in module.named_parameters(recurse=False):
            full_name = f"{module_name}.{name}" if module_name else name
            is_bias = id(module) in owners and name.endswith("bias")
            if full_name in hooked or parameter.dim() <= 1 or is_bias:
                continue
            unhooked.append(f"{full_name} ({type(module).__name__}, {tuple(parameter.shape)})")
    return unhooked


# Architectures the test matrix (tests/scenarios/test_architectures.py) runs end to end.
TESTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Gemma2ForCausalLM",
    "Phi3ForCausalLM",
    "GPTNeoXForCausalLM",
    "GPT2LMHeadModel",
    "MixtralForCausalLM",
    "Qwen3MoeForCausalLM",
)
SUPPORTED = (
    "decoder-only models that transformers' AutoModelForCausalLM builds, whose decoder blocks "
    "hold no matrices besides nn.Linear, GPT-2's Conv1D, fused MoE experts (transformers' "
    "use_experts_implementation) and top-k routers (norms and biases aside); tested: "
    + ", ".join(TESTED_ARCHITECTURES)
)


def check_supported(
    config: PretrainedConfig, model_name: str, trust_remote_code: bool = False
) -> None:
    """Refuse, from its config alone, a model whose Hessians the pre-pass cannot capture.

    Understood means: AutoModelForCausalLM builds it (on the meta device: no weight is read), it
    has a list of decoder blocks, and every matrix in every block is of a kind the pre-pass
    hooks, at least one per block. Raises ``ValueError`` naming the model, its architecture and
    what is supported.
    """
    architecture = ", ".join(getattr(config, "architectures", None) or [str(config.model_type)])
    try:
        model = empty_model(config, trust_remote_code)
    # Any failure to build the skeleton (unknown config class, missing remote code) is a refusal;
    # its first line says why (transformers goes on to list every causal-LM config class).
    except Exception as error:  # noqa: BLE001
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        problem = f"AutoModelForCausalLM cannot build it: {first_line}"
    else:
        problem = _unsupported_model(model)
    if problem:
        raise ValueError(
            f"Model {model_name} has architecture {architecture}, which the Hessian pre-pass "
            f"does not support ({problem}). Supported: {SUPPORTED}."
        )


def _unsupported_model(model: torch.nn.Module) -> str | None:
    try:
        _, layers = decoder_layers(model)
    except ValueError as error:
        return str(error)
    for index, block in enumerate(layers):
        if all(tensor.kind == "norm" for tensor in hooked_tensors(block).values()):
            return f"decoder block {index} ({type(block).__name__}) holds no linear layer"
        unhooked = _unhooked_matrices(block)
        if unhooked:
            return f"decoder block {index} holds parameters of unknown kind: {', '.join(unhooked)}"
    return None
