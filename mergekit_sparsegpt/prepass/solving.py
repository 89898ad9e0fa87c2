"""RegMean's default storage: the pre-pass solves every linear and caches the merged linears.

RegMean needs, for each linear, every task's Hessian of it and nothing more. So the pre-pass
runs the tasks block by block in lockstep (``hessian_source`` finetuned or base:
``capture_lockstep_hessians``; merged: the RegMean++ pass, which builds the merge anyway),
solves each linear with the method's own kernel as soon as its Hessians exist, and caches the
merged value in the output dtype. Each task's whole Grams are dropped once used: the cache holds
one merged model's linears whatever the number of experts, and the merge reads them instead of
solving again. ``keep_statistics: true`` caches every task's Grams instead (prepass.run).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from mergekit.common import ModelReference, dtype_from_name
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions

from mergekit_sparsegpt.capture.accumulate import LayerHessians
from mergekit_sparsegpt.capture.distributed import SINGLE_PROCESS, Ranks, together
from mergekit_sparsegpt.capture.lockstep import ForwardModel, capture_lockstep_hessians
from mergekit_sparsegpt.capture.model import TensorSource, empty_model
from mergekit_sparsegpt.capture.weights import CheckpointReader
from mergekit_sparsegpt.methods.base import PluginMethod
from mergekit_sparsegpt.methods.context import PlannedTensor, TaskKey
from mergekit_sparsegpt.prepass.merged_source import (
    JointPass,
    UnitSink,
    merge_payload,
    merge_unit,
)
from mergekit_sparsegpt.prepass.messages import say
from mergekit_sparsegpt.prepass.plan import MERGED, CalibrationTask, PrepassSettings
from mergekit_sparsegpt.prepass.task_statistics import cached_task_statistics
from mergekit_sparsegpt.prepass.tasks import uses_exported_statistics
from mergekit_sparsegpt.statistics.cache_dir import default_cache_dir
from mergekit_sparsegpt.statistics.keys import (
    cache_path,
)
from mergekit_sparsegpt.statistics.merged_linears import (
    KIND,
    MergedLinears,
    load_merged_linears,
    read_merged_linears,
)
from mergekit_sparsegpt.statistics.rank_checkpoint import RankCheckpoint
from mergekit_sparsegpt.statistics.resumable import EntryWriter
from mergekit_sparsegpt.statistics.store import Entry, Steps, get_or_compute
from mergekit_sparsegpt.statistics.task_statistics import TaskStatistics, discard_matrix


def per_task_reason(
    method: PluginMethod,
    planned: list[PlannedTensor],
    settings: PrepassSettings,
    tasks: list[CalibrationTask],
) -> str | None:
    """Why this merge keeps every task's statistics instead of solving in the pre-pass
    ("": the user asked for it), or None when the pre-pass solves the linears."""
    if not method.solves_in_prepass:
        return ""
    if any(t.shared.get("keep_statistics") for t in planned):
        return ""
    if uses_exported_statistics(tasks):
        return "models read exported statistics (statistics:)"
    moved = [t.output_name for t in planned if any(n != t.output_name for n in t.inputs.values())]
    if moved:
        return f"{moved[0]} comes from another tensor of a model (slices with layer offsets)"
    return None


def storage_dtype(
    merge_config: MergeConfiguration, base: CheckpointReader, tensor: str
) -> torch.dtype:
    """The dtype mergekit writes the merged model in: out_dtype, else dtype, else the base
    checkpoint's own (read from its safetensors header where it has one)."""
    name = merge_config.out_dtype or merge_config.dtype
    if name:
        return dtype_from_name(name)
    stored = base.stored(tensor)
    return stored.dtype if stored is not None else base(tensor).dtype


def solved_entry(
    planned: list[PlannedTensor],
    method: PluginMethod,
    windows: Mapping[TaskKey, torch.Tensor],
    settings: PrepassSettings,
    options: MergeOptions,
    dtype: torch.dtype,
) -> Entry:
    """The cache entry of this merge's solved linears."""
    payload = merge_payload(
        planned,
        method,
        windows,
        settings,
        options,
        kind=KIND,
        hessian_source=settings.hessian_source,
        dtype=str(dtype).removeprefix("torch."),
    )
    return Entry(cache_path(settings.cache_dir or default_cache_dir(), payload), payload)


def cached_solved_linears(entry: Entry, options: MergeOptions) -> MergedLinears | None:
    found = load_merged_linears(entry.path, entry.payload)
    if found is not None:
        say(options, f"Solved linears of this merge from cache {entry.path}")
    return found


def kept_statistics(
    tasks: list[CalibrationTask],
    windows: Mapping[TaskKey, torch.Tensor],
    settings: PrepassSettings,
    options: MergeOptions,
) -> dict[TaskKey, TaskStatistics] | None:
    """Every task's statistics if the cache holds them all (a ``calibrate`` under torchrun, or
    an earlier merge with ``keep_statistics``): merging from them is cheaper than solving."""
    if settings.hessian_source == MERGED:  # its per-task entries depend on the whole merge
        return None
    found = {}
    for task in tasks:
        statistics = cached_task_statistics(task, windows[task.key], settings, options)
        if statistics is None:
            return None
        found[task.key] = statistics
    return found


def merged_linears(entry: Entry, solving: SolvingPass) -> MergedLinears | None:
    """Every linear of the merge solved, from the cache or computed by ``solving`` and cached
    (None on ranks other than the main one: they help compute, the main rank caches)."""
    options = solving.options

    def cached() -> dict[str, MergedLinears] | None:
        found = cached_solved_linears(entry, options)
        return None if found is None else {KIND: found}

    found = get_or_compute(
        {KIND: entry},
        Steps(
            cached,  # type: ignore[arg-type]
            solving.compute,  # type: ignore[arg-type]
            prepare=solving.prepare,
            written=lambda _: say(options, f"Solved linears written to cache {entry.path}"),
            read=read_merged_linears,
        ),
        lambda lock: say(options, f"Waiting for {lock}: another process is solving this merge"),
        solving.ranks,
        resumable=True,
    )
    return None if found is None else found[KIND]  # type: ignore[return-value]


@dataclass
class SolvingPass:
    """The pass that calibrates every task and solves each linear as soon as it can."""

    planned: list[PlannedTensor]
    method: PluginMethod
    windows: Mapping[TaskKey, torch.Tensor]
    tasks: list[CalibrationTask]
    settings: PrepassSettings
    options: MergeOptions
    readers: Mapping[ModelReference, TensorSource]
    dtype: torch.dtype  # of the stored linears: the merge's output dtype
    ranks: Ranks = SINGLE_PROCESS  # each runs its share of every task's windows

    def prepare(self) -> None:
        base = self.planned[0].base_model
        assert base is not None
        config = base.config(self.options.trust_remote_code)
        self.joint = JointPass(
            self.planned,
            self.method,
            config,
            self.windows,
            self.settings,
            self.options,
            self.readers,
            self.ranks,
        )
        self.joint.prepare()
        self.reports: dict[str, dict[str, Any]] = {}

    def compute(self, writers: Mapping[str, EntryWriter | None]) -> dict[str, MergedLinears]:
        writer = writers[KIND]  # None on ranks other than the main one

        def keep(hessians: dict[Hashable, LayerHessians], values: dict[str, torch.Tensor]) -> None:
            for name, value in values.items():
                if writer is not None:
                    writer.add(name, value.to(self.dtype).contiguous())
                self.reports[name] = self.joint.context.report[name]
            if not values:  # a tied head's Grams wait for the token embedding's merge
                return
            for key, layer in hessians.items():
                for group in layer.hessians:
                    self.joint.statistics[key].move_matrices(group, discard_matrix)

        progress = _Progress(self, writer)
        if self.settings.hessian_source == MERGED:
            self.joint.run(keep, **progress.arguments())
        else:
            self._lockstep(keep, progress)
        # Last: a tied embedding's rule reads the head's Grams, which exist only now.
        embedding = self.joint.roles.embedding
        if any(tensor.output_name == embedding for tensor in self.planned):
            with together(self.ranks):
                keep({}, {embedding: self.joint.merged.solved(embedding)})  # type: ignore[dict-item]
        return {KIND: MergedLinears(self.reports)}

    def _lockstep(self, keep: UnitSink, progress: _Progress) -> None:
        statistics, merged = self.joint.statistics, self.joint.merged

        def block_done(_: int, hessians: dict[Hashable, LayerHessians]) -> None:
            with together(self.ranks):
                merge_unit(statistics, merged, self.settings, hessians, keep, False)

        capture_lockstep_hessians(
            self._forward_models(),
            block_done,
            device=self.ranks.device(self.options.device),
            batch_size=self.settings.calibration_batch_size,
            progress=not self.options.quiet and self.ranks.main,
            ranks=self.ranks,
            description=f"RegMean Hessians, solved block by block ({len(self.windows)} tasks)",
            **progress.arguments(),
        )

    def say_held(self, size: int) -> None:
        if not self.ranks.main:  # each rank holds its share; the main rank speaks for all
            return
        share = ", this process's share of the windows" if self.ranks.world_size > 1 else ""
        say(
            self.options,
            f"Every task's calibration activations are held on the host: {size / 2**30:.2f} GiB "
            f"({size:,} bytes, {len(self.windows)} tasks{share})",
        )

    def _forward_models(self) -> list[ForwardModel]:
        by_model: dict[ModelReference, dict[Hashable, torch.Tensor]] = {}
        for task in self.tasks:
            by_model.setdefault(task.forward_model, {})[task.key] = self.joint.shards[task.key]
        trust = self.options.trust_remote_code
        return [
            ForwardModel(empty_model(model.config(trust), trust), self.readers[model], windows)
            for model, windows in sorted(by_model.items(), key=lambda item: str(item[0]))
        ]


class _Progress:
    """What a solving pass tells its capture besides the work: where an interrupted run
    stopped (``resume``), where to checkpoint (``block_finished``) and what to say (``held``)."""

    def __init__(self, solving: SolvingPass, writer: EntryWriter | None) -> None:
        self.solving = solving
        self.checkpoint = RankCheckpoint(writer, solving.ranks)
        self.order = list(solving.windows)  # the checkpoint's activations, one per task

    def arguments(self) -> dict[str, Any]:
        return {
            "resume": self._resume() if self.checkpoint.resumable else None,
            "block_finished": self._block_finished if self.checkpoint.resumable else None,
            "held": self.solving.say_held,
        }

    def _resume(self) -> tuple[int, dict[Hashable, torch.Tensor]] | None:
        resumed = self.checkpoint.resume_point()
        if resumed is None or not isinstance(resumed.activations, list):
            return None
        writer = self.checkpoint.writer
        if writer is not None:  # the main rank, which alone keeps the reports
            assert isinstance(resumed.statistics, MergedLinears)
            self.solving.reports.update(resumed.statistics.reports)
            say(
                self.solving.options,
                f"Solving this merge: resuming at block {resumed.next_block} from checkpoint "
                f"{writer.checkpoint}",
            )
        return resumed.next_block, dict(zip(self.order, resumed.activations, strict=True))

    def _block_finished(self, index: int, outputs: dict[Hashable, torch.Tensor]) -> None:
        activations = [outputs[key] for key in self.order]
        reports = MergedLinears(dict(self.solving.reports))
        self.checkpoint.block_finished(index, activations, reports)
