"""The pre-pass: validate the config, load calibration data, and compute (or load) Hessians.

mergekit plans one kernel call per output tensor and gives a kernel no way to add graph
dependencies, so the statistics are prepared here, before ``run_merge`` starts, and handed to
the kernels through ``context.activated``. Everything a user can get wrong is checked before
any weight is read.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions
from tqdm.auto import tqdm

from mergekit_sparsegpt.capture.distributed import (
    SINGLE_PROCESS,
    Ranks,
    decided_by_main,
    launched_ranks,
)
from mergekit_sparsegpt.capture.model import empty_model
from mergekit_sparsegpt.methods.context import CardFacts, MergeContext, PlannedTensor, activated
from mergekit_sparsegpt.prepass.checked_merge import checked_merge
from mergekit_sparsegpt.prepass.local_paths import spelled_as_local
from mergekit_sparsegpt.prepass.merged_source import MERGED, merged_model_statistics
from mergekit_sparsegpt.prepass.messages import say
from mergekit_sparsegpt.prepass.solving import (
    SolvingPass,
    cached_solved_linears,
    kept_statistics,
    merged_linears,
    per_task_reason,
    solved_entry,
    storage_dtype,
)
from mergekit_sparsegpt.prepass.staged_output import staged_output
from mergekit_sparsegpt.prepass.task_statistics import model_roles, task_statistics
from mergekit_sparsegpt.prepass.tasks import (
    all_task_windows,
    calibration_tasks,
    resolve_seq_len,
    window_shapes,
)
from mergekit_sparsegpt.reporting.model_card import append_to_card, card_section
from mergekit_sparsegpt.reporting.run_report import usage_summary, write_report
from mergekit_sparsegpt.statistics.task_statistics import ModelRoles
from mergekit_sparsegpt.termination import sigterm_as_interrupt
from mergekit_sparsegpt.trim.metrics import REPORT_FILE

LOG = logging.getLogger(__name__)


def prepare_statistics(
    merge_config: MergeConfiguration, options: MergeOptions, ranks: Ranks = SINGLE_PROCESS
) -> MergeContext:
    """Validate ``merge_config`` and return the statistics every kernel call will need.

    With several ``ranks`` (``torchrun``), every rank takes its share of each task's windows;
    the statistics are cached and returned by the main rank only (the others get no tasks).
    SIGTERM stops it as Ctrl-C does, keeping the resume checkpoint.
    """
    with sigterm_as_interrupt():
        return _prepare_statistics(merge_config, options, ranks)


def _prepare_statistics(
    merge_config: MergeConfiguration, options: MergeOptions, ranks: Ranks
) -> MergeContext:
    checked = checked_merge(merge_config, options)
    method, planned, settings, readers = (
        checked.method,
        checked.planned,
        checked.settings,
        checked.readers,
    )
    _warn_if_compensated_and_rescaled(planned)
    tasks, hessian_inputs = calibration_tasks(planned, settings)
    settings = resolve_seq_len(settings, tasks, options, ranks)
    windows = all_task_windows(tasks, settings, options)
    facts = CardFacts(method.spec.name, planned, window_shapes(windows))
    context = partial(
        MergeContext,
        hessian_inputs,
        card_facts=facts,
        roles=_roles(planned, options),
        planned_inputs={tensor.output_name: tensor.inputs for tensor in planned},
        read_tensor=lambda model, name: readers[model](name).to(torch.float32),
    )
    per_task = per_task_reason(method, planned, settings, tasks)
    if per_task is None:
        base = planned[0].base_model
        dtype = storage_dtype(merge_config, readers[base], planned[0].inputs[base])
        entry = solved_entry(planned, method, windows, settings, options, dtype)
        # Only the main rank reads the cache; the others follow what it found.
        merged = cached_solved_linears(entry, options) if ranks.main else None
        kept = None
        if merged is None and ranks.main:
            kept = kept_statistics(tasks, windows, settings, options)
        if decided_by_main(kept is not None, ranks):
            if ranks.main:
                say(options, "Every task's statistics are in the cache: merging from them")
            return context(tasks=kept or {})
        if not decided_by_main(merged is not None, ranks):
            solving = SolvingPass(
                planned, method, windows, tasks, settings, options, readers, dtype, ranks
            )
            merged = merged_linears(entry, solving)
        return context(tasks={}, merged=merged)
    if per_task and ranks.main:
        say(options, f"Caching every task's statistics, not the solved linears: {per_task}")
    if settings.hessian_source == MERGED:
        statistics = merged_model_statistics(
            planned, method, tasks, windows, settings, options, readers, ranks
        )
    else:
        computed = {
            task.key: task_statistics(task, windows[task.key], settings, options, ranks)
            for task in tqdm(
                tasks, desc="Calibrating tasks", disable=options.quiet or not ranks.main
            )
        }
        statistics = {key: value for key, value in computed.items() if value is not None}
    return context(tasks=statistics)


def _roles(planned: list[PlannedTensor], options: MergeOptions) -> ModelRoles | None:
    """Where the base model keeps its token embedding and head (for the report)."""
    base = planned[0].base_model if planned else None
    if base is None:
        return None
    trust = options.trust_remote_code
    names = {tensor.output_name for tensor in planned}
    return model_roles(empty_model(base.config(trust), trust), names)


def _warn_if_compensated_and_rescaled(planned: list[PlannedTensor]) -> None:
    if any(t.shared.get("compensate") and t.shared.get("rescale") for t in planned):
        LOG.warning(
            "compensate and rescale are both on: the re-fitted task vectors already make up for "
            "the dropped entries, and rescale scales them up again, on top of each weight. "
            "Measured (docs/compensation.md): it wrecked a merge with weights 1 "
            "and helped one with weights 1/5. For predictable strength set rescale: false and "
            "choose the weights."
        )


def run_with_statistics(
    run_merge: Callable[..., Any],
    merge_config: MergeConfiguration,
    out_path: str,
    options: MergeOptions,
    *args: Any,
    **kwargs: Any,
) -> Any:
    """``run_merge`` with the pre-pass in front, written through a private directory that becomes
    ``out_path`` only when the merge is whole (see ``staged_output``)."""
    if launched_ranks().world_size > 1:
        raise ValueError(
            "A merge runs in one process. Under torchrun, run `mergekit-sparsegpt calibrate "
            "CONFIG` to fill the statistics cache, then the merge without torchrun: it reads "
            "the cache."
        )
    merge_config = spelled_as_local(merge_config, partial(say, options))
    staged = staged_output(out_path, local_inputs(merge_config), partial(say, options))
    with sigterm_as_interrupt(), staged as out:
        context = prepare_statistics(merge_config, options)
        with activated(context):
            result = run_merge(merge_config, str(out.path), options, *args, **kwargs)
        if out.path.is_dir():
            write_report(context, str(out.path / REPORT_FILE))
            if options.write_model_card:
                append_to_card(str(out.path), card_section(context))
    say(options, usage_summary(merge_config.merge_method, context))
    return result


def local_inputs(merge_config: MergeConfiguration) -> list[str]:
    """The directories on disk the merge reads: models and LoRA adapters."""
    paths = []
    for model in merge_config.referenced_models():
        paths += [model.model.path] + ([model.lora.path] if model.lora is not None else [])
    return [path for path in paths if os.path.isdir(path)]
