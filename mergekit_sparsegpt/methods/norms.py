"""RegMean on a norm's scale: a diagonal linear, solved channel by channel.

A norm computes y = w * x_hat (+ b), x_hat its normalized input (Gemma's 1 + w scales the same
x_hat): a linear whose weight is diag(w). Its least-squares merge over every model's inputs,
argmin_w sum_i w_i ||(w - w_i) * X_hat_i||^2, separates by channel: w[c] = w_base[c] +
sum_i w_i E_i[c] tau_i[c] / sum_i w_i E_i[c], E_i[c] = H_i[c, c] the energy of channel c of
the task's normalized input (the pre-pass captures it as the diagonal of that input's Hessian).

``norm_rule``: "energy" (that solve; for the trimming methods, the scale trimmed and combined
as a linear with H = diag(E)), "mean" (every channel weighted alike: the plain weighted mean of
the task vectors) or "stock" (the method's statistics-free rule).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from mergekit.merge_methods.base import TensorGroup

from mergekit_sparsegpt.capture.accumulate import TensorLayout
from mergekit_sparsegpt.methods.parameters import Choice
from mergekit_sparsegpt.methods.tokens import count_weighted_delta
from mergekit_sparsegpt.statistics.task_statistics import TensorStatistics

NORM_RULES = ("mean", "energy", "stock")
# "mean": chosen on validation over "energy" and "stock" for regmean, sparsegpt_regmean and
# sparsegpt_ties in each of the quality benchmark's families (docs/quality-benchmark.md);
# sparsegpt_dare keeps its stock rule (not measured).
NORM_RULE = Choice("norm_rule", NORM_RULES, NORM_RULES[0])
# The report paths of the two rules with statistics, and the run summary's label of the mean.
NORM_PATHS = {"energy": "norm", "mean": "norm-mean"}
MEAN_SUMMARY = (NORM_PATHS["mean"], "plain mean of the norm scales (norm_rule: mean)")


def is_scale(tensor: torch.Tensor) -> bool:
    """A tensor with statistics that is a vector: a norm's scale (the only such kind)."""
    return tensor.dim() == 1


def channel_energies(
    group: TensorGroup, statistics: Mapping[Any, TensorStatistics | None], rule: str
) -> list[torch.Tensor]:
    """Every model's E_i[c] in ``group.non_base``'s order for ``rule`` "energy"; ones (every
    channel alike: the plain mean) for "mean" and for a model without statistics."""
    ones = torch.ones_like(group.base.tensor, dtype=torch.float32)
    found = [statistics.get(entry.id) if rule == "energy" else None for entry in group.non_base]
    return [ones if stats is None else stats.matrices[0].hessian_diagonal for stats in found]


def scale_delta(
    group: TensorGroup, weights: Sequence[float], energies: Sequence[torch.Tensor]
) -> torch.Tensor:
    """sum_i w_i E_i tau_i / sum_i w_i E_i, channel by channel (the "energy" solve; ones for
    the energies give the plain weighted mean)."""
    base = group.base.tensor
    task_vectors = [(entry.tensor - base).unsqueeze(-1) for entry in group.non_base]
    return count_weighted_delta(task_vectors, energies, weights, 0.0).squeeze(-1)


def scale_as_linear(statistics: TensorStatistics) -> TensorStatistics:
    """The scale's statistics for a [channels, 1] view of it, read as [in, out]: the linear
    diag(w) restricted to the entries it has, each its own input column."""
    return TensorStatistics(TensorLayout(input_axis=-2), statistics.matrices, statistics.samples)
