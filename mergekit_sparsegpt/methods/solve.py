"""RegMean's solve: the merged task vector of one linear from every model's Gram matrix.

    W = W_base + (sum_i w_i tau_i G~_i) (sum_i w_i G~_i)^-1,
    G~_i = alpha G_i + (1 - alpha) diag(G_i),

solved by Cholesky, ridge steps, then the pseudo-inverse (``solve_right``), and each model's
Gram of a tensor's matrices read from its statistics with one clear error when unusable.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from mergekit.merge_methods.base import TensorGroup

from mergekit_sparsegpt.statistics.hessian import HessianStatistics, first_cholesky
from mergekit_sparsegpt.statistics.task_statistics import TensorStatistics
from mergekit_sparsegpt.trim.trim import matrix_views

# The Gram matrices are stored in float32, so directions whose curvature is within rounding of
# zero are noise: solving exactly along them would put arbitrary values into the merged weights
# (off the calibration inputs). A squared Cholesky pivot below this fraction of the mean
# diagonal marks the system as numerically singular.
PIVOT_FLOOR = 1e-6
# Ridge steps, relative to the mean diagonal, tried in turn after an unsafe exact solve; each is
# above PIVOT_FLOOR, so a positive semi-definite system passes at the first. Then pinv.
SOLVE_DAMPING_LADDER = (1e-5, 1e-4, 1e-3, 1e-2)
SOLVE_PATHS = ("cholesky", "damped", "pinv")


@dataclass(frozen=True)
class Solve:
    """The merged task vector (float64) and how the linear system was solved."""

    delta: torch.Tensor
    path: str  # one of SOLVE_PATHS
    damping: float  # ridge added, relative to the mean diagonal (0 unless path == "damped")


def regularised_gram(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * G + (1 - alpha) * diag(G), in float64."""
    regularised = gram.to(torch.float64, copy=True).mul_(alpha)
    regularised.diagonal().copy_(gram.diagonal())  # alpha g + (1 - alpha) g = g
    return regularised


def regmean_delta(
    task_vectors: Sequence[torch.Tensor],
    grams: Sequence[torch.Tensor],
    weights: Sequence[float],
    alpha: float,
) -> Solve:
    """(sum_i w_i tau_i G~_i) (sum_i w_i G~_i)^-1 for task vectors tau_i [out, in]."""
    out_features, in_features = task_vectors[0].shape
    device = task_vectors[0].device
    lhs = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
    rhs = torch.zeros(out_features, in_features, dtype=torch.float64, device=device)
    # Accumulated one model at a time: at most three [in, in] matrices live at once.
    for tau, gram, weight in zip(task_vectors, grams, weights, strict=True):
        regularised = regularised_gram(gram.to(device), alpha)
        lhs.add_(regularised, alpha=weight)
        rhs.addmm_(tau.to(torch.float64), regularised, alpha=weight)
        del regularised
    return solve_right(rhs, lhs)


def solve_right(rhs: torch.Tensor, lhs: torch.Tensor) -> Solve:
    """X with X @ lhs = rhs for a symmetric ``lhs``: Cholesky, then ridge steps, then pinv."""
    scale = lhs.diagonal().mean().item()
    if math.isfinite(scale) and scale > 0:
        dampings = (0.0, *SOLVE_DAMPING_LADDER)
        ridges = [damping * scale for damping in dampings]
        start = 0
        while (found := first_cholesky(lhs, ridges[start:])) is not None:
            step, lower = found
            start += step + 1
            solution = _cholesky_solve(rhs, lower, PIVOT_FLOOR * scale)
            if solution is not None:
                damping = dampings[start - 1]
                return Solve(solution, "damped" if damping else "cholesky", damping)
    # Reached for an all-zero system (a linear no calibration token reached in any model):
    # the minimum-norm solution is a zero task vector, i.e. the base weight.
    inverse = torch.linalg.pinv(lhs, hermitian=True, rtol=PIVOT_FLOOR)
    return Solve(rhs @ inverse, "pinv", 0.0)


def _cholesky_solve(
    rhs: torch.Tensor, lower: torch.Tensor, pivot_floor: float
) -> torch.Tensor | None:
    """The solution from the (ridged) system's factor ``lower``, or None when that system is
    not safely positive definite."""
    if lower.diagonal().square().min().item() < pivot_floor:
        return None
    # X lhs = rhs  <=>  lhs X^T = rhs^T, since lhs is symmetric: a left solve.
    solution = torch.cholesky_solve(rhs.T, lower).T
    return solution if torch.isfinite(solution).all() else None


def solve_details(solves: list[Solve]) -> dict[str, Any]:
    """The report's solve entry; for fused experts, the least exact path taken by any expert,
    and each expert's own."""
    worst = max(solves, key=lambda solve: (SOLVE_PATHS.index(solve.path), solve.damping))
    details: dict[str, Any] = {"path": worst.path, "damping": worst.damping}
    if len(solves) > 1:
        details["experts"] = [{"path": s.path, "damping": s.damping} for s in solves]
    return details


def model_grams(
    group: TensorGroup, model: Any, statistics: TensorStatistics | None, name: str
) -> list[torch.Tensor]:
    """The model's whole Hessian of every matrix of this tensor, or one clear error why they
    cannot be used."""
    where = f"{name} of model {model}"
    if statistics is None:
        raise ValueError(f"{where} has no Hessian, though other models have one for this tensor")
    matrices = matrix_views(statistics.layout, group.base.tensor, where)
    pairs = zip(matrices, statistics.matrices, strict=True)
    return [_gram(matrix, stats, where) for matrix, stats in pairs]


def _gram(matrix: torch.Tensor, statistics: HessianStatistics, where: str) -> torch.Tensor:
    if statistics.hessian is None:
        raise ValueError(
            f"{where}: RegMean needs the whole Hessian, which these statistics lack (they were "
            "computed for another method); delete that statistics cache entry"
        )
    columns = statistics.hessian.shape[0]
    if matrix.shape[1] != columns:
        raise ValueError(
            f"{where}: a matrix of shape {tuple(matrix.shape)} does not match a Hessian over "
            f"{columns} input columns"
        )
    return statistics.hessian
