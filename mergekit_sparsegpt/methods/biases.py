"""RegMean on a linear with a bias: the weight and the bias solved together.

y = W x + b is the linear [W, b] on the input [x; 1], whose Gram (on the Hessian's scale) is

    G' = [[G, s], [s^T, t]],   s = (2/n) sum x,   t = (2/n) tokens,

so RegMean on G' (the pre-pass keeps [s, t] beside H for every input a biased linear reads) is
the exact least-squares merge of weight and bias together. The two tensors are merged by two
kernel calls: each solves the same system, reading the other tensor of every model, and keeps
its own part. The trimming methods keep their stock rule for a bias: its input is the
constant 1 in every task, so its importance is its magnitude and its energy the same in every
model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mergekit_sparsegpt.methods.context import LinearBias
from mergekit_sparsegpt.methods.solve import Solve, regmean_delta
from mergekit_sparsegpt.statistics.hessian import DIAGONAL, HessianStatistics
from mergekit_sparsegpt.statistics.task_statistics import TensorStatistics

# Why the trimming methods take their stock rule for a linear's bias.
CONSTANT_INPUT = "a bias reads the constant 1: its importance is its magnitude"


def missing_sums(statistics: Mapping[Any, TensorStatistics | None]) -> bool:
    """Whether a model's statistics lack the input sums a joint solve needs (or hold several
    matrices: fused experts' biases are not solved)."""
    return any(
        stats is None or len(stats.matrices) != 1 or stats.matrices[0].input_sum is None
        for stats in statistics.values()
    )


def bias_refusal(linear: LinearBias, weights_read: bool) -> str | None:
    """Why a bias cannot be solved with its weight (None: it can)."""
    if any(
        s is not None and s.matrices[0].inverse_path == DIAGONAL for s in linear.statistics.values()
    ):
        return "a norm's bias: its channel sums are not captured"
    if missing_sums(linear.statistics):
        return f"the input sums of {linear.weight} were not captured"
    if not weights_read:
        return f"{linear.weight} is not merged with it"
    return None


def augmented_gram(statistics: HessianStatistics) -> torch.Tensor:
    """[[G, s], [s^T, t]] from the whole Hessian G and the input sums [s, t]."""
    assert statistics.hessian is not None and statistics.input_sum is not None
    columns = len(statistics.hessian)
    gram = statistics.hessian.new_empty(columns + 1, columns + 1)
    gram[:columns, :columns] = statistics.hessian
    gram[columns] = statistics.input_sum
    gram[:, columns] = statistics.input_sum
    return gram


def joint_delta(
    weight_deltas: Sequence[torch.Tensor],
    bias_deltas: Sequence[torch.Tensor],
    grams: Sequence[torch.Tensor],
    weights: Sequence[float],
    alpha: float,
) -> Solve:
    """RegMean's solve of [W, b] ([out, in + 1]) from every model's [tau_W, tau_b] and G'."""
    augmented = [
        torch.cat([tau_w, tau_b.to(tau_w.device, tau_w.dtype).unsqueeze(-1)], dim=-1)
        for tau_w, tau_b in zip(weight_deltas, bias_deltas, strict=True)
    ]
    return regmean_delta(augmented, grams, weights, alpha)
