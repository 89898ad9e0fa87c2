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
from transformers.pytorch_utils import Conv1D

from mergekit_sparsegpt.capture.accumulate import (
    HessianAccumulator,
    LayerHessians,
    TensorLayout,
    expert_matrix_name,
    tensor_of,
)

TensorSource = Callable[[str], torch.Tensor]


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


class ActivationError(ValueError):
    """Inf/NaN activations in the calibration forward pass, named by the layer they enter."""


@dataclass(frozen=True)
class HookedTensor:
    """A checkpoint tensor of a decoder block whose input Hessians the pre-pass captures.

    ``kind`` says where its input comes from: "input", the module's first argument (nn.Linear,
    GPT-2's Conv1D, a MoE router); "experts_up" / "experts_down", the up (gate_up_proj or
    up_proj) and down projections of a fused MoE experts module, one matrix per expert.
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
    return found


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

    Vectors (norms, biases, scales) and the biases of hooked modules are merged without a
    Hessian by design; any other matrix would be silently merged by the stock rule.
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
        if not hooked_tensors(block):
            return f"decoder block {index} ({type(block).__name__}) holds no linear layer"
        unhooked = _unhooked_matrices(block)
        if unhooked:
            return f"decoder block {index} holds parameters of unknown kind: {', '.join(unhooked)}"
    return None


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
    map_large_allocations()
    prefix, layers = decoder_layers(model)
    dtype = _materialise(model, load_tensor, device, skip=(prefix, _output_head_prefix(model)))
    hidden, layer_calls = _layer_inputs(model, layers, windows, device, batch_size)
    _release(model, skip_prefix=prefix)
    first = 0
    if resume is not None:  # the embedding pass still ran: it records every block's arguments
        first, hidden = resume[0], resume[1].to(device=device, dtype=hidden.dtype)

    blocks = tqdm(
        range(first, len(layers)),
        desc=description,
        leave=False,
        disable=not progress,
        initial=first,
        total=len(layers),
    )
    for index in blocks:
        layer = layers[index]
        layer_prefix = f"{prefix}.{index}"
        _materialise(layer, load_tensor, device, name_prefix=f"{layer_prefix}.", dtype=dtype)
        with _HessianHooks(layer, layer_prefix, device, source=_source(load_tensor)) as hooks:
            hidden = _run_layer(layer, hidden, layer_calls[index], batch_size, in_place=True)
        layer.to_empty(device="meta")
        yield hooks.result()
        if block_done is not None:
            block_done(index, hidden)
        release_freed_memory()


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
    map_large_allocations()
    prefix, layers = decoder_layers(model)
    dtype = _materialise(model, load_tensor, device, skip=(prefix, _output_head_prefix(model)))
    inputs = {
        task: _layer_inputs(model, layers, task_windows, device, batch_size)
        for task, task_windows in windows.items()
    }
    _release(model, skip_prefix=prefix)
    hidden = {task: states for task, (states, _) in inputs.items()}
    for index in tqdm(range(len(layers)), desc=description, leave=False, disable=not progress):
        layer = layers[index]
        layer_prefix = f"{prefix}.{index}"
        hooked = {f"{layer_prefix}.{name}": name for name in hooked_tensors(layer)}
        shapes = {full: layer.get_parameter(name).shape for full, name in hooked.items()}

        def load_block_tensor(name: str, shapes: dict = shapes) -> torch.Tensor:
            return torch.zeros(shapes[name]) if name in shapes else load_tensor(name)

        _materialise(layer, load_block_tensor, device, name_prefix=f"{layer_prefix}.", dtype=dtype)
        calls = {task: layer_calls[index] for task, (_, layer_calls) in inputs.items()}
        for unit in _merge_units(layer, layer_prefix, device, hidden, calls, batch_size):
            hessians = {}
            for task in windows:
                with _HessianHooks(layer, layer_prefix, device, only=unit) as hooks:
                    _run_layer(layer, hidden[task], calls[task], batch_size)
                hessians[task] = hooks.result()
            for name, value in merge_group(hessians).items():
                set_module_tensor_to_device(layer, hooked[name], device, value=value, dtype=dtype)
        hidden = {
            task: _run_layer(layer, hidden[task], calls[task], batch_size, in_place=True)
            for task in windows
        }
        layer.to_empty(device="meta")
        release_freed_memory()


def _merge_units(
    layer: torch.nn.Module,
    layer_prefix: str,
    device: torch.device | str,
    hidden: Mapping[Hashable, torch.Tensor],
    calls: Mapping[Hashable, list[LayerCall]],
    batch_size: int,
) -> list[list[str]]:
    """The block's hooked tensors in units merged together, in the order the forward pass
    reaches them: tensors that share an input (q/k/v), and all experts of one fused tensor
    (their inputs all follow the router). One batch of one task is enough to see which tensor
    reads which input."""
    task = next(iter(hidden))
    with _HessianHooks(layer, layer_prefix, device) as hooks:
        _run_layer(layer, hidden[task][:batch_size], calls[task][:1], batch_size)
    unit_of: dict[str, str] = {}  # tensor -> the first tensor of its unit
    units: dict[str, list[str]] = {}
    for matrix, group in hooks.groups.items():
        tensor = tensor_of(matrix)
        unit = unit_of.setdefault(tensor, unit_of.get(tensor_of(group), tensor))
        if tensor not in units.setdefault(unit, []):
            units[unit].append(tensor)
    never_ran = [[tensor] for tensor in hooks.tensors if tensor not in unit_of]
    return [*units.values(), *never_ran]


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


# Checkpoint dtypes the calibration forward runs in as stored; any other (float8) runs in float32.
FORWARD_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def forward_dtype(stored: torch.dtype) -> torch.dtype:
    return stored if stored in FORWARD_DTYPES else torch.float32


def _materialise(
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
    """Hooks on a block's hooked tensors, accumulating each matrix's input Hessian.

    Matrices fed the same tensor share one accumulator (q/k/v, gate/up): identity, not equality,
    of the input defines sharing. Each expert of a fused MoE tensor has a Hessian of its own, from
    the tokens routed to it only, scaled like the dense ones (2 / sequences of the batch).
    """

    def __init__(
        self,
        layer: torch.nn.Module,
        layer_prefix: str,
        device: torch.device | str,
        only: Collection[str] | None = None,
        source: str = "",
    ):
        self.layer = layer
        self.layer_prefix = layer_prefix
        self.source = source  # "Model <name>: ", to start error messages with
        self.tensors = {
            f"{layer_prefix}.{name}": tensor for name, tensor in hooked_tensors(layer).items()
        }
        if only is not None:  # tensor names: hook just these
            self.tensors = {name: self.tensors[name] for name in only}
        self.device = device
        self.groups: dict[str, str] = {}  # matrix -> group, in the order the forward reaches them
        self.accumulators: dict[str, HessianAccumulator] = {}
        self.routed: dict[str, int] = {}  # expert matrix -> tokens routed to it
        self._sequences = 0  # sequences in the block's current batch
        self._seen: list[tuple[torch.Tensor, str]] = []  # inputs met in the current block call
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> _HessianHooks:
        experts: dict[int, tuple[HookedTensor, dict[str, str]]] = {}  # module -> kind -> tensor
        for name, tensor in self.tensors.items():
            if tensor.kind == "input":
                hook = self._input_hook(name, f"{self.layer_prefix}.{tensor.module_name}")
                self._handles.append(tensor.module.register_forward_pre_hook(hook))
            else:
                experts.setdefault(id(tensor.module), (tensor, {}))[1][tensor.kind] = name
        for tensor, names in experts.values():
            hook = self._experts_hook(f"{self.layer_prefix}.{tensor.module_name}", names)
            self._handles.append(tensor.module.register_forward_pre_hook(hook, with_kwargs=True))
        self._handles.append(
            self.layer.register_forward_pre_hook(self._start_call, with_kwargs=True)
        )
        self._handles.append(self.layer.register_forward_hook(lambda *_: self._seen.clear()))
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._seen.clear()

    def _start_call(self, _layer: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self._sequences = _argument(args, kwargs, 0, "hidden_states").shape[0]

    def _input_hook(self, tensor_name: str, where: str) -> Callable[..., None]:
        def hook(_module: torch.nn.Module, args: tuple) -> None:
            inputs = args[0]
            if tensor_name not in self.groups:
                self.groups[tensor_name] = self._group_of(inputs, tensor_name)
            if self.groups[tensor_name] == tensor_name:
                self._accumulate(tensor_name, inputs, where)

        return hook

    def _experts_hook(self, where: str, names: dict[str, str]) -> Callable[..., None]:
        """Per expert: the tokens routed to it (up projection's input) and their gated up
        projection (down projection's input). Every expert is accumulated on every batch, with
        no rows when no token came, so that all share the scale of the dense Hessians."""

        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = _argument(args, kwargs, 0, "hidden_states")
            hidden = hidden.reshape(-1, hidden.shape[-1])
            routing = _argument(args, kwargs, 1, "top_k_index").reshape(len(hidden), -1)
            for expert in range(module.down_proj.shape[0]):
                tokens = hidden[(routing == expert).any(dim=-1)]
                if "experts_up" in names:
                    matrix = expert_matrix_name(names["experts_up"], expert)
                    self._accumulate_expert(matrix, tokens, f"{where} (expert {expert})")
                if "experts_down" in names:
                    matrix = expert_matrix_name(names["experts_down"], expert)
                    inputs = _expert_intermediate(module, expert, tokens)
                    self._accumulate_expert(matrix, inputs, f"{where} (expert {expert} down)")

        return hook

    def _accumulate_expert(self, matrix: str, inputs: torch.Tensor, where: str) -> None:
        self.groups.setdefault(matrix, matrix)
        self.routed[matrix] = self.routed.get(matrix, 0) + len(inputs)
        self._accumulate(matrix, inputs, where)

    def _accumulate(self, group: str, inputs: torch.Tensor, where: str) -> None:
        _check_finite(inputs, where, self.source)
        if group not in self.accumulators:
            self.accumulators[group] = HessianAccumulator(inputs.shape[-1], self.device)
        self.accumulators[group].add_batch(inputs, sequences=self._sequences)

    def _group_of(self, inputs: torch.Tensor, matrix: str) -> str:
        for seen, group in self._seen:
            if seen is inputs:
                return group
        self._seen.append((inputs, matrix))
        return matrix

    def result(self) -> LayerHessians:
        # A matrix that never ran (e.g. an expert no token was routed to) gets an all-zero
        # Hessian and 0 samples: every column counts as dead, so its entries are ranked by |tau|.
        for name, tensor in self.tensors.items():
            for matrix in tensor.layout.matrix_names(name):
                if matrix not in self.groups:
                    self.groups[matrix] = matrix
                    self.accumulators[matrix] = HessianAccumulator(tensor.columns, self.device)
        samples = {name: acc.samples for name, acc in self.accumulators.items()}
        samples.update({matrix: 0 for matrix, tokens in self.routed.items() if not tokens})
        return LayerHessians(
            hessians={name: acc.hessian for name, acc in self.accumulators.items()},
            groups=dict(self.groups),
            samples=samples,
            layouts={
                name: tensor.layout
                for name, tensor in self.tensors.items()
                if tensor.layout != TensorLayout()
            },
        )


def _argument(args: tuple, kwargs: dict, position: int, name: str) -> Any:
    return args[position] if len(args) > position else kwargs[name]


def _expert_intermediate(
    module: torch.nn.Module, expert: int, inputs: torch.Tensor
) -> torch.Tensor:
    """The input of expert ``expert``'s down projection: its gated up projection of ``inputs``,
    computed as transformers' experts kernels (``batched_mm_experts_forward``) compute it."""
    up = "gate_up_proj" if module.has_gate else "up_proj"
    weight = getattr(module, up)[expert]
    projected = inputs @ weight if module.is_transposed else inputs @ weight.T
    if module.has_bias:
        projected = projected + getattr(module, f"{up}_bias")[expert]
    return module._apply_gate(projected) if module.has_gate else module.act_fn(projected)


def _source(load_tensor: TensorSource) -> str:
    """ "Model <name>: " when ``load_tensor`` is a checkpoint reader that names its model."""
    model = getattr(load_tensor, "model", None)
    return f"Model {model}: " if model is not None else ""


def _check_finite(inputs: torch.Tensor, where: str, source: str = "") -> None:
    """Inf/NaN inputs would make the Hessian non-finite; say where they first appear."""
    finite = torch.isfinite(inputs)
    if finite.all():
        return
    if inputs.dtype == torch.float16:
        cause, fix = (
            " (float16 overflow?)",
            "float16 holds values up to 65504 only. Convert the model to bfloat16 or float32 "
            "(load it, .to(torch.bfloat16), save_pretrained) and merge that copy.",
        )
    else:
        cause, fix = "", "Check the checkpoint for inf/NaN weights."
    raise ActivationError(
        f"{source}Non-finite activations entering {where}{cause}: {int((~finite).sum())} of "
        f"{inputs.numel()} values are non-finite (inf/NaN) in the "
        f"{str(inputs.dtype).removeprefix('torch.')} calibration forward pass. {fix}"
    )
