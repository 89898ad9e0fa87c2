"""``regmean`` and ``sparsegpt_regmean``: task vectors combined through their input Hessians.

RegMean (Jin et al. 2023, https://arxiv.org/abs/2212.09849) merges a linear layer y = W x
(W is [out, in]) into the W that best reproduces every model's outputs on that model's own
inputs, argmin_W sum_i w_i ||X_i W^T - X_i W_i^T||^2, whose solution is
W = (sum_i w_i W_i G_i) (sum_i w_i G_i)^-1 with G_i = X_i^T X_i. With W_i = W_base + tau_i the
base cancels, and with RegMean's regularisation the merged weight is

    W = W_base + lambda * (sum_i w_i tau_i G~_i) (sum_i w_i G~_i)^-1,
    G~_i = alpha * G_i + (1 - alpha) * diag(G_i)

(off-diagonal entries scaled by alpha: alpha = 1 is the exact least-squares merge, alpha = 0 a
per-input-column average weighted by w_i G_i[c, c]). G_i is the Hessian the pre-pass
accumulates, (2/n) X X^T over n calibration sequences; every task runs the same number of
equally long windows, so that scale is common to all models and cancels.

Tensors without a Hessian (embeddings, norms, lm_head, biases) get plain task arithmetic:
mergekit's own ``task_arithmetic`` with ``lambda = nongram_scale`` and normalize off, i.e.
W = W_base + nongram_scale * sum_i w_i tau_i (not divided by sum_i w_i; with n models at
weight 1, nongram_scale = 1/n is their plain average). ``lambda`` does not apply to them.

``sparsegpt_regmean`` first trims each tau_i exactly as ``sparsegpt_ties`` does (per-model
``density``, ``importance``, ``selection``, ``compensate``) and solves with the trimmed vectors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any, ClassVar

import torch
from mergekit.merge_methods.base import (
    BasePolicy,
    InputContract,
    MergeMethodSpec,
    ParameterScope,
    ParameterSpec,
    TensorGroup,
)

from mergekit_sparsegpt.methods.base import PluginMethod
from mergekit_sparsegpt.methods.context import MergeContext
from mergekit_sparsegpt.methods.parameters import (
    PREPASS_PARAMETERS,
    TRIM_PARAMETERS,
    check_finite,
    check_trim,
)
from mergekit_sparsegpt.statistics.hessian import HessianStatistics, first_cholesky
from mergekit_sparsegpt.statistics.task_statistics import TensorStatistics
from mergekit_sparsegpt.trim.trim import matrix_views, trim_task_vectors

REGMEAN_PARAMETERS: tuple[ParameterSpec, ...] = (
    ParameterSpec("weight", float, ParameterScope.NON_BASE, default=1.0),
    # The exact least-squares merge, chosen over RegMean's published values by the quality
    # benchmark (docs/quality-benchmark.md).
    ParameterSpec("alpha", float, ParameterScope.SHARED, default=1.0),
    ParameterSpec("lambda", float, ParameterScope.SHARED, default=1.0),
    # Chosen by the quality benchmark (docs/quality-benchmark.md, "Defaults from data"): the
    # plain average of a typical merge's models at weight 1.
    ParameterSpec("nongram_scale", float, ParameterScope.SHARED, default=0.2),
)
DENSITY_PARAMETER = ParameterSpec("density", float, ParameterScope.NON_BASE, default=1.0)


def _with_default(
    specs: tuple[ParameterSpec, ...], name: str, default: Any
) -> tuple[ParameterSpec, ...]:
    """``specs`` with another default for parameter ``name``."""
    return tuple(replace(spec, default=default) if spec.name == name else spec for spec in specs)


# Re-fitting each trimmed vector before the solve helps sparsegpt_regmean across densities and
# model families (docs/quality-benchmark.md): compensate is on by default.
SPARSE_REGMEAN_TRIM_PARAMETERS = _with_default(TRIM_PARAMETERS, "compensate", True)
# RegMean++ (each task's inputs taken in the model merged so far, prepass/merged_source.py)
# is preferred over each fine-tuned model's own inputs by the quality benchmark
# (docs/quality-benchmark.md).
# The pre-pass solves every linear as it calibrates and caches the merged linears (one merged
# model's linears on disk whatever the number of experts); keep_statistics caches each task's
# whole Grams instead, so that merges with other weights reuse them.
KEEP_STATISTICS = ParameterSpec("keep_statistics", bool, ParameterScope.SHARED, default=False)
REGMEAN_PREPASS_PARAMETERS = (
    *_with_default(PREPASS_PARAMETERS, "hessian_source", "merged"),
    KEEP_STATISTICS,
)

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


@dataclass(frozen=True)
class RegMeanMerge(PluginMethod):
    """RegMean on tensors with a Hessian, scaled task arithmetic on the others.

    ``trims``: trim every task vector by importance first (``sparsegpt_regmean``).
    """

    method_name: str
    method_pretty_name: str
    trims: bool
    method_reference_url: str = "https://arxiv.org/abs/2212.09849"
    fallback_method: str = "task_arithmetic"

    # What the pre-pass reads (see ``methods.base``): the solve needs every whole Hessian, and
    # negative weights would make sum_i w_i G~_i indefinite.
    keeps_hessians: ClassVar[bool] = True
    nonnegative_weights: ClassVar[bool] = True
    supports_merged_source: ClassVar[bool] = True
    solve_paths: ClassVar[tuple[str, ...]] = SOLVE_PATHS
    solves_in_prepass: ClassVar[bool] = True

    @property
    def summary_paths(self) -> tuple[tuple[str, str], ...]:
        """(report path, label) of every way a tensor can be merged, for the run summary."""
        return (("regmean", "RegMean solve"), ("fallback", "task arithmetic x nongram_scale"))

    @cached_property
    def spec(self) -> MergeMethodSpec:
        trimming = (DENSITY_PARAMETER, *SPARSE_REGMEAN_TRIM_PARAMETERS) if self.trims else ()
        return MergeMethodSpec(
            name=self.method_name,
            pretty_name=self.method_pretty_name,
            reference_url=self.method_reference_url,
            parameters=REGMEAN_PARAMETERS + trimming + REGMEAN_PREPASS_PARAMETERS,
            contract=InputContract(base=BasePolicy.REQUIRED),
        )

    def keeps_factors(self, shared: Mapping[str, Any]) -> bool:
        return self.trims and bool(shared.get("compensate", False))

    def check_shared(self, shared: dict[str, Any]) -> None:
        if self.trims:
            check_trim(shared)
        if "alpha" in shared and not 0 <= shared["alpha"] <= 1:
            raise ValueError(
                f"alpha must be in [0, 1], got {shared['alpha']}: it is the share of each "
                "Hessian's off-diagonal entries RegMean keeps (1: exact least squares, 0: "
                "diagonal only)"
            )
        check_finite(shared, "lambda", "nongram_scale")

    def merge_without_statistics(
        self, group: TensorGroup, parameters: Mapping[str, Any]
    ) -> torch.Tensor:
        return self.task_arithmetic(group, parameters)

    def merge_with_statistics(
        self,
        group: TensorGroup,
        parameters: Mapping[str, Any],
        context: MergeContext,
        name: str,
        statistics: dict[Any, TensorStatistics | None],
    ) -> torch.Tensor:
        base = group.base.tensor
        grams = [_grams(group, entry.id, statistics[entry.id], name) for entry in group.non_base]
        layout = next(stats.layout for stats in statistics.values() if stats is not None)
        task_vectors, report = self._task_vectors(group, statistics, parameters, name)
        # Each [out, in] matrix (each expert of a fused MoE tensor) is a system of its own.
        matrices = [matrix_views(layout, tau, name) for tau in task_vectors]
        weights = [parameters["weight"][entry.id] for entry in group.non_base]
        solves = [
            regmean_delta(
                [model_matrices[index] for model_matrices in matrices],
                [model_grams[index] for model_grams in grams],
                weights,
                parameters["alpha"],
            )
            for index in range(len(grams[0]))
        ]
        delta = layout.assemble([solve.delta for solve in solves])
        context.record(name, "regmean", base.numel(), report, solve=_solve_details(solves))
        return base + (parameters["lambda"] * delta).to(base.dtype)

    def task_arithmetic(self, group: TensorGroup, parameters: Mapping[str, Any]) -> torch.Tensor:
        """W_base + nongram_scale * sum_i w_i tau_i, by mergekit's own ``task_arithmetic``."""
        stock = self.fallback
        values = {p.name: p.default for p in stock.spec.parameters if not p.required}
        values.update(
            {"weight": parameters["weight"], "lambda": parameters["nongram_scale"]},
            normalize=False,  # pinned: the documented rule, whatever the stock default
        )
        return stock.merge_group(group, **values)

    def _task_vectors(
        self,
        group: TensorGroup,
        statistics: Mapping[Any, TensorStatistics | None],
        parameters: Mapping[str, Any],
        name: str,
    ) -> tuple[list[torch.Tensor], dict[str, dict[str, Any]]]:
        """The task vectors to solve with (trimmed for ``sparsegpt_regmean``), report entries."""
        if not self.trims:
            return [entry.tensor - group.base.tensor for entry in group.non_base], {}
        models = [(entry.id, entry.tensor) for entry in group.non_base]
        trimmed, _, report = trim_task_vectors(
            group.base.tensor, models, statistics, parameters, name
        )
        return trimmed, report


def _solve_details(solves: list[Solve]) -> dict[str, Any]:
    """The report's solve entry; for fused experts, the least exact path taken by any expert,
    and each expert's own."""
    worst = max(solves, key=lambda solve: (SOLVE_PATHS.index(solve.path), solve.damping))
    details: dict[str, Any] = {"path": worst.path, "damping": worst.damping}
    if len(solves) > 1:
        details["experts"] = [{"path": s.path, "damping": s.damping} for s in solves]
    return details


def _grams(
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


REGMEAN_METHODS: tuple[RegMeanMerge, ...] = (
    RegMeanMerge(method_name="regmean", method_pretty_name="RegMean", trims=False),
    RegMeanMerge(
        method_name="sparsegpt_regmean",
        method_pretty_name="SparseGPT-importance trimming + RegMean",
        trims=True,
    ),
)
