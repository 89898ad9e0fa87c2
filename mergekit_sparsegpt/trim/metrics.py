"""Per-merge report: what trimming did to each task vector, in the quantity it should minimise.

For a linear layer, dropping part of tau changes the layer output on the calibration inputs by
delta X with delta = tau - tau', and ||delta X||^2 = (n / 2) tr(delta H delta^T) for
H = (2 / n) X X^T. The report gives that error relative to ||tau X||^2, for the trim that was used
and for magnitude trimming at the same density (L1-rescaled too when the merge rescales, so like
is compared with like), so users see what the Hessian bought them. With
the whole Cholesky factor of H^-1 at hand (``compensate: true``) the trace is exact for the damped
Hessian; otherwise only diag H is used (cross terms ignored). "At hand" is the statistics'
``cholesky_factor`` field, which ``trim.py`` fills from H (``upper_factor``) when compensating:
calling ``upper_factor`` here would also make a Cholesky for every RegMean Hessian trimmed
without compensation, and change its estimate from the diagonal one to the full one.
"""

from __future__ import annotations

import torch
from mergekit.sparsify import RescaleNorm, rescaled_masked_tensor

from mergekit_sparsegpt.statistics.hessian import HessianStatistics
from mergekit_sparsegpt.trim.importance import top_density_mask

REPORT_FILE = "sparsegpt_report.json"


def output_error(delta: torch.Tensor, statistics: HessianStatistics) -> float:
    """tr(delta H delta^T), up to a constant; exact if the Cholesky factor is kept."""
    delta = delta.to(torch.float32)
    factor = statistics.cholesky_factor
    if factor is None:
        return float((delta.square() * statistics.hessian_diagonal.to(delta.device)).sum())
    # H^-1 = U^T U, so H = U^-1 U^-T and tr(delta H delta^T) = ||delta U^-1||_F^2.
    solved = torch.linalg.solve_triangular(factor.to(delta.device), delta, upper=True, left=False)
    return float(solved.square().sum())


def trim_entry(
    task_vector: torch.Tensor,
    trimmed: torch.Tensor,
    mask: torch.Tensor,
    statistics: HessianStatistics,
    density: float,
    rescaled: bool = False,
) -> dict[str, float | str | bool]:
    """Kept fraction and mass, overlap with magnitude's kept set, relative output errors.

    ``rescaled``: ``trimmed`` was L1-rescaled (DARE's ``rescale``); the magnitude trim it is
    compared with is then rescaled the same way."""
    tau = task_vector.to(torch.float32)
    mass = tau.square()
    total = output_error(tau, statistics)
    magnitude_mask = top_density_mask(tau.abs(), density)
    magnitude = rescaled_masked_tensor(
        tau, magnitude_mask.to(tau.dtype), RescaleNorm.l1 if rescaled else None
    )
    kept = int(mask.sum())
    return {
        "kept_fraction": float(mask.float().mean()),
        # Share of our kept entries that magnitude trimming would keep too.
        "magnitude_overlap": float((mask & magnitude_mask).sum() / kept) if kept else 1.0,
        "mass_kept": float(mass[mask].sum() / mass.sum()) if mass.sum() > 0 else 1.0,
        "relative_output_error": _ratio(output_error(tau - trimmed.float(), statistics), total),
        "magnitude_relative_output_error": _ratio(output_error(tau - magnitude, statistics), total),
        "error_estimate": "diagonal" if statistics.cholesky_factor is None else "full",
        "rescaled": rescaled,
        # How much larger the kept vector is than the whole one: re-fitting can inflate it.
        "norm_ratio": _ratio(float(trimmed.float().norm()), float(tau.norm())),
        # Spread of per-column input energy, std / mean of diag H: near 0, every column weighs
        # the same and importance trimming keeps what magnitude trimming keeps.
        "input_energy_cv": _coefficient_of_variation(statistics.hessian_diagonal),
    }


def _coefficient_of_variation(values: torch.Tensor) -> float:
    values = values.to(torch.float64)
    mean = values.mean()
    return float(values.std(correction=0) / mean) if mean > 0 else 0.0


def _ratio(error: float, total: float) -> float:
    return error / total if total > 0 else 0.0
