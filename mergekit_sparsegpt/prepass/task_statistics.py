"""One task's statistics: from the cache, or from the calibration forward pass."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch
from mergekit.common import ModelReference
from mergekit.options import MergeOptions
from transformers import PretrainedConfig

from mergekit_sparsegpt.capture.architecture import decoder_layers
from mergekit_sparsegpt.capture.blocks import capture_layer_hessians
from mergekit_sparsegpt.capture.distributed import (
    SINGLE_PROCESS,
    Ranks,
    all_reduced_layers,
    shard_windows,
    together,
)
from mergekit_sparsegpt.capture.head import (
    embedding_weight_name,
    head_weight_name,
    ties_embeddings,
)
from mergekit_sparsegpt.capture.model import empty_model
from mergekit_sparsegpt.capture.weights import (
    CheckpointReader,
)
from mergekit_sparsegpt.prepass.exported import exported_statistics
from mergekit_sparsegpt.prepass.messages import say
from mergekit_sparsegpt.prepass.model_identity import identity
from mergekit_sparsegpt.prepass.plan import CalibrationTask, PrepassSettings
from mergekit_sparsegpt.statistics.cache_dir import default_cache_dir
from mergekit_sparsegpt.statistics.entries import load_statistics
from mergekit_sparsegpt.statistics.hessian import HessianError
from mergekit_sparsegpt.statistics.keys import (
    FORMAT_VERSION,
    cache_path,
    config_fingerprint,
    model_weights_fingerprint,
    older_format_entries,
    serving_payloads,
    statistics_payload,
    tokens_fingerprint,
)
from mergekit_sparsegpt.statistics.rank_checkpoint import RankCheckpoint
from mergekit_sparsegpt.statistics.resumable import EntryWriter, remove_checkpoint
from mergekit_sparsegpt.statistics.store import Entry, Steps, get_or_compute
from mergekit_sparsegpt.statistics.task_statistics import (
    ModelRoles,
    TaskStatistics,
    discard_matrix,
    token_counts,
)


def task_statistics(
    task: CalibrationTask,
    windows: torch.Tensor,
    settings: PrepassSettings,
    options: MergeOptions,
    ranks: Ranks = SINGLE_PROCESS,
) -> TaskStatistics | None:
    """Load the task's statistics from the cache, or run the calibration forward pass; a task
    with a statistics folder reads the folder instead (``windows`` then only has its shape).

    With several ranks, the main rank alone reads and writes the cache and returns the
    statistics; the other ranks return None.
    """
    if task.statistics is not None:
        return exported_statistics(task, settings, partial(say, options)) if ranks.main else None
    return _cached_or_computed(task, windows, settings, options, ranks)


def _cached_or_computed(
    task: CalibrationTask,
    windows: torch.Tensor,
    settings: PrepassSettings,
    options: MergeOptions,
    ranks: Ranks,
) -> TaskStatistics | None:
    config = task.forward_model.config(options.trust_remote_code)
    payload = _task_payload(task, config, windows, settings)
    cache_dir = settings.cache_dir or default_cache_dir()
    path = cache_path(cache_dir, payload)
    shard: list[torch.Tensor] = []

    def cached() -> dict[str, TaskStatistics] | None:
        found = _cached_statistics(task, payload, cache_dir, options)
        return None if found is None else {"task": found}

    def compute(writers: Mapping[str, EntryWriter | None]) -> dict[str, TaskStatistics]:
        writer = writers["task"]
        statistics = compute_statistics(
            task,
            config,
            shard[0],
            settings,
            options,
            writer.add if writer else discard_matrix,
            ranks,
            checkpoint=RankCheckpoint(writer, ranks),
            counted=windows,
        )
        return {"task": statistics}

    def written(statistics: Mapping[str, TaskStatistics]) -> None:
        _report_fallbacks(task, statistics["task"], settings, options)
        say(options, f"Hessian statistics for {task.key[0]} written to cache {path}")

    # Another process computing this entry is waited for, and its entry read.
    waiting = f"another process is computing the Hessian statistics of {task.key[0]}"
    found = get_or_compute(
        {"task": Entry(path, payload)},
        Steps(
            cached,
            compute,
            prepare=lambda: shard.append(shard_windows(windows, ranks, str(task.key[0]))),
            written=written,
        ),
        lambda lock: say(options, f"Waiting for {lock}: {waiting}"),
        ranks,
        resumable=True,
    )
    return None if found is None else found["task"]


def _task_payload(
    task: CalibrationTask,
    config: PretrainedConfig,
    windows: torch.Tensor,
    settings: PrepassSettings,
) -> dict[str, Any]:
    return statistics_payload(
        model=identity(task.forward_model),
        weights=model_weights_fingerprint(task.forward_model),
        config=config_fingerprint(config),
        tokens=tokens_fingerprint(windows),
        token_shape=list(windows.shape),
        dampening=settings.dampening,
        factors=settings.keep_factors,
        hessians=settings.keep_hessians,
        diagonal=settings.diagonal,
    )


def cached_task_statistics(
    task: CalibrationTask, windows: torch.Tensor, settings: PrepassSettings, options: MergeOptions
) -> TaskStatistics | None:
    """The task's statistics if the cache holds them; nothing is computed or said otherwise."""
    payload = _task_payload(
        task, task.forward_model.config(options.trust_remote_code), windows, settings
    )
    return _serving_entry(task, payload, settings.cache_dir or default_cache_dir(), options)


def _serving_entry(
    task: CalibrationTask, payload: dict[str, Any], cache_dir: str | Path, options: MergeOptions
) -> TaskStatistics | None:
    # Statistics holding more whole matrices than needed serve this merge too.
    for candidate in serving_payloads(payload):
        path = cache_path(cache_dir, candidate)
        cached = load_statistics(path, candidate)
        if cached is not None:
            say(options, f"Hessian statistics for {task.key[0]} from cache {path}")
            # Left by a run killed between committing the entry and removing its checkpoint.
            remove_checkpoint(path)
            return cached
    return None


def _cached_statistics(
    task: CalibrationTask, payload: dict[str, Any], cache_dir: str | Path, options: MergeOptions
) -> TaskStatistics | None:
    found = _serving_entry(task, payload, cache_dir, options)
    if found is not None:
        return found
    for path, version in older_format_entries(cache_dir, payload):
        say(
            options,
            f"Statistics cache {path} holds these inputs in format {version}, which this version "
            f"of mergekit_sparsegpt does not read (format {FORMAT_VERSION}); recomputing. "
            "Delete it to free the space.",
        )
    return None


def compute_statistics(
    task: CalibrationTask,
    config: PretrainedConfig,
    windows: torch.Tensor,
    settings: PrepassSettings,
    options: MergeOptions,
    store_matrix: Callable[[str, torch.Tensor], None],
    ranks: Ranks = SINGLE_PROCESS,
    checkpoint: RankCheckpoint | None = None,
    counted: torch.Tensor | None = None,
) -> TaskStatistics:
    """The task's statistics; each whole matrix goes to ``store_matrix`` as soon as it exists.

    With several ranks, ``windows`` is this rank's share and the Hessians are summed over all;
    ``counted`` (default ``windows``) are the task's whole windows, whose tokens are counted.
    A resumable ``checkpoint`` supplies the blocks an interrupted run finished (they do not run
    again) and is offered each block this run finishes.
    """
    model_ref = task.forward_model
    load_tensor = CheckpointReader(model_ref, config.model_type)
    model = empty_model(config, options.trust_remote_code)
    _, blocks = decoder_layers(model)
    description = f"Hessians of {model_ref} on {Path(task.key[1]).name}"
    resumed = checkpoint.resume_point() if checkpoint else None
    counted = windows if counted is None else counted
    statistics = empty_statistics(model, counted, load_tensor.tensor_names)
    if resumed and checkpoint:
        if resumed.statistics is not None:  # the main rank's: the others' are not cached
            statistics = resumed.statistics  # type: ignore[assignment]
        if checkpoint.writer is not None:
            say(
                options,
                f"{description}: resuming at block {resumed.next_block} of {len(blocks)} "
                f"from checkpoint {checkpoint.writer.checkpoint}",
            )
    layers = capture_layer_hessians(
        model,
        load_tensor,
        windows,
        device=ranks.device(options.device),
        batch_size=settings.calibration_batch_size,
        progress=not options.quiet and ranks.main,
        description=description,
        resume=(resumed.next_block, resumed.activations) if resumed else None,
        diagonal=settings.diagonal,
        block_done=(
            (lambda index, outputs: checkpoint.block_finished(index, outputs, statistics))
            if checkpoint and checkpoint.resumable
            else None
        ),
    )
    del resumed  # its activations now belong to the capture, which overwrites them
    for layer in all_reduced_layers(layers, ranks):
        with together(ranks):
            with hessian_errors_explained(model_ref, task.key[1]):
                statistics.add_layer(
                    layer,
                    settings.dampening,
                    settings.keep_factors,
                    settings.keep_hessians,
                    store_matrix,
                )
    return statistics


def model_roles(model: torch.nn.Module, stored: Collection[str] = ()) -> ModelRoles:
    """Where ``model`` (a skeleton) keeps its token embedding and head, by the checkpoint's names
    (its tensors ``stored``), and whether they are one tensor."""
    return ModelRoles(
        embedding_weight_name(model, stored),
        head_weight_name(model, stored),
        ties_embeddings(model),
    )


def empty_statistics(
    model: torch.nn.Module, windows: torch.Tensor, stored: Collection[str] = ()
) -> TaskStatistics:
    """A task's statistics before its first block: where ``model`` keeps its token embedding
    and head, and the token counts of the task's (whole) ``windows``."""
    layers_prefix, _ = decoder_layers(model)
    statistics = TaskStatistics.empty(layers_prefix, model_roles(model, stored))
    embedding = model.get_input_embeddings()
    if embedding is not None:
        statistics.token_counts = token_counts(windows, embedding.weight.shape[0])
    return statistics


@contextlib.contextmanager
def hessian_errors_explained(
    model: ModelReference, calibration: str, merged: bool = False
) -> Iterator[None]:
    """A ``HessianError`` in the block as the user's error, naming the model and calibration
    (and, for ``hessian_source: merged``, that it came through the merged model)."""
    try:
        yield
    except HessianError as error:
        through, checkpoints = (
            (", through the merged model", "checkpoints") if merged else ("", "checkpoint")
        )
        raise ValueError(
            f"Model {model} on calibration {calibration!r}{through}: {error}. Check the "
            f"{checkpoints} for inf/NaN weights, or merge in float32."
        ) from None


def _report_fallbacks(
    task: CalibrationTask,
    statistics: TaskStatistics,
    settings: PrepassSettings,
    options: MergeOptions,
) -> None:
    report = statistics.fallback_report(settings.dampening)
    if any(report.values()):
        say(
            options,
            f"Hessians of {task.forward_model} on {task.key[1]}: "
            f"{report['escalated_damping']} needed more damping than {settings.dampening}, "
            f"{report['pseudo_inverse']} needed the pseudo-inverse, "
            f"{report['never_ran']} linears never ran (ranked by |tau|)",
        )
