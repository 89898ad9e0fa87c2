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
from collections.abc import Hashable, Mapping
from contextlib import ExitStack
from pathlib import Path

import torch
from mergekit.common import ModelReference
from mergekit.merge_methods.base import (
    ParameterScope,
    PerInputValues,
    TensorEntry,
    TensorGroup,
    TensorMetadata,
)
from mergekit.options import MergeOptions

from mergekit_sparsegpt.capture.blocks import (
    LayerHessians,
    TensorSource,
    capture_merged_hessians,
    decoder_layers,
    empty_model,
)
from mergekit_sparsegpt.methods.context import MergeContext, PlannedTensor, TaskKey, activated
from mergekit_sparsegpt.methods.registry import PluginMethod
from mergekit_sparsegpt.prepass.model_identity import identity
from mergekit_sparsegpt.prepass.plan import MERGED, CalibrationTask, PrepassSettings
from mergekit_sparsegpt.statistics import cache
from mergekit_sparsegpt.statistics.hessian import HessianError
from mergekit_sparsegpt.statistics.task_statistics import TaskStatistics


def check_merged_source(planned: list[PlannedTensor], method: PluginMethod) -> None:
    """The merged model has the base's layout: refuse what would break that, by name."""
    if not method.keeps_hessians:
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


def merge_fingerprint(method_name: str, planned: list[PlannedTensor]) -> str:
    """Everything the merged model depends on besides weights and tokens: every tensor's
    resolved parameters."""
    record = [
        [
            t.output_name,
            sorted(t.shared.items()),
            sorted((identity(m), sorted(v.items())) for m, v in t.per_input.items()),
        ]
        for t in planned
    ]
    text = json.dumps([method_name, record], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class MergedTensors:
    """The merge's value of any tensor, computed by the method's own kernel."""

    def __init__(
        self,
        planned: list[PlannedTensor],
        method: PluginMethod,
        context: MergeContext,
        readers: Mapping[ModelReference, TensorSource],
    ):
        self.by_name = {t.output_name: t for t in planned}
        self.method = method
        self.context = context
        self.readers = readers

    def __call__(self, name: str) -> torch.Tensor:
        tensor = self.by_name.get(name)
        if tensor is None:
            raise ValueError(f"hessian_source: {MERGED}: the merge plan has no tensor {name!r}")
        entries = [
            TensorEntry(
                id=model,
                tensor=self.readers[model](input_name).to(torch.float32),
                is_base=model == tensor.base_model,
            )
            for model, input_name in tensor.inputs.items()
        ]
        group = TensorGroup(entries=entries, metadata=TensorMetadata(name=name))
        parameters = dict(tensor.shared)
        for spec in self.method.spec.parameters:
            if spec.scope == ParameterScope.SHARED:
                continue
            inputs = group.entries if spec.scope == ParameterScope.INPUT else group.non_base
            parameters[spec.name] = PerInputValues(
                [(entry.id, tensor.per_input[entry.id][spec.name]) for entry in inputs]
            )
        with activated(self.context), torch.no_grad():
            return self.method.merge_group(group, **parameters)


def merged_model_statistics(
    planned: list[PlannedTensor],
    method: PluginMethod,
    tasks: list[CalibrationTask],
    windows: Mapping[TaskKey, torch.Tensor],
    settings: PrepassSettings,
    options: MergeOptions,
    readers: Mapping[ModelReference, TensorSource],
) -> dict[TaskKey, TaskStatistics]:
    """Every task's statistics with the merged model as the forward model, from the cache when
    every task's entry is there."""
    base = planned[0].base_model
    config = base.config(options.trust_remote_code)
    models = sorted({m for t in planned for m in t.inputs}, key=str)
    shared = {
        "format": cache.FORMAT_VERSION,
        "hessian_source": MERGED,
        "merge": merge_fingerprint(method.spec.name, planned),
        "weights": {identity(model): cache.model_weights_fingerprint(model) for model in models},
        "config": cache.config_fingerprint(config),
        "tokens": {
            f"{identity(k[0])} on {k[1]}": cache.tokens_fingerprint(w) for k, w in windows.items()
        },
        "token_shape": list(next(iter(windows.values())).shape),
        "dampening": settings.dampening,
        "factors": settings.keep_factors,
        "hessians": True,
    }
    payloads = {task.key: {**shared, "task": _task_name(task.key)} for task in tasks}
    cache_dir = settings.cache_dir or cache.default_cache_dir()
    paths = {key: cache.cache_path(cache_dir, payload) for key, payload in payloads.items()}
    with ExitStack() as locks:
        # Every task's entry comes from one joint pass: hold all their locks, in one order.
        for path in sorted(paths.values()):
            locks.enter_context(cache.entry_lock(path, lambda lock: _say_waiting(lock, options)))
        found = {key: cache.load_statistics(paths[key], payloads[key]) for key in payloads}
        if all(stats is not None for stats in found.values()):
            if not options.quiet:
                for key, path in paths.items():
                    print(
                        f"Hessian statistics for {key[0]} (merged model) from cache {path}",
                        file=sys.stderr,
                    )
            return found  # type: ignore[return-value]
        model = empty_model(config, options.trust_remote_code)
        layers_prefix, _ = decoder_layers(model)
        statistics = {key: TaskStatistics.empty(layers_prefix) for key in payloads}
        hessian_inputs = {t.output_name: {m: t.output_name for m in t.inputs} for t in planned}
        context = MergeContext(hessian_inputs=hessian_inputs, tasks=statistics)
        merged = MergedTensors(planned, method, context, readers)
        with ExitStack() as stack:
            writers = {
                key: stack.enter_context(cache.EntryWriter(paths[key], payloads[key]))
                for key in payloads
            }

            def merge_group(hessians: dict[Hashable, LayerHessians]) -> dict[str, torch.Tensor]:
                for key, layer in hessians.items():
                    _add(statistics[key], layer, settings, key)
                tensors = next(iter(hessians.values())).tensor_names()
                values = {name: merged(name) for name in tensors}
                for key, layer in hessians.items():
                    for group in layer.hessians:
                        statistics[key].move_matrices(group, writers[key].add)
                return values

            capture_merged_hessians(
                model,
                merged,
                windows,
                merge_group,
                device=options.device or "cpu",
                batch_size=settings.calibration_batch_size,
                progress=not options.quiet,
                description=f"RegMean++ Hessians through the merged model ({len(windows)} tasks)",
            )
            for key, writer in writers.items():
                writer.commit(statistics[key])
    return {key: cache.read_statistics(paths[key], payloads[key]) for key in payloads}


def _say_waiting(lock: Path, options: MergeOptions) -> None:
    if not options.quiet:
        print(
            f"Waiting for {lock}: another process is computing RegMean++ statistics",
            file=sys.stderr,
        )


def _task_name(key: TaskKey) -> str:
    return f"{key[0]} on {key[1]}"


def _add(
    statistics: TaskStatistics, layer: LayerHessians, settings: PrepassSettings, key: TaskKey
) -> None:
    try:
        statistics.add_layer(layer, settings.dampening, settings.keep_factors, keep_hessians=True)
    except HessianError as error:
        raise ValueError(
            f"Model {key[0]} on calibration {key[1]!r}, through the merged model: {error}. "
            "Check the checkpoints for inf/NaN weights, or merge in float32."
        ) from None
