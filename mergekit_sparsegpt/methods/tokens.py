"""RegMean on the token embedding: the count-weighted merge, and the tied-embedding rule.

An embedding is a linear whose input is the one-hot token, so its Gram is diag(c), c the
calibration windows' count of each token, and RegMean's solve is a per-row weighted mean: for
token t, E[t] = E_base[t] + sum_i w_i c_i(t) tau_i[t] / sum_i w_i c_i(t). Each expert's rows
are taken where its own text uses them. ``token_smoothing`` s is added to every count, so a
token no task used gets the weighted mean of the task vectors (and c_i + s > 0 keeps every
row's system solvable).

Tied embeddings (one tensor, the embedding and the head): the head's RegMean solve fits the
logits, the count rule fits the embedding's outputs; ``tied_embeddings`` picks one ("tokens", the
default, or "head") or their mean ("blend").

The trimming methods read the same counts as a linear's Hessian (``counts_as_linear``): the
embedding is a linear with one-hot inputs, H = diag(counts), so ``wanda``'s tau^2 H_cc is
tau[t]^2 (c(t) + s) per token row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from mergekit.merge_methods.base import ParameterScope, ParameterSpec

from mergekit_sparsegpt.capture.accumulate import TensorLayout
from mergekit_sparsegpt.methods.parameters import Choice
from mergekit_sparsegpt.statistics.hessian import diagonal_statistics
from mergekit_sparsegpt.statistics.task_statistics import TensorStatistics, TokenStatistics

# "stock": the method's statistics-free rule (RegMean: task arithmetic x nongram_scale).
EMBEDDING_RULES = ("tokens", "stock")
EMBEDDING_RULE = Choice("embedding_rule", EMBEDDING_RULES, EMBEDDING_RULES[0])
# "tokens": chosen on validation in the quality benchmark's tied family (docs/quality-benchmark.md;
# the head's solve alone ignores the tensor's role as the embedding, and lost there).
TIED_RULES = ("tokens", "blend", "head")
TIED_EMBEDDINGS = Choice("tied_embeddings", TIED_RULES, TIED_RULES[0])
TOKEN_PARAMETERS: tuple[ParameterSpec, ...] = (
    EMBEDDING_RULE.spec,
    ParameterSpec("token_smoothing", float, ParameterScope.SHARED, default=0.5),
)
TIED_PARAMETERS: tuple[ParameterSpec, ...] = (TIED_EMBEDDINGS.spec,)


def check_token_parameters(shared: Mapping[str, Any]) -> None:
    EMBEDDING_RULE.check(shared)
    TIED_EMBEDDINGS.check(shared)
    smoothing = shared.get("token_smoothing", 0.0)
    if not smoothing >= 0 or smoothing == float("inf"):
        raise ValueError(
            f"token_smoothing must be a finite count >= 0, got {smoothing}: it is added to "
            "every token's calibration count in every task"
        )


def token_rule_refusal(
    parameters: Mapping[str, Any], tokens: Mapping[Any, TokenStatistics], base: torch.Tensor
) -> str | None:
    """Why the token embedding takes the stock rule (None: it does not)."""
    if parameters["embedding_rule"] != "tokens":
        return f"embedding_rule: {parameters['embedding_rule']}"
    rows = {len(stats.counts) for stats in tokens.values()}
    if rows != {base.shape[0]}:
        return (
            f"the merge's vocabulary ({base.shape[0]} rows) is not the calibrated one "
            f"({', '.join(map(str, sorted(rows)))}): tokenizer_source changed it"
        )
    return None


def counts_as_linear(counts: torch.Tensor, smoothing: float) -> TensorStatistics:
    """The embedding's statistics as those of a linear whose input columns are the tokens
    (its [vocabulary, hidden] weight read as [in, out]): H = diag(c + s), whose inverse and
    Cholesky factor are diagonal too, so every importance score reads them exactly. A column
    with c + s = 0 is dead, as in ``hessian_statistics``: its diagonal is set to 1."""
    statistics = diagonal_statistics(counts.to(torch.float32) + smoothing)
    return TensorStatistics(TensorLayout(input_axis=-2), (statistics,), (int(counts.sum()),))


def count_weighted_delta(
    task_vectors: Sequence[torch.Tensor],
    counts: Sequence[torch.Tensor],
    weights: Sequence[float],
    smoothing: float,
) -> torch.Tensor:
    """sum_i w_i (c_i + s) tau_i / sum_i w_i (c_i + s), row by row ([vocabulary, hidden] task
    vectors, [vocabulary] counts); a zero row where every w_i (c_i + s) is 0."""
    device = task_vectors[0].device
    numerator = torch.zeros(task_vectors[0].shape, dtype=torch.float32, device=device)
    denominator = torch.zeros(len(counts[0]), dtype=torch.float32, device=device)
    for tau, count, weight in zip(task_vectors, counts, weights, strict=True):
        row_weight = (count.to(device, torch.float32) + smoothing) * weight
        numerator.addcmul_(tau.to(torch.float32), row_weight.unsqueeze(-1))
        denominator.add_(row_weight)
    safe = torch.where(denominator == 0, torch.ones_like(denominator), denominator)
    return numerator / safe.unsqueeze(-1)
