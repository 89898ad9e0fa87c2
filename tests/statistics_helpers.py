"""Test helpers over the statistics cache that the package itself has no use for."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mergekit_sparsegpt.capture.accumulate import LayerHessians
from mergekit_sparsegpt.statistics import keys
from mergekit_sparsegpt.statistics.hessian import hessian_statistics
from mergekit_sparsegpt.statistics.resumable import EntryWriter
from mergekit_sparsegpt.statistics.task_statistics import TaskStatistics


def save_statistics(path: Path, statistics: TaskStatistics, payload: dict[str, Any]) -> None:
    """Write statistics held in memory (with their matrices) as one entry, atomically."""
    with EntryWriter(path, payload) as writer:
        writer.commit(statistics)


def rekeyed_to_current_format(entry: Path, payload: dict[str, Any], out: Path) -> dict[str, Any]:
    """Copy the entry of an older format to ``out`` under the current format's key, its tensors
    and other metadata unchanged; return that payload."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(entry, framework="pt") as handle:
        metadata = handle.metadata()
    current = {**payload, "format": keys.FORMAT_VERSION}
    metadata.update(key=keys.canonical(current), format=str(keys.FORMAT_VERSION))
    save_file(load_file(entry), out, metadata=metadata)
    return current


def never_ran(statistics: TaskStatistics) -> list[str]:
    """Matrices no calibration token reached (an unrouted expert), ranked by |tau| alone."""
    return [
        matrix
        for matrix, group in statistics.groups.items()
        if not statistics.samples.get(group, 0)
    ]


PAYLOAD = {"format": keys.FORMAT_VERSION, "model": "./m", "tokens": "abc", "dampening": 0.01}


def sample_statistics() -> TaskStatistics:
    task = TaskStatistics.empty("model.layers")
    inputs = torch.randn(20, 4, generator=torch.Generator().manual_seed(0))
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"):
        task.groups[name] = name
        task.statistics[name] = hessian_statistics(2 / 20 * inputs.T @ inputs)
        task.samples[name] = 20
    task.groups["model.layers.0.self_attn.k_proj.weight"] = "model.layers.0.self_attn.q_proj.weight"
    task.linear_suffixes = frozenset({"self_attn.q_proj.weight", "self_attn.k_proj.weight"})
    return task


Q, K, DOWN = (
    "model.layers.{}.self_attn.q_proj.weight",
    "model.layers.{}.self_attn.k_proj.weight",
    "model.layers.{}.mlp.down_proj.weight",
)


def sample_layers() -> list[LayerHessians]:
    """Two blocks, each with an attention group (q, k) and a down_proj group of other width."""
    generator = torch.Generator().manual_seed(3)
    layers = []
    for index in range(2):
        hessians = {}
        for name, columns in ((Q.format(index), 4), (DOWN.format(index), 6)):
            inputs = torch.randn(30, columns, generator=generator)
            hessians[name] = 2 / 30 * inputs.T @ inputs
        groups = {Q.format(index): Q.format(index), K.format(index): Q.format(index)}
        groups[DOWN.format(index)] = DOWN.format(index)
        layers.append(LayerHessians(hessians, groups, dict.fromkeys(hessians, 30)))
    return layers


def streamed_statistics(writer, keep_factors: bool) -> TaskStatistics:
    statistics = TaskStatistics.empty("model.layers")
    for layer in sample_layers():
        statistics.add_layer(layer, 0.01, keep_factors, keep_hessians=True, store_matrix=writer.add)
    return statistics


def in_memory_statistics(keep_factors: bool) -> TaskStatistics:
    statistics = TaskStatistics.empty("model.layers")
    for layer in sample_layers():
        statistics.add_layer(layer, 0.01, keep_factors, keep_hessians=True)
    return statistics
