"""``hessian_source: merged`` (RegMean++): every task's Hessians on the merged model's inputs.

RegMean fits each linear to every model's outputs on that model's own inputs, but the merged
model feeds each linear the merged model's activations. RegMean++ (Nguyen et al. 2025,
https://arxiv.org/abs/2508.03121) measures each task's inputs in the merged model instead. Those
inputs exist only once everything before a linear is merged, so the pre-pass builds the merge
itself, block by block and input group by input group, with the method's own kernel
(``merge_group``), exactly as mergekit will call it afterwards from the statistics cached here.

All tasks are computed together (each task's statistics depend on every model and on every
parameter of the merge) and each is cached under a key that covers all of that.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable, Hashable, Mapping
from pathlib import Path
from typing import Any

import torch
from mergekit.common import ModelReference
from mergekit.options import MergeOptions
from transformers import PretrainedConfig

from mergekit_sparsegpt.capture.accumulate import LayerHessians
from mergekit_sparsegpt.capture.distributed import SINGLE_PROCESS, Ranks, shard_windows
from mergekit_sparsegpt.capture.merged import capture_merged_hessians
from mergekit_sparsegpt.capture.model import TensorSource, empty_model
from mergekit_sparsegpt.methods.base import PluginMethod
from mergekit_sparsegpt.methods.context import (
    MergeContext,
    PlannedTensor,
    TaskKey,
    bias_of,
)
from mergekit_sparsegpt.prepass.merged_tensors import MergedTensors
from mergekit_sparsegpt.prepass.messages import say
from mergekit_sparsegpt.prepass.model_identity import identity
from mergekit_sparsegpt.prepass.plan import MERGED, CalibrationTask, PrepassSettings
from mergekit_sparsegpt.prepass.task_statistics import (
    empty_statistics,
    hessian_errors_explained,
    model_roles,
)
from mergekit_sparsegpt.statistics.cache_dir import default_cache_dir
from mergekit_sparsegpt.statistics.checkpoint import ResumePoint
from mergekit_sparsegpt.statistics.entries import load_statistics
from mergekit_sparsegpt.statistics.keys import (
    cache_path,
    config_fingerprint,
    model_weights_fingerprint,
    statistics_payload,
    tokens_fingerprint,
)
from mergekit_sparsegpt.statistics.rank_checkpoint import CheckpointSet
from mergekit_sparsegpt.statistics.resumable import EntryWriter
from mergekit_sparsegpt.statistics.store import Entry, Steps, get_or_compute
from mergekit_sparsegpt.statistics.task_statistics import TaskStatistics, discard_matrix


def check_merged_source(planned: list[PlannedTensor], method: PluginMethod) -> None:
    """The merged model has the base's layout: refuse what would break that, by name."""
    if not method.supports_merged_source:
        raise ValueError(
            f"hessian_source: {MERGED} (RegMean++) is for regmean and sparsegpt_regmean, not "
            f"{method.spec.name}; use finetuned or base"
        )
    for tensor in planned:
        moved = [str(m) for m, name in tensor.inputs.items() if name != tensor.output_name]
        if moved:
            raise ValueError(
                f"hessian_source: {MERGED} merges layer by layer in the base model's layout, but "
                f"{tensor.output_name} comes from another tensor of {', '.join(moved)} (slices "
                "with layer offsets); use hessian_source: finetuned for such merges"
            )


# Parameters that say where and how the statistics are kept, not what the merge is.
STORAGE_PARAMETERS = frozenset({"cache_dir", "calibration_batch_size", "keep_statistics"})


def merge_fingerprint(method_name: str, planned: list[PlannedTensor]) -> str:
    """Everything the merged model depends on besides weights and tokens: every tensor's
    resolved parameters (not ``STORAGE_PARAMETERS``: a cache moved elsewhere still serves)."""
    record = [
        [
            t.output_name,
            sorted((k, v) for k, v in t.shared.items() if k not in STORAGE_PARAMETERS),
            sorted((identity(m), sorted(v.items())) for m, v in t.per_input.items()),
        ]
        for t in planned
    ]
    text = json.dumps([method_name, record], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def merge_payload(
    planned: list[PlannedTensor],
    method: PluginMethod,
    windows: Mapping[TaskKey, torch.Tensor],
    settings: PrepassSettings,
    options: MergeOptions,
    **identity_fields: Any,
) -> dict[str, Any]:
    """The cache payload of what depends on the whole merge (``identity_fields`` say what
    it is): every model's weights, every task's tokens, every parameter."""
    base = planned[0].base_model
    assert base is not None  # the methods that compute such entries require one
    models = sorted({m for t in planned for m in t.inputs}, key=str)
    return statistics_payload(
        **identity_fields,
        merge=merge_fingerprint(method.spec.name, planned),
        weights={identity(model): model_weights_fingerprint(model) for model in models},
        config=config_fingerprint(base.config(options.trust_remote_code)),
        tokens={f"{identity(k[0])} on {k[1]}": tokens_fingerprint(w) for k, w in windows.items()},
        token_shape=list(next(iter(windows.values())).shape),
        dampening=settings.dampening,
        factors=settings.keep_factors,
        hessians=True,
    )


def merged_model_statistics(
    planned: list[PlannedTensor],
    method: PluginMethod,
    tasks: list[CalibrationTask],
    windows: Mapping[TaskKey, torch.Tensor],
    settings: PrepassSettings,
    options: MergeOptions,
    readers: Mapping[ModelReference, TensorSource],
    ranks: Ranks = SINGLE_PROCESS,
) -> dict[TaskKey, TaskStatistics]:
    """Every task's statistics with the merged model as the forward model, from the cache when
    every task's entry is there (with several ``ranks``: on the main rank; {} on the others)."""
    shared = merge_payload(planned, method, windows, settings, options, hessian_source=MERGED)
    cache_dir = settings.cache_dir or default_cache_dir()
    entries = {}
    for task in tasks:
        payload = {**shared, "task": _task_name(task.key)}
        entries[task.key] = Entry(cache_path(cache_dir, payload), payload)
    config = planned[0].base_model.config(options.trust_remote_code)  # type: ignore[union-attr]
    joint = JointPass(planned, method, config, windows, settings, options, readers, ranks)
    # Every task's entry comes from one joint pass: all their locks are held, in one order.
    found = get_or_compute(
        entries,
        Steps(lambda: _cached(entries, options), joint.compute, prepare=joint.prepare),
        lambda lock: _say_waiting(lock, options),
        ranks,
        resumable=True,
    )
    return dict(found or {})


def _cached(
    entries: Mapping[TaskKey, Entry], options: MergeOptions
) -> dict[TaskKey, TaskStatistics] | None:
    found = {key: load_statistics(entry.path, entry.payload) for key, entry in entries.items()}
    if not all(stats is not None for stats in found.values()):
        return None
    if not options.quiet:
        for key, entry in entries.items():
            print(
                f"Hessian statistics for {key[0]} (merged model) from cache {entry.path}",
                file=sys.stderr,
            )
    return found  # type: ignore[return-value]


# What a pass keeps of each merge unit: every task's Hessians of it and the merged values.
UnitSink = Callable[[dict[Hashable, LayerHessians], dict[str, torch.Tensor]], None]


class JointPass:
    """Every task's statistics from one forward pass through the merged model, which is
    merged unit by unit as it goes (``capture_merged_hessians``). With several ``ranks`` each
    runs its share of every task's windows (``shards``) and every rank builds the same merge."""

    def __init__(
        self,
        planned: list[PlannedTensor],
        method: PluginMethod,
        config: PretrainedConfig,
        windows: Mapping[TaskKey, torch.Tensor],
        settings: PrepassSettings,
        options: MergeOptions,
        readers: Mapping[ModelReference, TensorSource],
        ranks: Ranks = SINGLE_PROCESS,
    ) -> None:
        self.planned, self.method, self.config, self.windows = planned, method, config, windows
        self.settings, self.options, self.readers, self.ranks = settings, options, readers, ranks

    def prepare(self) -> None:
        self.shards = {
            key: shard_windows(task_windows, self.ranks, str(key[0]))  # type: ignore[index]
            for key, task_windows in self.windows.items()
        }
        self.model = empty_model(self.config, self.options.trust_remote_code)
        self.planned_names = {tensor.output_name for tensor in self.planned}
        self.statistics = {
            key: empty_statistics(self.model, task_windows, self.planned_names)
            for key, task_windows in self.windows.items()
        }
        hessian_inputs = {t.output_name: {m: t.output_name for m in t.inputs} for t in self.planned}
        self.roles = model_roles(self.model, self.planned_names)
        self.context = MergeContext(
            hessian_inputs,
            tasks=self.statistics,
            roles=self.roles,
            planned_inputs={tensor.output_name: tensor.inputs for tensor in self.planned},
            read_tensor=lambda model, name: self.readers[model](name).to(torch.float32),
        )
        device = self.ranks.device(self.options.device)
        self.merged = MergedTensors(self.planned, self.method, self.context, self.readers, device)

    def run(self, keep: UnitSink, **progress: Any) -> None:
        """The pass; ``progress`` goes to ``capture_merged_hessians`` (held, resume,
        block_finished)."""

        def merge_group(hessians: dict[Hashable, LayerHessians]) -> dict[str, torch.Tensor]:
            return merge_unit(self.statistics, self.merged, self.settings, hessians, keep, True)

        capture_merged_hessians(
            self.model,
            self.merged,
            self.shards,
            merge_group,
            device=self.ranks.device(self.options.device),
            batch_size=self.settings.calibration_batch_size,
            progress=not self.options.quiet and self.ranks.main,
            description=f"RegMean++ Hessians through the merged model ({len(self.windows)} tasks)",
            ranks=self.ranks,
            **progress,
        )

    def compute(
        self, writers: Mapping[TaskKey, EntryWriter | None]
    ) -> dict[TaskKey, TaskStatistics]:
        """Each task's statistics, its whole matrices streamed to its own entry; resumed
        after the last block every entry's checkpoint holds."""

        def keep(hessians: dict[Hashable, LayerHessians], _: dict[str, torch.Tensor]) -> None:
            for key, layer in hessians.items():
                writer = writers[key]  # None on ranks other than the main one
                for group in layer.hessians:
                    self.statistics[key].move_matrices(
                        group, writer.add if writer else discard_matrix
                    )

        checkpoints = CheckpointSet(writers, self.ranks)
        resumed = checkpoints.resume_point()
        if resumed is not None and self.ranks.main:
            self.statistics.update({k: p.statistics for k, p in resumed[1].items()})  # type: ignore[misc]
            say(self.options, f"RegMean++ statistics: resuming at block {resumed[0]}")

        def block_finished(index: int, outputs: dict[Hashable, torch.Tensor]) -> None:
            contents = {key: self.statistics[key] for key in writers}
            checkpoints.block_finished(index, outputs, contents)  # type: ignore[arg-type]

        self.run(
            keep,
            resume=None if resumed is None else (resumed[0], _activations(resumed[1])),
            block_finished=block_finished if checkpoints.resumable else None,
        )
        return self.statistics


def merge_unit(
    statistics: Mapping[Hashable, TaskStatistics],
    merged: MergedTensors,
    settings: PrepassSettings,
    hessians: dict[Hashable, LayerHessians],
    keep: UnitSink,
    through_merged: bool,
) -> dict[str, torch.Tensor]:
    """Add every task's Hessians of one unit to its statistics, merge the unit's tensors (and
    their linears' biases) with them, and hand both to ``keep``; return the merged values."""
    for key, layer in hessians.items():
        model, calibration = key  # type: ignore[misc]
        with hessian_errors_explained(model, calibration, merged=through_merged):
            statistics[key].add_layer(
                layer, settings.dampening, settings.keep_factors, keep_hessians=True
            )
    tensors = next(iter(hessians.values())).tensor_names()
    # A linear's bias is solved with it, from the same Grams.
    tensors += [bias for name in tensors if (bias := bias_of(name)) is not None]
    # A tied head is no tensor of the merge: its Hessians serve the token embedding's merge.
    values = {name: merged.solved(name) for name in tensors if name in merged.by_name}
    keep(hessians, values)
    return values


def _activations(points: Mapping[Any, ResumePoint]) -> dict[Hashable, torch.Tensor]:
    return {key: point.activations for key, point in points.items()}  # type: ignore[misc]


def _say_waiting(lock: Path, options: MergeOptions) -> None:
    say(options, f"Waiting for {lock}: another process is computing RegMean++ statistics")


def _task_name(key: TaskKey) -> str:
    return f"{key[0]} on {key[1]}"
