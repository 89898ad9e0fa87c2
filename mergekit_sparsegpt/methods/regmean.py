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

The output head is solved like any linear; the token embedding by its counts
(``methods.tokens``), a norm's scale by its channel energies (``methods.norms``), a linear's
bias with its weight (``methods.biases``). Tensors without statistics get mergekit's own
``task_arithmetic`` with ``lambda = nongram_scale``, not normalized.

``sparsegpt_regmean`` first trims each tau_i exactly as ``sparsegpt_ties`` does (per-model
``density``, ``importance``, ``selection``, ``compensate``) and solves with the trimmed vectors.
"""

from __future__ import annotations

from collections.abc import Mapping
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
from mergekit_sparsegpt.methods.biases import (
    augmented_gram,
    bias_refusal,
    joint_delta,
    missing_sums,
)
from mergekit_sparsegpt.methods.context import (
    FALLBACK,
    LinearBias,
    MergeContext,
    bias_of,
    regrouped,
)
from mergekit_sparsegpt.methods.norms import (
    MEAN_SUMMARY,
    NORM_PATHS,
    NORM_RULE,
    channel_energies,
    scale_delta,
)
from mergekit_sparsegpt.methods.parameters import (
    HEAD_PARAMETERS,
    PREPASS_PARAMETERS,
    TRIM_PARAMETERS,
    check_finite,
    check_trim,
)
from mergekit_sparsegpt.methods.solve import (
    SOLVE_PATHS,
    Solve,
    model_grams,
    regmean_delta,
    solve_details,
)
from mergekit_sparsegpt.methods.tokens import (
    TIED_PARAMETERS,
    TOKEN_PARAMETERS,
    check_token_parameters,
    count_weighted_delta,
)
from mergekit_sparsegpt.statistics.task_statistics import TensorStatistics, TokenStatistics
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
        return (
            ("regmean", "RegMean solve"),
            ("tokens", "RegMean on token counts"),
            ("norm", "RegMean on channel energies"),
            MEAN_SUMMARY,
            ("fallback", "task arithmetic x nongram_scale"),
        )

    @cached_property
    def spec(self) -> MergeMethodSpec:
        trimming = (DENSITY_PARAMETER, *SPARSE_REGMEAN_TRIM_PARAMETERS) if self.trims else ()
        return MergeMethodSpec(
            name=self.method_name,
            pretty_name=self.method_pretty_name,
            reference_url=self.method_reference_url,
            parameters=REGMEAN_PARAMETERS
            + TOKEN_PARAMETERS
            + TIED_PARAMETERS
            + HEAD_PARAMETERS
            + (NORM_RULE.spec,)
            + trimming
            + REGMEAN_PREPASS_PARAMETERS,
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
        check_token_parameters(shared)
        NORM_RULE.check(shared)

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
        """The linear's RegMean solve; with a bias in the merge, solved with it
        (``methods.biases``), keeping the weight's columns."""
        base = group.base.tensor
        bias = bias_of(name)
        biases = None
        if bias is not None and not missing_sums(statistics):
            biases = context.partner_tensors(bias, [entry.id for entry in group.entries])
        solves, report = self._solves(group, parameters, name, statistics, biases)
        layout = next(stats.layout for stats in statistics.values() if stats is not None)
        delta = layout.assemble(
            [solve.delta[:, :-1] if biases else solve.delta for solve in solves]
        )
        details = {"solve": solve_details(solves), **({"with_bias": bias} if biases else {})}
        context.record(name, "regmean", base, report, **details)
        return base + (parameters["lambda"] * delta).to(base.dtype)

    def merge_bias(
        self,
        group: TensorGroup,
        parameters: Mapping[str, Any],
        context: MergeContext,
        name: str,
        linear: LinearBias,
    ) -> torch.Tensor:
        """The bias by the joint solve with its weight, read from every model; the stock rule
        (with the reason) when that cannot be solved."""
        base = group.base.tensor
        weights = context.partner_tensors(linear.weight, [entry.id for entry in group.entries])
        reason = bias_refusal(linear, weights is not None)
        if reason is not None:
            context.record(name, FALLBACK, base, reason=reason)
            return self.merge_without_statistics(group, parameters)
        assert weights is not None
        weight_group = regrouped(group, weights, linear.weight)
        biases = {entry.id: entry.tensor for entry in group.entries}
        solves, _ = self._solves(weight_group, parameters, linear.weight, linear.statistics, biases)
        context.record(
            name, "regmean", base, solve=solve_details(solves), with_weight=linear.weight
        )
        delta = solves[0].delta[:, -1].to(base.device)
        return base + (parameters["lambda"] * delta).to(base.dtype)

    def _solves(
        self,
        group: TensorGroup,
        parameters: Mapping[str, Any],
        name: str,
        statistics: Mapping[Any, TensorStatistics | None],
        biases: Mapping[Any, torch.Tensor] | None,
    ) -> tuple[list[Solve], dict[str, dict[str, Any]]]:
        """RegMean's solve of every matrix of the tensor (each expert of a fused MoE tensor is a
        system of its own); with ``biases`` (every model's, the base's included) the one matrix
        solved with its bias, [out, in + 1]."""
        grams = [model_grams(group, e.id, statistics[e.id], name) for e in group.non_base]
        layout = next(stats.layout for stats in statistics.values() if stats is not None)
        task_vectors, report = self._task_vectors(group, statistics, parameters, name)
        matrices = [matrix_views(layout, tau, name) for tau in task_vectors]
        weights = [parameters["weight"][entry.id] for entry in group.non_base]
        alpha = parameters["alpha"]
        if biases is not None:
            base_bias = biases[group.base.id]
            bias_deltas = [biases[entry.id] - base_bias for entry in group.non_base]
            augmented = [augmented_gram(statistics[e.id].matrices[0]) for e in group.non_base]  # type: ignore[union-attr]
            solve = joint_delta([m[0] for m in matrices], bias_deltas, augmented, weights, alpha)
            return [solve], report
        solves = [
            regmean_delta(
                [model_matrices[index] for model_matrices in matrices],
                [model_grams[index] for model_grams in grams],
                weights,
                alpha,
            )
            for index in range(len(grams[0]))
        ]
        return solves, report

    def merge_tokens(
        self,
        group: TensorGroup,
        parameters: Mapping[str, Any],
        context: MergeContext,
        name: str,
        tokens: dict[Any, TokenStatistics],
    ) -> torch.Tensor:
        """The token embedding by its counts (``methods.tokens``); a tied one also by the
        head's solve, as ``tied_embeddings`` says. The task vectors are not trimmed."""
        base = group.base.tensor
        task_vectors = [entry.tensor - base for entry in group.non_base]
        weights = [parameters["weight"][entry.id] for entry in group.non_base]
        counts = [tokens[entry.id].counts for entry in group.non_base]
        heads = [tokens[entry.id].head for entry in group.non_base]
        rule = parameters["tied_embeddings"] if all(heads) else "tokens"
        delta = torch.zeros_like(base, dtype=torch.float32)
        details: dict[str, Any] = {"rule": rule}
        if rule in ("tokens", "blend"):
            smoothing = parameters["token_smoothing"]
            delta += count_weighted_delta(task_vectors, counts, weights, smoothing)
        if rule in ("head", "blend"):
            grams = [model_grams(group, e.id, tokens[e.id].head, name)[0] for e in group.non_base]
            solve = regmean_delta(task_vectors, grams, weights, parameters["alpha"])
            delta += solve.delta.to(torch.float32)
            details["solve"] = solve_details([solve])
        if rule == "blend":
            delta /= 2
        context.record(name, "tokens", base, **details)
        return base + (parameters["lambda"] * delta).to(base.dtype)

    def merge_scale(
        self,
        group: TensorGroup,
        parameters: Mapping[str, Any],
        context: MergeContext,
        name: str,
        statistics: dict[Any, TensorStatistics | None],
    ) -> torch.Tensor:
        """A norm's scale by its channel energies (``methods.norms``), not trimmed."""
        base = group.base.tensor
        weights = [parameters["weight"][entry.id] for entry in group.non_base]
        rule = parameters["norm_rule"]
        energies = channel_energies(group, statistics, rule)
        context.record(name, NORM_PATHS[rule], base, rule=rule)
        delta = scale_delta(group, weights, energies)
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


REGMEAN_METHODS: tuple[RegMeanMerge, ...] = (
    RegMeanMerge(method_name="regmean", method_pretty_name="RegMean", trims=False),
    RegMeanMerge(
        method_name="sparsegpt_regmean",
        method_pretty_name="SparseGPT-importance trimming + RegMean",
        trims=True,
    ),
)
