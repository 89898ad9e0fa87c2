"""The trimming step: each task vector cut to its top-``density`` entries by importance.

Shared by every trimming method (``sparsegpt_ties``, ``sparsegpt_dare``, ``sparsegpt_regmean``);
each [out, in] matrix of a checkpoint tensor is trimmed with its own Hessian statistics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from mergekit.sparsify import (
    RescaleNorm,
    SparsificationMethod,
    rescaled_masked_tensor,
    sparsify,
)

from mergekit_sparsegpt.capture.accumulate import TensorLayout
from mergekit_sparsegpt.statistics.hessian import HessianError, HessianStatistics
from mergekit_sparsegpt.statistics.task_statistics import TensorStatistics
from mergekit_sparsegpt.trim.compensation import compensated_trim
from mergekit_sparsegpt.trim.importance import importance_scores, top_density_mask
from mergekit_sparsegpt.trim.metrics import trim_entry


def trim_task_vectors(
    base: torch.Tensor,
    models: Sequence[tuple[Any, torch.Tensor]],
    statistics: Mapping[Any, TensorStatistics | None],
    parameters: Mapping[str, Any],
    name: str,
    stock_method: SparsificationMethod | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor | None], dict[str, dict[str, Any]]]:
    """Every trimmed task vector and its mask, and the report entries of the Hessian ones.

    ``models``: (model, tensor) of every merged model, in the group's order. Takes plain tensors
    so that this layer stays below mergekit's merge methods. Reads ``density`` (per model),
    ``importance``, ``selection``, ``compensate`` and, where the method has it, ``rescale``. A
    model without statistics is trimmed by ``stock_method``.
    """
    trimmed, masks, report = [], [], {}
    for model, tensor in models:
        task_vector = tensor - base
        stats = statistics[model]
        density = parameters["density"][model]
        where = f"{name} of model {model}"
        if stats is None:
            vector, mask = _stock_trim(task_vector, density, parameters, stock_method, where), None
        else:
            vector, mask, report[str(model)] = trim_tensor_task_vector(
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
    resolved = [
        _with_upper_factor(stats, task_vector.device, _matrix_where(where, index, layout))
        if parameters["compensate"]
        else stats
        for index, stats in enumerate(statistics.matrices)
    ]
    trims = [
        trim_task_vector(matrix, stats, density, parameters, _matrix_where(where, index, layout))
        for index, (matrix, stats) in enumerate(zip(matrices, resolved, strict=True))
    ]
    entries = [
        trim_entry(matrix, vector, mask, stats, density, bool(parameters.get("rescale")))
        for matrix, (vector, mask), stats in zip(matrices, trims, resolved, strict=True)
    ]
    vector = layout.assemble([vector for vector, _ in trims])
    mask = layout.assemble([mask for _, mask in trims])
    return vector, mask, tensor_entry(entries, statistics)


def _with_upper_factor(
    statistics: HessianStatistics, device: torch.device, where: str
) -> HessianStatistics:
    """The statistics with U of H^-1 at hand, so that the re-fit and the report's three error
    estimates share one factor; when only H is stored, U is computed once, on the task
    vector's device (where the re-fit runs)."""
    if statistics.cholesky_factor is not None or statistics.hessian is None:
        return statistics
    on_device = replace(statistics, hessian=statistics.hessian.to(device))
    return replace(statistics, cholesky_factor=_upper_factor(on_device, where))


def _upper_factor(statistics: HessianStatistics, where: str) -> torch.Tensor | None:
    try:
        return statistics.upper_factor()
    except HessianError as error:
        raise ValueError(f"{where}: {error}") from None


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
    factor = _upper_factor(statistics, where)
    if factor is None:
        raise ValueError(
            f"{where}: compensate needs the Cholesky factor of its Hessian, which is missing "
            "(the pseudo-inverse fallback was used, or the statistics were computed without "
            "compensate); delete that cache entry or raise dampening"
        )
    compensated = compensated_trim(task_vector, factor, mask)
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
