"""``sparsegpt_ties`` and ``sparsegpt_dare``: mergekit's task arithmetic with importance trimming.

Each task vector is trimmed to its top-``density`` entries by second-order importance; the
trimmed vectors are then combined by mergekit's own ``GeneralizedTaskArithmeticMerge`` (weights,
sign election, normalize, lambda, int8_mask), so only the trimming step is ours. Tensors without a
Hessian (embeddings, norms, lm_head, biases) go through the stock method untouched. The trimming
itself (``trim.trim.trim_task_vectors``) is shared with ``sparsegpt_regmean`` (``regmean.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
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
from mergekit_sparsegpt.methods.context import MergeContext
from mergekit_sparsegpt.methods.parameters import (
    PREPASS_PARAMETERS,
    SIGN_FROM,
    SIGN_PARAMETERS,
    TRIM_PARAMETERS,
    check_finite,
    check_trim,
)
from mergekit_sparsegpt.statistics.task_statistics import TensorStatistics
from mergekit_sparsegpt.trim.trim import trim_task_vectors


@dataclass(frozen=True)
class SparseGPTMerge(PluginMethod, GeneralizedTaskArithmeticMerge):
    """Importance trimming in front of a stock task-arithmetic combination.

    ``sparsification_method`` of the parent stays None: trimming happens here, and the parent
    only combines. ``fallback_method`` names the registered stock method used, unchanged, for
    tensors that have no Hessian.
    """

    fallback_method: str

    # What the pre-pass reads (see ``methods.base``): trimming needs only diagonals.
    keeps_hessians: ClassVar[bool] = False
    nonnegative_weights: ClassVar[bool] = False
    supports_merged_source: ClassVar[bool] = False

    @property
    def summary_paths(self) -> tuple[tuple[str, str], ...]:
        """(report path, label) of every way a tensor can be merged, for the run summary."""
        return (("importance", "Hessian importance"), ("fallback", f"stock {self.fallback_method}"))

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
            + PREPASS_PARAMETERS
            + TRIM_PARAMETERS
            + (SIGN_PARAMETERS if self.consensus_method else ()),
            contract=stock.contract,
        )

    def keeps_factors(self, shared: Mapping[str, Any]) -> bool:
        return bool(shared.get("compensate", False))

    def check_shared(self, shared: dict[str, Any]) -> None:
        check_trim(shared)
        if self.consensus_method:
            SIGN_FROM.check(shared)
        check_finite(shared, "lambda")

    def merge_without_statistics(
        self, group: TensorGroup, parameters: Mapping[str, Any]
    ) -> torch.Tensor:
        stock = {p.name: parameters[p.name] for p in self.fallback.spec.parameters}
        return self.fallback.merge_group(group, **stock)

    def merge_with_statistics(
        self,
        group: TensorGroup,
        parameters: Mapping[str, Any],
        context: MergeContext,
        name: str,
        statistics: dict[Any, TensorStatistics | None],
    ) -> torch.Tensor:
        base = group.base.tensor
        models = [(entry.id, entry.tensor) for entry in group.non_base]
        stock_trim = self.fallback.sparsification_method
        trimmed, masks, report = trim_task_vectors(
            base, models, statistics, parameters, name, stock_trim
        )
        context.record(name, "importance", base.numel(), report)
        if parameters["compensate"] and parameters.get("sign_from") == "raw":
            raw = [
                vector if mask is None else (entry.tensor - base) * mask
                for entry, vector, mask in zip(group.non_base, trimmed, masks, strict=True)
            ]
            return base + self._combine_with_signs_of(raw, trimmed, group, parameters)
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
    ) -> torch.Tensor:
        """The parent's sign election and disjoint mean, with signs elected by ``electors``: its
        weights on the tensors' device, its ``int8_mask`` for the election's signs."""
        deltas = torch.stack(trimmed)
        weights = torch.tensor(
            [parameters["weight"][entry.id] for entry in group.non_base],
            dtype=deltas.dtype,
            device=deltas.device,
        ).reshape(-1, *([1] * (deltas.dim() - 1)))
        mask_dtype = torch.int8 if parameters.get("int8_mask") else deltas.dtype
        agree = get_mask(torch.stack(electors) * weights, self.consensus_method, mask_dtype)
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
        method_pretty_name="SparseGPT-importance DARE",
        method_reference_url="https://arxiv.org/abs/2301.00774",
        fallback_method="dare_linear",
    ),
)
