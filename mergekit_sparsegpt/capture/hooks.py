"""Forward hooks that accumulate the input Hessians of a decoder block's hooked tensors."""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import torch

from mergekit_sparsegpt.capture.accumulate import (
    DiagonalAccumulator,
    HessianAccumulator,
    LayerHessians,
    TensorLayout,
    expert_matrix_name,
)
from mergekit_sparsegpt.capture.architecture import HookedTensor, hooked_tensors
from mergekit_sparsegpt.capture.model import TensorSource


class ActivationError(ValueError):
    """Inf/NaN activations in the calibration forward pass, named by the layer they enter."""


class UnitCaptured(Exception):
    """Raised by hooks with ``stop_when_captured`` once every hooked tensor has taken its input
    in the current block call: the rest of the block computes nothing they need."""


class HessianHooks:
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
        stop_when_captured: bool = False,
        diagonal: bool = False,
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
        self.stop_when_captured = stop_when_captured
        # Only diag H of every linear input: a merge that reads nothing else (issue 17).
        self.diagonal = diagonal
        self._captured: set[str] = set()  # tensors that took their input in this block call
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> HessianHooks:
        experts: dict[int, tuple[HookedTensor, dict[str, str]]] = {}  # module -> kind -> tensor
        for name, tensor in self.tensors.items():
            where = f"{self.layer_prefix}.{tensor.module_name}"
            if tensor.kind == "input":
                hook = self._input_hook(name, where)
                self._handles.append(tensor.module.register_forward_pre_hook(hook))
            elif tensor.kind == "norm":
                self._handles.append(
                    tensor.module.register_forward_hook(self._norm_hook(name, where))
                )
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
        self._seen.clear()
        self._captured.clear()

    def _captured_input(self, *tensor_names: str) -> None:
        """``tensor_names`` took this call's input: with ``stop_when_captured``, stop the block
        once every hooked tensor has."""
        self._captured.update(tensor_names)
        if self.stop_when_captured and self._captured >= self.tensors.keys():
            raise UnitCaptured

    def _input_hook(self, tensor_name: str, where: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple) -> None:
            inputs = args[0]
            if tensor_name not in self.groups:
                self.groups[tensor_name] = self._group_of(inputs, tensor_name)
            if self.groups[tensor_name] == tensor_name:
                biased = getattr(module, "bias", None) is not None
                self._accumulate(tensor_name, inputs, where, sums=biased)
            self._captured_input(tensor_name)

        return hook

    def _norm_hook(self, tensor_name: str, where: str) -> Callable[..., None]:
        """The norm's scale multiplies its normalized input channel by channel: accumulate
        that input's per-channel energy (the diagonal of its Hessian)."""

        def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            self.groups.setdefault(tensor_name, tensor_name)
            if tensor_name not in self.accumulators:
                self.accumulators[tensor_name] = DiagonalAccumulator(
                    module.weight.shape[-1], self.device
                )
            accumulator = self.accumulators[tensor_name]
            add_normalized_input(
                accumulator, module, args, output, where, self.source, self._sequences
            )
            self._captured_input(tensor_name)

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
            self._captured_input(*names.values())

        return hook

    def _accumulate_expert(self, matrix: str, inputs: torch.Tensor, where: str) -> None:
        self.groups.setdefault(matrix, matrix)
        self.routed[matrix] = self.routed.get(matrix, 0) + len(inputs)
        self._accumulate(matrix, inputs, where)

    def _accumulate(self, group: str, inputs: torch.Tensor, where: str, sums: bool = False) -> None:
        if group not in self.accumulators:
            self.accumulators[group] = self._linear_accumulator(inputs.shape[-1], sums)
        accumulator = self.accumulators[group]
        accumulator.add_batch(inputs, sequences=self._sequences)
        check_finite_activations(inputs, where, self.source, accumulator.diagonal)

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
                    self.accumulators[matrix] = (
                        DiagonalAccumulator(tensor.columns, self.device)
                        if tensor.kind == "norm"
                        else self._linear_accumulator(tensor.columns)
                    )
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
            sums={name: a.sums for name, a in self.accumulators.items() if a.sums is not None},
            estimated=frozenset(self._estimated),
        )

    def _linear_accumulator(self, columns: int, sums: bool = False) -> HessianAccumulator:
        """A linear input's accumulator: its whole H, or with ``diagonal`` its diagonal."""
        if self.diagonal:
            return DiagonalAccumulator(columns, self.device)
        return HessianAccumulator(columns, self.device, sums)

    @property
    def _estimated(self) -> set[str]:
        norms = {name for name, tensor in self.tensors.items() if tensor.kind == "norm"}
        return set(self.accumulators) - norms if self.diagonal else set()


def normalized_input(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """What the norm's scale multiplies, in float32: its output with the scale raised by one
    minus its ``output``, which is that input for every norm whose output is affine in its
    weight (RMSNorm's w * x_hat, LayerNorm's w * x_hat + b, Gemma's (1 + w) * x_hat). A float32
    ``output`` is used as it is; a half-precision one is recomputed in float32, so that its
    rounding does not enter x_hat."""
    raised = _float32_forward(module, args, weight_shift=1.0)
    if output.dtype == torch.float32:
        return raised.sub_(output)
    return raised.sub_(_float32_forward(module, args, weight_shift=0.0))


def add_normalized_input(
    accumulator: HessianAccumulator,
    module: torch.nn.Module,
    args: tuple,
    output: torch.Tensor,
    where: str,
    source: str = "",
    sequences: int | None = None,
) -> None:
    """Add a norm call's normalized input to ``accumulator``; a non-finite input of the norm is
    refused, named ``where``."""
    accumulator.add_batch(normalized_input(module, args, output), sequences)
    check_finite_activations(args[0], where, source, accumulator.diagonal)


def _float32_forward(module: torch.nn.Module, args: tuple, weight_shift: float) -> torch.Tensor:
    """``module.forward`` in float32 with ``weight_shift`` added to its weight. ``forward``
    itself runs, not the module: its hooks (the caller among them) stay out. Its parameters
    are swapped for float32 copies for the call and put back."""
    own = dict(module._parameters)
    parameters = {name: p.float() for name, p in own.items() if p is not None}
    parameters["weight"] = parameters["weight"] + weight_shift
    try:
        module._parameters.update(parameters)
        return module.forward(args[0].float(), *args[1:])
    finally:
        module._parameters.update(own)


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


def error_source(load_tensor: TensorSource) -> str:
    """ "Model <name>: " when ``load_tensor`` is a checkpoint reader that names its model."""
    model = getattr(load_tensor, "model", None)
    return f"Model {model}: " if model is not None else ""


def check_finite_activations(
    inputs: torch.Tensor, where: str, source: str = "", accumulated: torch.Tensor | None = None
) -> None:
    """Inf/NaN inputs would make the Hessian non-finite; say where they first appear.

    ``accumulated``: the diagonal they were just added to, finite exactly when they all were
    (short of float32 overflow), so a pass over the activations is needed only when it is not."""
    if accumulated is not None and torch.isfinite(accumulated).all():
        return
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
