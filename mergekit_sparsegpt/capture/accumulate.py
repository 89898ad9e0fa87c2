"""What a capture accumulates: each linear input's sum of x x^T, and how a tensor's matrices
are laid out.

``HessianAccumulator`` is SparseGPT's ``add_batch``. It needs only torch, so the statistics and the
merge kernels can read these types without loading transformers."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


class HessianAccumulator:
    """Running average of H = (2/n) * sum X X^T over calibration batches.

    As in SparseGPT, n counts sequences (the leading dimension of a 3-D input), not tokens; the
    scale cancels in every importance score and in the relative damping.
    """

    def __init__(
        self, columns: int, device: torch.device | str = "cpu", sums: bool = False
    ) -> None:
        self.hessian = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.samples = 0
        # For a linear with a bias, whose input is [x; 1]: the last row of that input's Gram,
        # (2/n) [sum x, tokens], on the same scale as H.
        self.sums = torch.zeros(columns + 1, dtype=torch.float32, device=device) if sums else None

    def add_batch(self, inputs: torch.Tensor, sequences: int | None = None) -> None:
        """Add the rows of ``inputs`` (any leading shape); ``sequences`` is how many sequences
        they come from, by default the leading dimension of a 3-D input (else 1). A MoE expert
        sees a 2-D subset of a batch's tokens, still counted as the batch's sequences so that its
        Hessian has the scale of the dense linears' (and of the same expert in other tasks)."""
        if sequences is None:
            sequences = inputs.shape[0] if inputs.dim() > 2 else 1
        rows = inputs.reshape(-1, inputs.shape[-1]).to(self.hessian.device, torch.float32)
        kept = self.samples / (self.samples + sequences)
        self.hessian *= kept
        self.samples += sequences
        self._add_rows(rows, 2 / self.samples)
        if self.sums is not None:
            self.sums *= kept
            self.sums[:-1].add_(rows.sum(dim=0), alpha=2 / self.samples)
            self.sums[-1] += 2 * len(rows) / self.samples

    @property
    def diagonal(self) -> torch.Tensor:
        """diag H: finite exactly when every row added was (NaN and inf propagate)."""
        return torch.diagonal(self.hessian)

    def _add_rows(self, rows: torch.Tensor, scale: float) -> None:
        # Scaled inside the product: a scaled copy of the rows would be one more batch of
        # activations (for a 7B Llama's down_proj at the default batch, 180 MiB).
        self.hessian.addmm_(rows.t(), rows, alpha=scale)


class DiagonalAccumulator(HessianAccumulator):
    """The diagonal of ``HessianAccumulator``'s H alone, (2/n) * sum x^2 per column: all a
    diagonal linear (a norm's scale, y = w * x) has, at the cost of one pass over the rows."""

    def __init__(self, columns: int, device: torch.device | str = "cpu") -> None:
        self.hessian = torch.zeros(columns, dtype=torch.float32, device=device)
        self.samples = 0
        self.sums = None

    @property
    def diagonal(self) -> torch.Tensor:
        return self.hessian

    def _add_rows(self, rows: torch.Tensor, scale: float) -> None:
        self.hessian.add_((rows * rows).sum(dim=0), alpha=scale)


# Name of expert ``e``'s matrix in a fused MoE tensor: "model.layers.0.mlp.experts.down_proj[3]".
_EXPERT_MATRIX = re.compile(r"^(?P<tensor>.*)\[(?P<expert>\d+)\]$")


def expert_matrix_name(tensor_name: str, expert: int) -> str:
    return f"{tensor_name}[{expert}]"


def tensor_of(matrix_name: str) -> str:
    """The checkpoint tensor that holds a matrix (itself, unless it is one expert's)."""
    match = _EXPERT_MATRIX.match(matrix_name)
    return match["tensor"] if match else matrix_name


@dataclass(frozen=True)
class TensorLayout:
    """Where the linear maps of one checkpoint tensor lie, relative to their input Hessians.

    ``nn.Linear`` stores W as [out, in], so the Hessian is over the last axis (-1); GPT-2's
    ``Conv1D`` stores [in, out] (-2). Fused MoE experts (transformers 5) stack one matrix per
    expert on a leading axis, [experts, out, in] or [experts, in, out]. The importance scores,
    masks, compensation and RegMean solves all work on [out, in] matrices: ``matrices`` gives
    them as views, ``assemble`` puts results back in the checkpoint's layout.
    """

    input_axis: int = -1  # -1: [out, in]; -2: [in, out]
    experts: int = 0  # 0: the tensor is one matrix; n: n matrices on axis 0

    def matrix_names(self, tensor_name: str) -> list[str]:
        if not self.experts:
            return [tensor_name]
        return [expert_matrix_name(tensor_name, e) for e in range(self.experts)]

    def matrices(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """The tensor's matrices as [out, in] views."""
        stacked = tensor if self.experts else tensor.unsqueeze(0)
        if stacked.dim() != 3 or (self.experts and len(stacked) != self.experts):
            raise ValueError(
                f"A tensor of shape {tuple(tensor.shape)} does not hold "
                f"{self.experts or 1} matrices"
            )
        if self.input_axis == -2:
            stacked = stacked.transpose(-1, -2)
        return list(stacked.unbind(0))

    def assemble(self, matrices: Sequence[torch.Tensor]) -> torch.Tensor:
        """Inverse of ``matrices``: one contiguous tensor in the checkpoint's layout."""
        stacked = torch.stack(list(matrices))
        if self.input_axis == -2:
            stacked = stacked.transpose(-1, -2)
        return (stacked if self.experts else stacked[0]).contiguous()

    def to_json(self) -> list[int]:
        return [self.input_axis, self.experts]

    @classmethod
    def from_json(cls, value: list[int]) -> TensorLayout:
        input_axis, experts = (int(v) for v in value)
        if input_axis not in (-1, -2) or experts < 0:
            raise ValueError(f"tensor layout {value!r}")
        return cls(input_axis, experts)


@dataclass
class LayerHessians:
    """Hessians of one decoder block: one per distinct linear input (q/k/v share one).

    Keys are matrix names: a checkpoint tensor's name, or ``tensor[e]`` for expert ``e`` of a
    fused MoE tensor. ``layouts`` holds every tensor whose matrices are not plain [out, in].
    """

    hessians: dict[str, torch.Tensor]  # group name (first reader's matrix name) -> H
    groups: dict[str, str]  # matrix name -> group name
    samples: dict[str, int]  # group name -> sequences seen (0 if the linear never ran)
    layouts: dict[str, TensorLayout] = field(default_factory=dict)
    # group name -> (2/n) [sum x, tokens], for the groups a linear with a bias reads
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    # groups whose H is a linear's diagonal alone (``hessians`` holds it as a vector), not a
    # diagonal H (a norm's)
    estimated: frozenset[str] = frozenset()

    def tensor_names(self) -> list[str]:
        """The checkpoint tensors these Hessians cover, in the order the forward reaches them."""
        return list(dict.fromkeys(tensor_of(matrix) for matrix in self.groups))
