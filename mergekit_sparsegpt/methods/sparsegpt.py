"""``sparsegpt_ties`` and ``sparsegpt_dare``: mergekit's task arithmetic with importance trimming.

Each task vector is trimmed to its top-``density`` entries by second-order importance; the
trimmed vectors are then combined by mergekit's own ``GeneralizedTaskArithmeticMerge`` (weights,
sign election, normalize, lambda, int8_mask), so only the trimming step is ours. Tensors without a
Hessian (embeddings, norms, lm_head, biases) go through the stock method untouched. The trimming
itself (``trim_task_vectors``) is shared with ``sparsegpt_regmean`` (``regmean.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

import torch
from mergekit import merge_methods
from mergekit.merge_methods.base import MergeMethodSpec, ParameterScope, ParameterSpec, TensorGroup
from mergekit.merge_methods.generalized_task_arithmetic import (
    ConsensusMethod,
    GeneralizedTaskArithmeticMerge,
    get_mask,
)
from mergekit.sparsify import (
    RescaleNorm,
    SparsificationMethod,
    rescaled_masked_tensor,
    sparsify,
)

from mergekit_sparsegpt._autoload import retry_deferred_registration
from mergekit_sparsegpt.capture.accumulate import TensorLayout
from mergekit_sparsegpt.methods.context import kernel_statistics
from mergekit_sparsegpt.statistics.hessian import HessianStatistics
from mergekit_sparsegpt.statistics.task_statistics import TensorStatistics
from mergekit_sparsegpt.trim.compensation import compensated_trim
from mergekit_sparsegpt.trim.importance import (
    DEFAULT_IMPORTANCE,
    importance_scores,
    top_density_mask,
)
from mergekit_sparsegpt.trim.metrics import trim_entry

# Parameters read by the pre-pass (calibration, Hessians, cache) rather than by the kernel.
PREPASS_PARAMETERS: tuple[ParameterSpec, ...] = (
    ParameterSpec("calibration", str | None, ParameterScope.NON_BASE, default=None),
    # None (not set): the pre-pass fits them to the text and the model, see
    # calibration.DEFAULT_SAMPLES and prepass.DEFAULT_SEQ_LEN.
    ParameterSpec("calibration_samples", int | None, ParameterScope.SHARED, default=None),
    ParameterSpec("calibration_seq_len", int | None, ParameterScope.SHARED, default=None),
    ParameterSpec("calibration_field", str, ParameterScope.SHARED, default="text"),
    ParameterSpec("calibration_split", str, ParameterScope.SHARED, default="train"),
    ParameterSpec("calibration_batch_size", int, ParameterScope.SHARED, default=8),
    # "base": measured better than "finetuned" in docs/quality-benchmark.md; the merged model's
    # activations are closer to the base's than to any one expert's.
    ParameterSpec("hessian_source", str, ParameterScope.SHARED, default="base"),
    ParameterSpec("dampening", float, ParameterScope.SHARED, default=0.01),
    ParameterSpec("cache_dir", str | None, ParameterScope.SHARED, default=None),
)
# Parameters of importance trimming (with the per-model ``density``), read by ``trim_task_vectors``.
TRIM_PARAMETERS: tuple[ParameterSpec, ...] = (
    ParameterSpec("importance", str, ParameterScope.SHARED, default=DEFAULT_IMPORTANCE),
    ParameterSpec("selection", str, ParameterScope.SHARED, default="tensor"),
    ParameterSpec("compensate", bool, ParameterScope.SHARED, default=False),
)
# Only for methods with sign election: which values elect the sign when compensation re-fitted
# the kept entries. "raw" (the fine-tuned values at the kept positions) beat "compensated" (the
# re-fitted ones, as a plain TIES would see them) at every density in the quality benchmark.
SIGN_SOURCES = ("raw", "compensated")
SIGN_PARAMETERS: tuple[ParameterSpec, ...] = (
    ParameterSpec("sign_from", str, ParameterScope.SHARED, default=SIGN_SOURCES[0]),
)


@dataclass(frozen=True)
class SparseGPTMerge(GeneralizedTaskArithmeticMerge):
    """Importance trimming in front of a stock task-arithmetic combination.

    ``sparsification_method`` of the parent stays None: trimming happens here, and the parent
    only combines. ``fallback_method`` names the registered stock method used, unchanged, for
    tensors that have no Hessian.
    """

    fallback_method: str

    # What the pre-pass reads (see ``methods.py``): trimming needs only diagonals.
    keeps_hessians: ClassVar[bool] = False
    nonnegative_weights: ClassVar[bool] = False

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

    @property
    def fallback(self) -> GeneralizedTaskArithmeticMerge:
        return merge_methods.get(self.fallback_method)

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        base = group.base.tensor
        if not group.non_base:
            return base
        found = kernel_statistics(self.spec.name, group, parameters["calibration"])
        if found is None:
            stock = {p.name: parameters[p.name] for p in self.fallback.spec.parameters}
            return self.fallback.merge_group(group, **stock)
        context, name, statistics = found

        trimmed, masks, report = trim_task_vectors(
            group, statistics, parameters, name, self.fallback.sparsification_method
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
        return base + super().merge_group(task_vectors, **combine)

    def _combine_with_signs_of(
        self,
        electors: list[torch.Tensor],
        trimmed: list[torch.Tensor],
        group: TensorGroup,
        parameters: dict[str, Any],
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


def trim_task_vectors(
    group: TensorGroup,
    statistics: Mapping[Any, TensorStatistics | None],
    parameters: Mapping[str, Any],
    name: str,
    stock_method: SparsificationMethod | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor | None], dict[str, dict[str, Any]]]:
    """Every trimmed task vector and its mask, and the report entries of the Hessian ones.

    Reads ``density`` (per model), ``importance``, ``selection``, ``compensate`` and, where the
    method has it, ``rescale``. A model without statistics is trimmed by ``stock_method``.
    """
    trimmed, masks, report = [], [], {}
    for entry in group.non_base:
        task_vector = entry.tensor - group.base.tensor
        stats = statistics[entry.id]
        density = parameters["density"][entry.id]
        where = f"{name} of model {entry.id}"
        if stats is None:
            vector, mask = _stock_trim(task_vector, density, parameters, stock_method, where), None
        else:
            vector, mask, report[str(entry.id)] = trim_tensor_task_vector(
                task_vector, stats, density, parameters, where
            )
        trimmed.append(vector)
        masks.append(mask)
    return trimmed, masks, report


def trim_tensor_task_vector(
    task_vector: torch.Tensor,
    statistics: TensorStatistics,
    density: float,
    parameters: Mapping[str, Any],
    where: str,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """``trim_task_vector`` on every [out, in] matrix of a checkpoint tensor, each with its own
    Hessian (each expert of a fused MoE tensor keeps ``density`` of its entries), in the
    tensor's layout; and the report entry."""
    layout = statistics.layout
    matrices = matrix_views(layout, task_vector, where)
    trims = [
        trim_task_vector(matrix, stats, density, parameters, _matrix_where(where, index, layout))
        for index, (matrix, stats) in enumerate(zip(matrices, statistics.matrices, strict=True))
    ]
    entries = [
        trim_entry(matrix, vector, mask, stats, density, bool(parameters.get("rescale")))
        for matrix, (vector, mask), stats in zip(matrices, trims, statistics.matrices, strict=True)
    ]
    vector = layout.assemble([vector for vector, _ in trims])
    mask = layout.assemble([mask for _, mask in trims])
    return vector, mask, tensor_entry(entries, statistics)


def matrix_views(layout: TensorLayout, tensor: torch.Tensor, where: str) -> list[torch.Tensor]:
    """The tensor's [out, in] matrices, or one clear error naming the tensor and model."""
    try:
        return layout.matrices(tensor)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


def _matrix_where(where: str, index: int, layout: TensorLayout) -> str:
    return f"{where} (expert {index})" if layout.experts else where


def tensor_entry(entries: list[dict[str, Any]], statistics: TensorStatistics) -> dict[str, Any]:
    """A tensor's report entry: its matrix's, or for fused experts the mean over experts of each
    figure, with every expert's own entry and the experts no calibration token reached."""
    if not statistics.layout.experts:
        return entries[0]
    numeric = [key for key, value in entries[0].items() if isinstance(value, float)]
    mean = {key: sum(entry[key] for entry in entries) / len(entries) for key in numeric}
    return {
        **entries[0],
        **mean,
        "experts": entries,
        "experts_without_tokens": [e for e, count in enumerate(statistics.samples) if not count],
    }


def trim_task_vector(
    task_vector: torch.Tensor,
    statistics: HessianStatistics,
    density: float,
    parameters: Mapping[str, Any],
    where: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One task vector trimmed by importance (and re-fitted if ``compensate``), and its mask."""
    rescale = RescaleNorm.l1 if parameters.get("rescale") else None
    try:
        scores = importance_scores(task_vector, statistics, parameters["importance"])
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    mask = top_density_mask(scores, density, parameters["selection"])
    if not parameters["compensate"]:
        return rescaled_masked_tensor(task_vector, mask.to(task_vector.dtype), rescale), mask
    if statistics.cholesky_factor is None:
        raise ValueError(
            f"{where}: compensate needs the Cholesky factor of its Hessian, which is missing "
            "(the pseudo-inverse fallback was used, or the statistics were computed without "
            "compensate); delete that cache entry or raise dampening"
        )
    compensated = compensated_trim(task_vector, statistics.cholesky_factor, mask)
    return (_l1_rescaled(compensated, task_vector) if rescale else compensated), mask


def _l1_rescaled(trimmed: torch.Tensor, original: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """mergekit's L1 rescale (match the untrimmed task vector's L1 norm) for re-fitted entries."""
    before, after = original.abs().sum(), trimmed.abs().sum()
    return trimmed if before < eps or after < eps else trimmed * (before / after)


def _stock_trim(
    task_vector: torch.Tensor,
    density: float,
    parameters: Mapping[str, Any],
    method: SparsificationMethod | None,
    where: str,
) -> torch.Tensor:
    if method is None:
        raise ValueError(f"{where} has no Hessian statistics, which this method needs")
    rescale = RescaleNorm.l1 if parameters.get("rescale") else None
    return sparsify(task_vector, density, method, rescale_norm=rescale)


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


# mergekit's registry may have waited for this module to finish executing (see _autoload).
retry_deferred_registration()
