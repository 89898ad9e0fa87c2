"""Second-order importance of task-vector entries and the top-density mask.

Every score is tau[r, c]^2 times a per-input-column weight, so a score is one column vector
broadcast over the output rows of W[out, in]; only the column weight differs:

- ``obs``          tau^2 / [H^-1]_cc   Optimal Brain Surgeon saliency (cost of dropping the entry
                                       when the rest of its row is re-fitted optimally)
- ``sparsegpt``    tau^2 / U_cc^2      what SparseGPT's code computes, U = chol(H^-1) upper; with
                                       its sequential weight updates this is exact OBS
- ``wanda``        tau^2 * H_cc        true cost of dropping the entry when the kept entries are
                                       not updated (Wanda's score, squared)
- ``design_note``  tau^2 / [H^-1]_cc^2 the formula of the original design note (a misreading of
                                       SparseGPT, kept for reproduction only)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mergekit_sparsegpt.statistics.hessian import HessianStatistics

ColumnWeight = Callable[[HessianStatistics], torch.Tensor]

COLUMN_WEIGHTS: dict[str, ColumnWeight] = {
    "obs": lambda stats: stats.inverse_diagonal.reciprocal(),
    "sparsegpt": lambda stats: stats.cholesky_diagonal.square().reciprocal(),
    "wanda": lambda stats: stats.hessian_diagonal,
    "design_note": lambda stats: stats.inverse_diagonal.square().reciprocal(),
}

# The scores that read only diag H: a merge using nothing else needs no whole Hessian.
DIAGONAL_IMPORTANCES = frozenset({"wanda"})

# Chosen by the measurement in docs/how-it-works.md: with task vectors trimmed
# and *not* re-fitted, the no-update cost is the quantity a trim actually pays.
DEFAULT_IMPORTANCE = "wanda"


def validate_importance(name: str) -> str:
    if name not in COLUMN_WEIGHTS:
        raise ValueError(
            f"Unknown importance {name!r}; choose one of {', '.join(sorted(COLUMN_WEIGHTS))}"
        )
    return name


def importance_scores(
    task_vector: torch.Tensor, statistics: HessianStatistics, importance: str
) -> torch.Tensor:
    """Score every entry of a W[out, in] task vector; float32, same shape."""
    if statistics.is_estimate and validate_importance(importance) not in DIAGONAL_IMPORTANCES:
        raise ValueError(
            f"importance {importance!r} reads H^-1, but these statistics hold only diag H (a "
            "merge that read nothing else computed them); the pre-pass computes whole ones for "
            "this merge: delete that cache entry if it was used"
        )
    column_weight = COLUMN_WEIGHTS[validate_importance(importance)](statistics)
    if task_vector.dim() != 2 or task_vector.shape[1] != column_weight.numel():
        raise ValueError(
            f"Task vector of shape {tuple(task_vector.shape)} does not match a Hessian over "
            f"{column_weight.numel()} input columns"
        )
    column_weight = column_weight.to(task_vector.device, torch.float32)
    return task_vector.float().square() * column_weight.unsqueeze(0)


SELECTIONS = ("tensor", "row")


def top_density_mask(
    scores: torch.Tensor, density: float, selection: str = "tensor"
) -> torch.Tensor:
    """Keep the top ``density`` fraction by score, with mergekit ``magnitude``'s edge cases.

    ``selection="tensor"`` ranks the whole tensor; ``"row"`` keeps the top fraction of every
    output row (Wanda's comparison group), so each output keeps the same share of its entries.
    Density >= 1 keeps all, <= 0 (or an empty tensor) keeps none, and a positive density keeps
    at least one entry per group; exactly k = max(1, int(density * group size)) entries are kept,
    ties at the threshold broken by position like mergekit's argsort.
    """
    if selection not in SELECTIONS:
        raise ValueError(f"Unknown selection {selection!r}; choose one of {', '.join(SELECTIONS)}")
    if density >= 1:
        return torch.ones_like(scores, dtype=torch.bool)
    if density <= 0 or scores.numel() == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    rows = scores.reshape(-1, scores.shape[-1]) if selection == "row" else scores.reshape(1, -1)
    rows = rows.float()
    k = max(1, int(density * rows.shape[1]))
    kept, keep = torch.topk(rows, k, dim=1, sorted=False)
    threshold = kept.min(dim=1, keepdim=True).values
    # topk (much faster than a sort) picks the same set unless entries equal to the k-th largest
    # straddle the cut; then only a sort breaks the tie as mergekit's magnitude does.
    if ((rows == threshold).sum(dim=1) != (kept == threshold).sum(dim=1)).any():
        keep = torch.argsort(rows, dim=1, descending=True)[:, :k]
    mask = torch.zeros_like(rows, dtype=torch.bool)
    mask.scatter_(1, keep, True)
    return mask.reshape(scores.shape)
