"""What every plugin method is: a mergekit kernel that also tells the pre-pass what it needs.

Both kernels share one preamble: a tensor with no merged model is the base; otherwise the merge
context's statistics are looked up and the tensor goes to the path of its kind: the token
embedding (token counts), a norm's scale (channel energies), a linear's bias (its weight's
statistics), a linear (its Hessians); a tensor without statistics goes to the method's stock
``fallback``.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from mergekit import merge_methods
from mergekit.merge_methods.base import GroupMergeMethod, TensorGroup

from mergekit_sparsegpt.methods.biases import CONSTANT_INPUT
from mergekit_sparsegpt.methods.context import (
    FALLBACK,
    LinearBias,
    MergeContext,
    active_context,
    kernel_statistics,
    solved_linear,
)
from mergekit_sparsegpt.methods.norms import is_scale
from mergekit_sparsegpt.methods.tokens import token_rule_refusal
from mergekit_sparsegpt.statistics.task_statistics import TensorStatistics, TokenStatistics


class PluginMethod(GroupMergeMethod):
    """The interface of every method this package registers.

    Besides mergekit's interface: ``keeps_hessians`` (statistics must hold every whole Hessian),
    ``keeps_factors`` (they must hold Cholesky factors), ``nonnegative_weights`` (weights >= 0),
    ``supports_merged_source`` (``hessian_source: merged`` is allowed), ``solves_in_prepass``
    (the pre-pass may cache the merged linears themselves), ``solve_paths`` (the
    solve paths the run summary counts), ``summary_paths`` (the report paths a tensor can take,
    with labels), ``check_shared`` (the method's own merge-wide values) and ``fallback_method``
    (the registered stock method for tensors without a Hessian).
    """

    fallback_method: str
    keeps_hessians: ClassVar[bool]
    nonnegative_weights: ClassVar[bool]
    supports_merged_source: ClassVar[bool]
    solve_paths: ClassVar[tuple[str, ...]] = ()
    # The pre-pass may solve every linear itself and cache the merged values (RegMean).
    solves_in_prepass: ClassVar[bool] = False

    @property
    @abstractmethod
    def summary_paths(self) -> tuple[tuple[str, str], ...]:
        """(report path, label) of every way a tensor can be merged, for the run summary."""

    @abstractmethod
    def keeps_factors(self, shared: Mapping[str, Any]) -> bool:
        """Whether a tensor with these merge-wide values needs the Hessians' Cholesky factors."""

    def reads_only_diagonals(self, shared: Mapping[str, Any]) -> bool:
        """Whether a tensor with these merge-wide values reads nothing of its Hessians but
        their diagonals (the pre-pass then accumulates only those)."""
        return False

    @abstractmethod
    def check_shared(self, shared: dict[str, Any]) -> None:
        """Refuse a merge-wide value out of range, with a message that says why."""

    @property
    def fallback(self) -> GroupMergeMethod:
        return merge_methods.get(self.fallback_method)

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        if not group.non_base:
            return group.base.tensor
        context = active_context(self.spec.name)
        if context.merged is not None:  # solved by the pre-pass
            solved = solved_linear(context, group)
            return self.merge_without_statistics(group, parameters) if solved is None else solved
        found = kernel_statistics(self.spec.name, group, parameters["calibration"])
        if found is None:
            return self.merge_without_statistics(group, parameters)
        context, name, statistics = found
        if isinstance(statistics, LinearBias):
            return self.merge_bias(group, parameters, context, name, statistics)
        if any(isinstance(stats, TokenStatistics) for stats in statistics.values()):
            reason = token_rule_refusal(parameters, statistics, group.base.tensor)  # type: ignore[arg-type]
            if reason is not None:
                context.record(name, FALLBACK, group.base.tensor, reason=reason)
                return self.merge_without_statistics(group, parameters)
            return self.merge_tokens(group, parameters, context, name, statistics)  # type: ignore[arg-type]
        if is_scale(group.base.tensor):
            if parameters["norm_rule"] == "stock":
                context.record(name, FALLBACK, group.base.tensor, reason="norm_rule: stock")
                return self.merge_without_statistics(group, parameters)
            return self.merge_scale(group, parameters, context, name, statistics)  # type: ignore[arg-type]
        roles = context.roles
        if not parameters["lm_head_statistics"] and roles is not None and name == roles.head:
            context.record(name, FALLBACK, group.base.tensor, reason="lm_head_statistics: false")
            return self.merge_without_statistics(group, parameters)
        return self.merge_with_statistics(group, parameters, context, name, statistics)  # type: ignore[arg-type]

    @abstractmethod
    def merge_tokens(
        self,
        group: TensorGroup,
        parameters: Mapping[str, Any],
        context: MergeContext,
        name: str,
        tokens: dict[Any, TokenStatistics],
    ) -> torch.Tensor:
        """The token embedding merged from every model's token counts (``embedding_rule:
        tokens`` and the calibrated vocabulary: checked before); records its report entry."""

    def merge_bias(
        self,
        group: TensorGroup,
        parameters: Mapping[str, Any],
        context: MergeContext,
        name: str,
        linear: LinearBias,
    ) -> torch.Tensor:
        """A linear's bias (``linear``: its weight's statistics); by default the stock rule,
        recorded with the reason."""
        context.record(name, FALLBACK, group.base.tensor, reason=CONSTANT_INPUT)
        return self.merge_without_statistics(group, parameters)

    @abstractmethod
    def merge_scale(
        self,
        group: TensorGroup,
        parameters: Mapping[str, Any],
        context: MergeContext,
        name: str,
        statistics: dict[Any, TensorStatistics | None],
    ) -> torch.Tensor:
        """A norm's scale merged from every model's channel energies as ``norm_rule`` says
        ("energy" or "mean": "stock" is handled before); records its report entry."""

    @abstractmethod
    def merge_without_statistics(
        self, group: TensorGroup, parameters: Mapping[str, Any]
    ) -> torch.Tensor:
        """The merged tensor when no model has a Hessian for it."""

    @abstractmethod
    def merge_with_statistics(
        self,
        group: TensorGroup,
        parameters: Mapping[str, Any],
        context: MergeContext,
        name: str,
        statistics: dict[Any, TensorStatistics | None],
    ) -> torch.Tensor:
        """The merged tensor from the models' statistics; records its report entry."""
