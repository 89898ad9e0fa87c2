"""``sparsegpt_ties`` and ``sparsegpt_dare``: mergekit's task arithmetic with importance trimming.

Each task vector is trimmed to its top-``density`` entries by second-order importance; the
trimmed vectors are then combined by mergekit's own ``GeneralizedTaskArithmeticMerge`` (weights,
sign election, normalize, lambda, int8_mask), so only the trimming step is ours. The output head
is trimmed like any linear; the token embedding and (``norm_rule: energy``) a norm's scale as
linears with a diagonal Hessian (token counts, channel energies). Tensors without statistics,
and biases (their input is the constant 1), go through the stock method untouched. The trimming
itself (``trim.trim.trim_task_vectors``) is shared with ``sparsegpt_regmean`` (``regmean.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any, ClassVar

import torch
from mergekit.merge_methods.base import MergeMethodSpec, TensorGroup
from mergekit.merge_methods.generalized_task_arithmetic import (
    ConsensusMethod,
    GeneralizedTaskArithmeticMerge,
    get_mask,
)

from mergekit_sparsegpt.methods.base import PluginMethod
from mergekit_sparsegpt.methods.context import MergeContext, regrouped
from mergekit_sparsegpt.methods.norms import (
    MEAN_SUMMARY,
    NORM_PATHS,
    NORM_RULE,
    channel_energies,
    scale_as_linear,
    scale_delta,
)
from mergekit_sparsegpt.methods.parameters import (
    LM_HEAD_STATISTICS,
    PREPASS_PARAMETERS,
    SIGN_FROM,
    SIGN_PARAMETERS,
    TRIM_PARAMETERS,
    Choice,
    check_finite,
    check_trim,
)
from mergekit_sparsegpt.methods.tokens import (
    TOKEN_PARAMETERS,
    check_token_parameters,
    counts_as_linear,
)
from mergekit_sparsegpt.statistics.task_statistics import TensorStatistics, TokenStatistics
from mergekit_sparsegpt.trim.importance import DEFAULT_IMPORTANCE, DIAGONAL_IMPORTANCES
from mergekit_sparsegpt.trim.trim import trim_task_vectors

# How the trimmed task vectors are combined: mergekit's own mean ("mean"), or each model weighted
# entry by entry by its input energy ("energy": RegMean's alpha = 0 solution on the kept entries).
COMBINE = Choice("combine", ("mean", "energy"), "mean")
# Both trimming methods combine by energy: validation chose it in each of the quality
# benchmark's families (docs/quality-benchmark.md).
ENERGY_COMBINE = replace(COMBINE, default="energy")


@dataclass(frozen=True)
class SparseGPTMerge(PluginMethod, GeneralizedTaskArithmeticMerge):
    """Importance trimming in front of a stock task-arithmetic combination.

    ``sparsification_method`` of the parent stays None: trimming happens here, and the parent
    only combines. ``fallback_method`` names the registered stock method used, unchanged, for
    tensors that have no Hessian.
    """

    fallback_method: str
    combine: Choice = COMBINE
    norm_rule: Choice = NORM_RULE
    # lm_head trimmed by its Hessian (true) or by the stock method (false).
    head_statistics: bool = True

    # What the pre-pass reads (see ``methods.base``): trimming needs only diagonals.
    keeps_hessians: ClassVar[bool] = False
    nonnegative_weights: ClassVar[bool] = False
    supports_merged_source: ClassVar[bool] = False

    @property
    def summary_paths(self) -> tuple[tuple[str, str], ...]:
        """(report path, label) of every way a tensor can be merged, for the run summary."""
        return (
            ("importance", "Hessian importance"),
            ("tokens", "token-count importance"),
            ("norm", "channel-energy importance"),
            MEAN_SUMMARY,
            ("fallback", f"stock {self.fallback_method}"),
        )

    @cached_property
    def combine_parameters(self) -> tuple[str, ...]:
        """The parameters mergekit's own task arithmetic reads."""
        return tuple(p.name for p in GeneralizedTaskArithmeticMerge.spec.func(self).parameters)

    @cached_property
    def spec(self) -> MergeMethodSpec:
        stock = GeneralizedTaskArithmeticMerge.spec.func(self)
        return MergeMethodSpec(
            name=stock.name,
            pretty_name=stock.pretty_name,
            reference_url=stock.reference_url,
            parameters=stock.parameters
            + (replace(LM_HEAD_STATISTICS, default=self.head_statistics),)
            + TOKEN_PARAMETERS
            + (self.norm_rule.spec,)
            + (self.combine.spec,)
            + PREPASS_PARAMETERS
            + TRIM_PARAMETERS
            + (SIGN_PARAMETERS if self.consensus_method else ()),
            contract=stock.contract,
        )

    def keeps_factors(self, shared: Mapping[str, Any]) -> bool:
        return bool(shared.get("compensate", False))

    def reads_only_diagonals(self, shared: Mapping[str, Any]) -> bool:
        """``wanda`` without ``compensate``: the score, the energy mean, the token and norm
        rules and the report's error estimate read diag H alone."""
        importance = shared.get("importance", DEFAULT_IMPORTANCE)
        return not shared.get("compensate", False) and importance in DIAGONAL_IMPORTANCES

    def check_shared(self, shared: dict[str, Any]) -> None:
        check_trim(shared)
        check_token_parameters(shared)
        self.norm_rule.check(shared)
        self.combine.check(shared)
        if self.consensus_method:
            SIGN_FROM.check(shared)
        check_finite(shared, "lambda")

    def merge_without_statistics(
        self, group: TensorGroup, parameters: Mapping[str, Any]
    ) -> torch.Tensor:
        stock = {p.name: parameters[p.name] for p in self.fallback.spec.parameters}
        return self.fallback.merge_group(group, **stock)

    def merge_tokens(
        self,
        group: TensorGroup,
        parameters: Mapping[str, Any],
        context: MergeContext,
        name: str,
        tokens: dict[Any, TokenStatistics],
    ) -> torch.Tensor:
        """The token embedding trimmed and combined as a linear whose Hessian is diag(counts)
        (``methods.tokens.counts_as_linear``); never re-fitted: a diagonal Hessian moves no
        other entry."""
        smoothing = parameters["token_smoothing"]
        statistics = {m: counts_as_linear(t.counts, smoothing) for m, t in tokens.items()}
        values = {**parameters, "compensate": False}
        return self.merge_with_statistics(group, values, context, name, statistics, "tokens")  # type: ignore[arg-type]

    def merge_scale(
        self,
        group: TensorGroup,
        parameters: Mapping[str, Any],
        context: MergeContext,
        name: str,
        statistics: dict[Any, TensorStatistics | None],
    ) -> torch.Tensor:
        """A norm's scale: "energy" trims and combines its [channels, 1] view as a linear with
        H = diag(E) (``methods.norms.scale_as_linear``; never re-fitted); "mean" takes the
        plain weighted mean of the untrimmed task vectors, times lambda."""
        base = group.base.tensor
        if parameters["norm_rule"] == "mean":
            weights = [parameters["weight"][entry.id] for entry in group.non_base]
            delta = scale_delta(group, weights, channel_energies(group, statistics, "mean"))
            context.record(name, NORM_PATHS["mean"], base, rule="mean")
            return base + (parameters["lambda"] * delta).to(base.dtype)
        column = regrouped(group, {e.id: e.tensor.unsqueeze(-1) for e in group.entries}, name)
        found = {m: None if s is None else scale_as_linear(s) for m, s in statistics.items()}
        values = {**parameters, "compensate": False}
        merged = self.merge_with_statistics(column, values, context, name, found, "norm")
        return merged.squeeze(-1)

    def merge_with_statistics(
        self,
        group: TensorGroup,
        parameters: Mapping[str, Any],
        context: MergeContext,
        name: str,
        statistics: dict[Any, TensorStatistics | None],
        path: str = "importance",
    ) -> torch.Tensor:
        base = group.base.tensor
        models = [(entry.id, entry.tensor) for entry in group.non_base]
        stock_trim = self.fallback.sparsification_method
        trimmed, masks, report = trim_task_vectors(
            base, models, statistics, parameters, name, stock_trim
        )
        energies = _relative_energies(group, statistics, parameters["combine"])
        context.record(name, path, base, report, **({"combine": "energy"} if energies else {}))
        electors = trimmed
        if parameters["compensate"] and parameters.get("sign_from") == "raw":
            electors = [
                vector if mask is None else (entry.tensor - base) * mask
                for entry, vector, mask in zip(group.non_base, trimmed, masks, strict=True)
            ]
        if electors is not trimmed or energies is not None:
            return base + self._combine_with_signs_of(
                electors, trimmed, group, parameters, energies
            )
        task_vectors = TensorGroup.from_tensors(
            [torch.zeros_like(base), *trimmed],
            ids=[group.base.id, *(entry.id for entry in group.non_base)],
            base_index=0,
            name=name,
        )
        combine = {key: parameters[key] for key in self.combine_parameters}
        return base + GeneralizedTaskArithmeticMerge.merge_group(self, task_vectors, **combine)

    def _combine_with_signs_of(
        self,
        electors: list[torch.Tensor],
        trimmed: list[torch.Tensor],
        group: TensorGroup,
        parameters: Mapping[str, Any],
        energies: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The parent's sign election and disjoint mean, with signs elected by ``electors``: its
        weights on the tensors' device, its ``int8_mask`` for the election's signs. With
        ``energies`` (one per model, in the tensor's shape) each model's weight in the mean is
        scaled entry by entry; the election keeps the plain weights."""
        deltas = torch.stack(trimmed)
        weights = torch.tensor(
            [parameters["weight"][entry.id] for entry in group.non_base],
            dtype=deltas.dtype,
            device=deltas.device,
        ).reshape(-1, *([1] * (deltas.dim() - 1)))
        mask_dtype = torch.int8 if parameters.get("int8_mask") else deltas.dtype
        if self.consensus_method is None:  # DARE: no election, every entry counts
            agree = torch.ones_like(deltas, dtype=mask_dtype)
        else:
            agree = get_mask(torch.stack(electors) * weights, self.consensus_method, mask_dtype)
        if energies is not None:
            weights = weights * torch.stack(energies).to(deltas.dtype)
        mixed = (deltas * weights * agree).sum(dim=0)
        if parameters["normalize"]:
            divisor = (weights * agree).sum(dim=0)
            mixed /= torch.where(divisor == 0, torch.ones_like(divisor), divisor)
        return (mixed * parameters["lambda"]).to(group.base.tensor.dtype)


SPARSEGPT_METHODS: tuple[SparseGPTMerge, ...] = (
    SparseGPTMerge(
        consensus_method=ConsensusMethod.sum,
        sparsification_method=None,
        default_normalize=True,
        default_rescale=False,
        method_name="sparsegpt_ties",
        combine=ENERGY_COMBINE,
        method_pretty_name="SparseGPT-importance TIES",
        method_reference_url="https://arxiv.org/abs/2301.00774",
        fallback_method="ties",
    ),
    SparseGPTMerge(
        consensus_method=None,
        sparsification_method=None,
        default_normalize=False,
        default_rescale=True,
        method_name="sparsegpt_dare",
        combine=ENERGY_COMBINE,
        # Validation chose DARE's stock rule for lm_head in two of three families, and its norm
        # rules all merge alike (docs/quality-benchmark.md).
        head_statistics=False,
        norm_rule=replace(NORM_RULE, default="stock"),
        method_pretty_name="SparseGPT-importance DARE",
        method_reference_url="https://arxiv.org/abs/2301.00774",
        fallback_method="dare_linear",
    ),
)


def _relative_energies(
    group: TensorGroup, statistics: Mapping[Any, TensorStatistics | None], combine: str
) -> list[torch.Tensor] | None:
    """With ``combine: energy``, each model's energy of every entry's input column (its
    H_i[c, c]; a token's count for the embedding) over the mean of the models' energies, in the
    tensor's shape; None for the plain mean or when a model has no statistics. Relative, so a
    disjoint mean is weighted by them and a plain sum (DARE) keeps its scale."""
    if combine != "energy" or any(stats is None for stats in statistics.values()):
        return None
    base = group.base.tensor
    energies = []
    for entry in group.non_base:
        stats = statistics[entry.id]
        assert stats is not None
        matrices = stats.layout.matrices(base)
        columns = [
            hessian.hessian_diagonal.to(base.device, torch.float32).expand(matrix.shape)
            for hessian, matrix in zip(stats.matrices, matrices, strict=True)
        ]
        energies.append(stats.layout.assemble(columns))
    mean = torch.stack(energies).mean(dim=0)
    mean = torch.where(mean > 0, mean, torch.ones_like(mean))
    return [energy / mean for energy in energies]
