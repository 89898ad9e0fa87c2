"""The pre-pass: validate the config, load calibration data, and compute (or load) Hessians.

mergekit plans one kernel call per output tensor and gives a kernel no way to add graph
dependencies, so the statistics are prepared here, before ``run_merge`` starts, and handed to
the kernels through ``context.activated``. Everything a user can get wrong is checked before
any weight is read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from mergekit.common import ModelReference
from mergekit.config import ConditionalParameter, MergeConfiguration
from mergekit.io.tasks import LoaderCache, SaveTensor
from mergekit.merge_methods.base import ParameterScope, ParameterSpec
from mergekit.options import MergeOptions
from pydantic import ValidationError
from tqdm.auto import tqdm
from transformers import AutoTokenizer, PretrainedConfig

from mergekit_sparsegpt.calibration.windows import (
    CalibrationSource,
    calibration_windows,
    read_calibration_texts,
)
from mergekit_sparsegpt.capture.blocks import (
    capture_layer_hessians,
    check_supported,
    decoder_layers,
    empty_model,
)
from mergekit_sparsegpt.capture.distributed import (
    SINGLE_PROCESS,
    Ranks,
    all_reduced_layers,
    decided_by_main,
    launched_ranks,
    shard_windows,
    together,
)
from mergekit_sparsegpt.capture.weights import (
    CheckpointError,
    CheckpointReader,
    checked_weight_index,
)
from mergekit_sparsegpt.methods.context import MergeContext, TaskKey, activated
from mergekit_sparsegpt.methods.registry import PluginMethod, plugin_method
from mergekit_sparsegpt.methods.regmean import SOLVE_PATHS
from mergekit_sparsegpt.methods.sparsegpt import PREPASS_PARAMETERS, SIGN_SOURCES
from mergekit_sparsegpt.prepass.local_paths import spelled_as_local
from mergekit_sparsegpt.prepass.merged_source import (
    MERGED,
    check_merged_source,
    merged_model_statistics,
)
from mergekit_sparsegpt.prepass.model_identity import check_distinct_models, identity
from mergekit_sparsegpt.prepass.staged_output import staged_output
from mergekit_sparsegpt.reporting import model_card
from mergekit_sparsegpt.statistics import cache
from mergekit_sparsegpt.statistics.hessian import HessianError
from mergekit_sparsegpt.statistics.task_statistics import TaskStatistics
from mergekit_sparsegpt.termination import sigterm_as_interrupt
from mergekit_sparsegpt.trim.importance import SELECTIONS, validate_importance
from mergekit_sparsegpt.trim.metrics import REPORT_FILE

HESSIAN_SOURCES = ("finetuned", "base", MERGED)
# Tokens per calibration window when calibration_seq_len is not set (and the models read as many).
DEFAULT_SEQ_LEN = 512
LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor as mergekit planned it, with its resolved parameters."""

    output_name: str
    inputs: dict[ModelReference, str]  # model -> its own tensor name (differs under slices)
    base_model: ModelReference | None
    shared: dict[str, Any]
    per_input: dict[ModelReference, dict[str, Any]]
    vocabulary: bool = False  # indexed by token id: mergekit aligns (and checks) vocabularies


@dataclass(frozen=True)
class PrepassSettings:
    """Settings that shape the Hessians; one value for the whole merge."""

    calibration_samples: int | None  # None: as calibration.calibration_windows decides
    calibration_seq_len: int | None  # None until resolve_seq_len
    calibration_field: str
    calibration_split: str
    calibration_batch_size: int
    hessian_source: str
    dampening: float
    cache_dir: str | None
    keep_factors: bool  # compensation needs the whole Cholesky factor of every H^-1
    keep_hessians: bool  # RegMean needs every whole (undamped) H


@dataclass(frozen=True)
class CalibrationTask:
    key: TaskKey  # (model whose task vector is trimmed, calibration source)
    forward_model: ModelReference  # the model the calibration text runs through


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
    method = plugin_method(merge_config.merge_method)
    check_parameter_names(merge_config, method.spec.parameters)
    check_base_model(merge_config)
    check_models(merge_config, options)
    check_distinct_models(merge_config)
    for model in sorted(merge_config.referenced_models(), key=str):
        check_supported(
            model.config(options.trust_remote_code), str(model), options.trust_remote_code
        )
    planned = plan_tensors(merge_config, options)
    settings = validate_parameters(planned, method)
    readers = {
        model: CheckpointReader(model, model.config(options.trust_remote_code).model_type)
        for model in {m for tensor in planned for m in tensor.inputs}
    }
    check_shapes(planned, readers)
    check_configs_match_weights(readers, options)
    check_tokenizers_fit(merge_config, options)
    if any(t.shared.get("compensate") and t.shared.get("rescale") for t in planned):
        LOG.warning(
            "compensate and rescale are both on: the re-fitted task vectors already make up for "
            "the dropped entries, and rescale scales them up again, on top of each weight. "
            "Measured (docs/compensation.md): it wrecked a merge with weights 1 "
            "and helped one with weights 1/5. For predictable strength set rescale: false and "
            "choose the weights."
        )
    tasks, hessian_inputs = calibration_tasks(planned, settings)
    settings = resolve_seq_len(settings, tasks, options, ranks)
    windows = {task.key: _calibration_windows(task, settings, options) for task in tasks}
    if settings.hessian_source == MERGED:
        if ranks.world_size > 1:
            raise ValueError(
                "hessian_source: merged builds the merge while it calibrates and runs in one "
                "process only: run it without torchrun, or calibrate with hessian_source: "
                "finetuned or base"
            )
        statistics = merged_model_statistics(
            planned, method, tasks, windows, settings, options, readers
        )
        facts = CardFacts(method, planned, _window_shapes(windows))
        return MergeContext(hessian_inputs=hessian_inputs, tasks=statistics, card_facts=facts)
    computed = {
        task.key: task_statistics(task, windows[task.key], settings, options, ranks)
        for task in tqdm(tasks, desc="Calibrating tasks", disable=options.quiet or not ranks.main)
    }
    statistics = {key: value for key, value in computed.items() if value is not None}
    facts = CardFacts(method, planned, _window_shapes(windows))
    return MergeContext(hessian_inputs=hessian_inputs, tasks=statistics, card_facts=facts)


@dataclass(frozen=True)
class CardFacts:
    """What the model card says about the merge, besides how each tensor went."""

    method: PluginMethod
    planned: list[PlannedTensor]
    windows: dict[TaskKey, tuple[int, int]]  # (windows, tokens each) per task


def _window_shapes(windows: dict[TaskKey, torch.Tensor]) -> dict[TaskKey, tuple[int, int]]:
    return {key: (len(shaped), shaped.shape[1]) for key, shaped in windows.items()}


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

    def say(message: str) -> None:
        _say(options, message)

    merge_config = spelled_as_local(merge_config, say)
    with sigterm_as_interrupt(), staged_output(out_path, local_inputs(merge_config), say) as out:
        context = prepare_statistics(merge_config, options)
        with activated(context):
            result = run_merge(merge_config, str(out.path), options, *args, **kwargs)
        if out.path.is_dir():
            write_report(context, str(out.path / REPORT_FILE))
            if options.write_model_card:
                model_card.append_to_card(str(out.path), card_section(context))
    _say(options, usage_summary(merge_config.merge_method, context))
    return result


def local_inputs(merge_config: MergeConfiguration) -> list[str]:
    """The directories on disk the merge reads: models and LoRA adapters."""
    paths = []
    for model in merge_config.referenced_models():
        paths += [model.model.path] + ([model.lora.path] if model.lora is not None else [])
    return [path for path in paths if os.path.isdir(path)]


def card_section(context: MergeContext) -> str:
    """The model card's calibration section for this merge."""
    facts: CardFacts = context.card_facts
    per_model: dict[ModelReference, list[dict[str, Any]]] = {}
    for tensor in facts.planned:
        for model, values in tensor.per_input.items():
            if model != tensor.base_model:
                per_model.setdefault(model, []).append(values)
    calibration = {model: (source, *shape) for (model, source), shape in facts.windows.items()}
    return model_card.calibration_section(
        facts.method, [tensor.shared for tensor in facts.planned], per_model, calibration, context
    )


def write_report(context: MergeContext, path: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump({"tensors": context.report}, handle, indent=1, sort_keys=True)


def usage_summary(method_name: str, context: MergeContext) -> str:
    lines = [f"{method_name}: how each tensor was merged"]
    for path, label in plugin_method(method_name).summary_paths:
        tensors = context.usage[(path, "tensors")]
        parameters = context.usage[(path, "parameters")]
        lines.append(f"  {label}: {tensors} tensors, {parameters:,} parameters")
    solves = [t["solve"]["path"] for t in context.report.values() if "solve" in t]
    if solves:
        counts = ", ".join(f"{path} {solves.count(path)}" for path in SOLVE_PATHS)
        lines.append(f"  how the RegMean systems were solved: {counts}")
    entries = [m for t in context.report.values() for m in t["models"].values()]
    if entries:
        ours = sum(e["relative_output_error"] for e in entries) / len(entries)
        magnitude = sum(e["magnitude_relative_output_error"] for e in entries) / len(entries)
        alike = ", both L1-rescaled" if any(e["rescaled"] for e in entries) else ""
        lines.append(
            f"  relative output error of the trimmed task vectors (mean, Hessian estimate): "
            f"{ours:.4f}, magnitude trimming at the same density: {magnitude:.4f}{alike}"
        )
        lines.append(f"  per-tensor details: {REPORT_FILE} in the output directory")
    return "\n".join(lines)


def check_parameter_names(merge_config: MergeConfiguration, specs: Iterable[ParameterSpec]) -> None:
    """mergekit silently ignores unknown keys, and merge-wide keys given per model; either would
    silently change the merge. A value of the wrong type would fail inside mergekit's planner
    with a message that names neither the parameter nor the model."""
    by_name = {spec.name: spec for spec in specs}
    known = set(by_name)
    merge_wide = {spec.name for spec in specs if spec.scope == ParameterScope.SHARED}
    for where, parameters, per_model in _parameter_blocks(merge_config):
        for name in parameters or {}:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ValueError(
                    f"Unknown parameter {name!r} in {where} for {merge_config.merge_method}.{hint}"
                    f" Known parameters: {', '.join(sorted(known))}."
                )
            if per_model and name in merge_wide:
                raise ValueError(
                    f"{name!r} in {where} is a merge-wide setting, which mergekit ignores when it "
                    "is given per model; move it to the top-level `parameters:`."
                )
            _check_setting(parameters[name], by_name[name], f"{name!r} in {where}")


_TYPE_NAMES: dict[Any, str] = {
    int: "an integer",
    float: "a number",
    bool: "true or false",
    str: "a string",
    str | None: "a string",
    int | None: "an integer",
}


def _check_setting(setting: Any, spec: ParameterSpec, where: str) -> None:
    """One parameter's setting: a value, a per-layer gradient (a list of numbers), or filters."""
    if isinstance(setting, ConditionalParameter):
        _check_setting(setting.value, spec, where)
    elif (
        isinstance(setting, list)
        and setting
        and all(isinstance(item, ConditionalParameter) for item in setting)
    ):
        for item in setting:
            _check_setting(item.value, spec, where)
    elif isinstance(setting, list):
        if not setting:
            # mergekit reads an empty gradient as no value at all and falls back to a default.
            raise ValueError(f"{where} is an empty list: give it a value{_GRADIENT_HINT}")
        if spec.value_type not in _NUMBER_TYPES:
            raise ValueError(
                f"{where} is a list, {setting!r}: mergekit reads a list as a per-layer gradient, "
                f"so each layer would get one of its items. {_one_value_fix(spec.name)}"
            )
        for item in setting:
            _check_value(item, spec, where)
    else:
        _check_value(setting, spec, where)


_GRADIENT_HINT = " (or, for a number, a non-empty list of numbers as a per-layer gradient)."
_NUMBER_TYPES = (int, float, int | None, float | None)


def _one_value_fix(name: str) -> str:
    if name == "calibration":
        return (
            "Give one source: put the texts in one file (for instance a .jsonl with one record "
            "per document) or one dataset."
        )
    return "Give one value."


def _check_value(value: Any, spec: ParameterSpec, where: str) -> None:
    expected = _TYPE_NAMES.get(spec.value_type, f"of type {spec.value_type}")
    # pydantic's lax mode reads true as 1, which no one means by a density or a sample count.
    wrong = isinstance(value, bool) and spec.value_type in _NUMBER_TYPES
    try:
        spec.validate(value)
    except ValidationError:
        wrong = True
    if wrong:
        raise ValueError(f"{where} must be {expected}, got {value!r}")


def _parameter_blocks(config: MergeConfiguration) -> Iterable[tuple[str, dict | None, bool]]:
    """(where, parameters, whether the block belongs to one input model)."""
    yield "parameters", config.parameters, False
    for index, model in enumerate(config.models or []):
        yield f"models[{index}] ({model.model})", model.parameters, True
    for prefix, slices in [("slices", config.slices)] + [
        (f"modules.{name}.slices", module.slices) for name, module in (config.modules or {}).items()
    ]:
        for index, output_slice in enumerate(slices or []):
            yield f"{prefix}[{index}]", output_slice.parameters, False
            for source_index, source in enumerate(output_slice.sources):
                yield f"{prefix}[{index}].sources[{source_index}]", source.parameters, True
    for name, module in (config.modules or {}).items():
        yield f"modules.{name}", module.parameters, False
        for index, model in enumerate(module.models or []):
            yield f"modules.{name}.models[{index}] ({model.model})", model.parameters, True


def check_base_model(merge_config: MergeConfiguration) -> None:
    """mergekit's own message for a missing base model names an internal slice, not the fix."""
    modules = (merge_config.modules or {}).values()
    slices = [*(merge_config.slices or []), *(s for m in modules for s in m.slices or [])]
    if merge_config.base_model is None and not any(s.base_model for s in slices):
        raise ValueError(
            f"{merge_config.merge_method} needs a base_model: every task vector is a model minus "
            "the base. Add `base_model: <the model the others were fine-tuned from>` to the config."
        )


def check_models(merge_config: MergeConfiguration, options: MergeOptions) -> None:
    """A reference that is not a model fails deep inside transformers or mergekit, with a message
    that may not name the model (or say that its directory is missing), or that a weight file is
    damaged."""
    LoaderCache().setup(options=options)
    for model in sorted(merge_config.referenced_models(), key=str):
        path = model.model.path
        if model.lora is not None and not options.lora_merge_cache:
            raise ValueError(
                f"Model {model} is a LoRA adapter on a base model: mergekit merges the adapter "
                "into the base before anything reads it, and needs a directory for that. Add "
                "--lora-merge-cache DIR to the command."
            )
        try:
            if (os.path.isabs(path) or path.startswith(".")) and not os.path.isdir(path):
                raise OSError(f"there is no directory {path}")
            model.config(options.trust_remote_code)
            checked_weight_index(model)  # mergekit's index, each safetensors file checked whole
        except CheckpointError as error:  # a damaged download: its own fix, not another path
            raise CheckpointError(f"Model {model}: {error}") from None
        except (OSError, ValueError, RuntimeError) as error:
            raise ValueError(
                f"Model {model} cannot be loaded ({error}). Give the directory of a Hugging Face "
                "checkpoint (config.json and model.safetensors or pytorch_model.bin, possibly "
                "sharded) or a model id on the Hub."
            ) from None


def plan_tensors(merge_config: MergeConfiguration, options: MergeOptions) -> list[PlannedTensor]:
    """Ask mergekit's own planner which inputs and parameters feed each output tensor."""
    from mergekit.architecture import get_architecture_info
    from mergekit.merge import _model_out_config
    from mergekit.plan import MergePlanner

    config = merge_config.model_copy(deep=True)  # the planner normalises it in place
    arch_info = get_architecture_info(config, options)
    LoaderCache().setup(options=options)
    out_config = _model_out_config(config, arch_info, trust_remote_code=options.trust_remote_code)
    planner = MergePlanner(config, arch_info, options=options, out_model_config=out_config)
    planned = []
    # plan_in_memory() cannot build its ReturnTensor tasks in mergekit 0.1.5; the save tasks of
    # plan_to_disk() carry the same merge tasks and nothing is written until they execute.
    for target in planner.plan_to_disk(out_path=os.devnull):
        if not isinstance(target, SaveTensor):
            continue
        task = target.tensor_task
        gather = task.gather_tensors
        while not hasattr(gather, "weight_info"):  # vocabulary permutation wraps the gather
            gather = gather.gather_tensors
        planned.append(
            PlannedTensor(
                output_name=task.output_weight.name,
                inputs={model: weight.name for model, weight in gather.weight_info.items()},
                base_model=task.base_model,
                shared=dict(task.parameters.items()),
                per_input={m: dict(p.items()) for m, p in task.input_parameters.items()},
                vocabulary=task.output_weight.vocabulary_axis is not None,
            )
        )
    return planned


def check_shapes(
    planned: list[PlannedTensor], readers: dict[ModelReference, CheckpointReader]
) -> None:
    """Every input of a tensor must have its shape. mergekit finds a mismatch only when it merges
    that tensor, after the whole pre-pass, and does not say which model differs."""
    for tensor in planned:
        if tensor.vocabulary:
            continue
        shapes = {
            model: stored.shape
            for model, name in tensor.inputs.items()
            if (stored := readers[model].stored(name)) is not None
        }
        if len(set(shapes.values())) > 1:
            listing = ", ".join(f"{shape} in {model}" for model, shape in shapes.items())
            raise ValueError(
                f"Tensor {tensor.output_name} has different shapes in the models merged: "
                f"{listing}. Only models of one architecture and size can be merged; check that "
                "every model is a fine-tune of the base model."
            )


def check_configs_match_weights(
    readers: dict[ModelReference, CheckpointReader], options: MergeOptions
) -> None:
    """A config.json that disagrees with its weights: mergekit merges tensor by tensor and never
    notices, and the merged model (or the calibration forward) fails later without naming it."""
    for model, reader in sorted(readers.items(), key=lambda item: str(item[0])):
        skeleton = empty_model(model.config(options.trust_remote_code), options.trust_remote_code)
        for name, parameter in skeleton.named_parameters():
            stored = reader.stored(name)
            if stored is not None and tuple(stored.shape) != tuple(parameter.shape):
                raise ValueError(
                    f"Model {model}: its config.json does not match its weights: {name} is "
                    f"{tuple(stored.shape)} in {os.path.basename(stored.path)}, but the config "
                    f"gives {tuple(parameter.shape)}. Save the config.json that belongs to these "
                    "weights (or download the model again)."
                )


def check_tokenizers_fit(merge_config: MergeConfiguration, options: MergeOptions) -> None:
    """With tokenizer_source (or a tokenizer section), mergekit maps every model's tokenizer onto
    its embedding rows and fails with a bare KeyError on a token id beyond them."""
    if merge_config.tokenizer_source is None and merge_config.tokenizer is None:
        return
    for model in sorted(merge_config.referenced_models(), key=str):
        rows = _embedding_rows(model.config(options.trust_remote_code))
        try:
            tokenizer = _saved_tokenizer(model, options)
        except (OSError, ValueError):
            continue  # mergekit reports a model without a tokenizer itself
        if rows is not None and len(tokenizer) > rows:
            raise ValueError(
                f"The tokenizer saved with model {model} has {len(tokenizer)} tokens, but the "
                f"model's embedding has {rows} rows, so mergekit cannot map it for "
                f"tokenizer_source: {_NOT_ITS_TOKENIZER}"
            )


def _saved_tokenizer(model: ModelReference, options: MergeOptions) -> Any:
    """The tokenizer saved next to ``model``'s weights (OSError / ValueError when there is none)."""
    return AutoTokenizer.from_pretrained(
        model.model.path, revision=model.model.revision, trust_remote_code=options.trust_remote_code
    )


def _embedding_rows(config: PretrainedConfig) -> int | None:
    return getattr(config.get_text_config(), "vocab_size", None)


_NOT_ITS_TOKENIZER = (
    "that tokenizer is not the model's own. Save the tokenizer the model was trained with next "
    "to its weights."
)


def validate_parameters(planned: list[PlannedTensor], method: PluginMethod) -> PrepassSettings:
    """Check every resolved value the method has; return the settings that must be constant."""
    for tensor in planned:
        _check_shared(tensor.shared)
        non_base = {m: v for m, v in tensor.per_input.items() if m != tensor.base_model}
        for model, values in non_base.items():
            _check_model(tensor, model, values, method)
        if (
            method.nonnegative_weights
            and non_base
            and not any(values["weight"] > 0 for values in non_base.values())
        ):
            raise ValueError(
                f"Every weight of the models feeding {tensor.output_name} is 0; give at least one "
                "model a positive weight"
            )
    values = {
        spec.name: _constant(planned, spec.name)
        for spec in PREPASS_PARAMETERS
        if spec.scope == ParameterScope.SHARED
    }
    settings = PrepassSettings(
        **values,
        keep_factors=any(tensor.shared.get("compensate", False) for tensor in planned),
        keep_hessians=method.keeps_hessians,
    )
    _check_settings(settings)
    if settings.hessian_source == MERGED:
        check_merged_source(planned, method)
    return settings


def _check_shared(shared: dict[str, Any]) -> None:
    """Merge-wide values; methods differ in which parameters they have, so check those present."""
    if "importance" in shared:
        validate_importance(shared["importance"])
    for name, choices in (("selection", SELECTIONS), ("sign_from", SIGN_SOURCES)):
        if name in shared and shared[name] not in choices:
            raise ValueError(f"{name} must be one of {', '.join(choices)}, got {shared[name]!r}")
    if "alpha" in shared and not 0 <= shared["alpha"] <= 1:
        raise ValueError(
            f"alpha must be in [0, 1], got {shared['alpha']}: it is the share of each Hessian's "
            "off-diagonal entries RegMean keeps (1: exact least squares, 0: diagonal only)"
        )
    for name in ("lambda", "nongram_scale"):
        if name in shared and not math.isfinite(shared[name]):
            raise ValueError(f"{name} must be finite, got {shared[name]}")


def _check_model(
    tensor: PlannedTensor, model: ModelReference, values: dict[str, Any], method: PluginMethod
) -> None:
    """Per-model values of one merged (non-base) model."""
    where = f"for model {model} at {tensor.output_name}"
    density = values.get("density")
    if density is not None and not 0 <= density <= 1:
        raise ValueError(
            f"density {density} {where} is outside [0, 1]; it is the fraction of task-vector "
            "entries kept"
        )
    weight = values["weight"]
    if not math.isfinite(weight):
        raise ValueError(
            f"weight {weight} {where} must be a finite number: it scales the model's task "
            "vector, and the merged weights would be inf/NaN"
        )
    if method.nonnegative_weights and weight < 0:
        raise ValueError(
            f"weight {weight} {where} must be a finite number >= 0: RegMean weighs each "
            "model's Hessian by it, and a negative weight makes the system indefinite"
        )
    if not values["calibration"]:
        raise ValueError(
            f"Model {model} has no 'calibration' parameter. Every merged model needs "
            "calibration text: add `calibration: <file or dataset>` to its parameters "
            "(or a default under the top-level `parameters:`)."
        )


def _constant(planned: list[PlannedTensor], name: str) -> Any:
    values = {tensor.shared[name] for tensor in planned}
    if len(values) != 1:
        raise ValueError(
            f"{name} must have one value for the whole merge (it shapes the Hessians); the "
            f"config resolves it to {sorted(values, key=str)} for different tensors"
        )
    return values.pop()


def _check_settings(settings: PrepassSettings) -> None:
    for name in ("calibration_samples", "calibration_seq_len", "calibration_batch_size"):
        if getattr(settings, name) is not None and getattr(settings, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(settings, name)}")
    if settings.hessian_source not in HESSIAN_SOURCES:
        raise ValueError(
            f"hessian_source must be one of {', '.join(HESSIAN_SOURCES)}, "
            f"got {settings.hessian_source!r}"
        )
    if not (math.isfinite(settings.dampening) and settings.dampening >= 0):
        raise ValueError(f"dampening must be a finite number >= 0, got {settings.dampening}")


def calibration_tasks(
    planned: list[PlannedTensor], settings: PrepassSettings
) -> tuple[list[CalibrationTask], dict[str, dict[ModelReference, str]]]:
    """The distinct (model, calibration) tasks and, per output tensor, whose Hessian to use."""
    tasks: dict[TaskKey, CalibrationTask] = {}
    hessian_inputs: dict[str, dict[ModelReference, str]] = {}
    for tensor in planned:
        for model, values in tensor.per_input.items():
            if model == tensor.base_model:
                continue
            # The merged model has the base's architecture and tokenizer.
            forward = model if settings.hessian_source == "finetuned" else tensor.base_model
            if forward is None:
                raise ValueError(f"hessian_source: {settings.hessian_source} needs a base_model")
            key = (model, values["calibration"])
            task = tasks.setdefault(key, CalibrationTask(key, forward))
            if task.forward_model != forward:
                raise ValueError(f"Model {model} would be calibrated through two base models")
            hessian_inputs.setdefault(tensor.output_name, {})[model] = tensor.inputs[forward]
    # mergekit's per-model dicts follow hash order, which differs between processes; ranks of a
    # distributed calibration must take the tasks in one order.
    ordered = sorted(tasks.values(), key=lambda task: (str(task.key[0]), str(task.key[1])))
    return ordered, hessian_inputs


def resolve_seq_len(
    settings: PrepassSettings,
    tasks: list[CalibrationTask],
    options: MergeOptions,
    ranks: Ranks = SINGLE_PROCESS,
) -> PrepassSettings:
    """``settings`` with calibration_seq_len set: the user's value, or ``DEFAULT_SEQ_LEN`` cut to
    the shortest context of the models the text runs through (said once, on the main rank)."""
    if settings.calibration_seq_len is not None:
        return settings
    contexts = {
        str(task.forward_model): _context_length(
            task.forward_model.config(options.trust_remote_code)
        )
        for task in tasks
    }
    known = {name: length for name, length in contexts.items() if length is not None}
    shortest = min(known, key=known.__getitem__, default=None)
    seq_len = DEFAULT_SEQ_LEN
    why = ""
    if shortest is not None and known[shortest] < DEFAULT_SEQ_LEN:
        seq_len = known[shortest]
        why = f": the default {DEFAULT_SEQ_LEN} cut to the {seq_len} positions of model {shortest}"
    if ranks.main:
        _say(options, f"calibration_seq_len not set: windows of {seq_len} tokens{why}")
    return dataclasses.replace(settings, calibration_seq_len=seq_len)


def _context_length(config: PretrainedConfig) -> int | None:
    return getattr(config.get_text_config(), "max_position_embeddings", None)


def _calibration_windows(
    task: CalibrationTask, settings: PrepassSettings, options: MergeOptions
) -> torch.Tensor:
    model, source = task.key
    name = str(task.forward_model)
    texts = read_calibration_texts(
        CalibrationSource(source, settings.calibration_field, settings.calibration_split),
        model_name=str(model),
    )
    try:
        tokenizer = _saved_tokenizer(task.forward_model, options)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"Could not load the tokenizer of model {name} ({error}). Calibration text is "
            "tokenized with the tokenizer of the model it runs through: save that tokenizer "
            "next to the model's weights (tokenizer.save_pretrained)."
        ) from None
    windows = calibration_windows(
        texts,
        tokenizer,
        settings.calibration_samples,
        settings.calibration_seq_len,
        # Whose data it is, and whose tokenizer: they differ unless hessian_source is finetuned.
        model_name=name if model == task.forward_model else f"{model}, run through {name}",
        source_name=source,
    )
    check_tokens_fit(windows, task.forward_model.config(options.trust_remote_code), name)
    return windows


def check_tokens_fit(windows: torch.Tensor, config: PretrainedConfig, model_name: str) -> None:
    """Token ids beyond the embedding, or windows beyond the positions, fail deep in the forward
    pass (an index error, or silently wrong rotary tables) without naming the model."""
    rows = _embedding_rows(config)
    largest = int(windows.max())
    if rows is not None and largest >= rows:
        raise ValueError(
            f"The tokenizer saved with model {model_name} gives token id {largest}, but the "
            f"model's embedding has {rows} rows: {_NOT_ITS_TOKENIZER}"
        )
    positions = _context_length(config)
    if positions is not None and windows.shape[1] > positions:
        raise ValueError(
            f"calibration_seq_len {windows.shape[1]} is longer than model {model_name} can "
            f"read ({positions} positions). Set calibration_seq_len to {positions} or less."
        )


def task_statistics(
    task: CalibrationTask,
    windows: torch.Tensor,
    settings: PrepassSettings,
    options: MergeOptions,
    ranks: Ranks = SINGLE_PROCESS,
) -> TaskStatistics | None:
    """Load the task's statistics from the cache, or run the calibration forward pass.

    With several ranks, the main rank alone reads and writes the cache and returns the
    statistics; the other ranks return None.
    """
    config = task.forward_model.config(options.trust_remote_code)
    payload = {
        "format": cache.FORMAT_VERSION,
        "model": identity(task.forward_model),
        "weights": cache.model_weights_fingerprint(task.forward_model),
        "config": cache.config_fingerprint(config),
        "tokens": cache.tokens_fingerprint(windows),
        "token_shape": list(windows.shape),
        "dampening": settings.dampening,
        "factors": settings.keep_factors,
        "hessians": settings.keep_hessians,
    }
    cache_dir = settings.cache_dir or cache.default_cache_dir()
    path = cache.cache_path(cache_dir, payload)
    with contextlib.ExitStack() as locked:
        if ranks.main:
            # Another process computing this entry is waited for, and its entry read.
            waiting = f"another process is computing the Hessian statistics of {task.key[0]}"
            locked.enter_context(
                cache.entry_lock(path, lambda lock: _say(options, f"Waiting for {lock}: {waiting}"))
            )
        cached = _cached_statistics(task, payload, cache_dir, options) if ranks.main else None
        if decided_by_main(cached is not None, ranks):
            return cached
        with together(ranks):
            windows = shard_windows(windows, ranks, str(task.key[0]))
            # Each rank holds activations of its own windows: only one process can resume.
            resumable = ranks.world_size == 1
            writer = cache.EntryWriter(path, payload, resumable) if ranks.main else None
        with writer or contextlib.nullcontext():
            statistics = compute_statistics(
                task,
                config,
                windows,
                settings,
                options,
                writer.add if writer else _discard,
                ranks,
                checkpoint=writer if writer and writer.resumable else None,
            )
            with together(ranks):
                if writer:
                    writer.commit(statistics)
    if not ranks.main:
        return None
    _report_fallbacks(task, statistics, settings, options)
    _say(options, f"Hessian statistics for {task.key[0]} written to cache {path}")
    # Served from the entry just written, as a cache hit is: the whole matrices stay on disk.
    return cache.read_statistics(path, payload)


def _cached_statistics(
    task: CalibrationTask, payload: dict[str, Any], cache_dir: str | Path, options: MergeOptions
) -> TaskStatistics | None:
    # Statistics holding more whole matrices than needed serve this merge too.
    for candidate in cache.serving_payloads(payload):
        path = cache.cache_path(cache_dir, candidate)
        cached = cache.load_statistics(path, candidate)
        if cached is not None:
            _say(options, f"Hessian statistics for {task.key[0]} from cache {path}")
            # Left by a run killed between committing the entry and removing its checkpoint.
            cache.remove_checkpoint(path)
            return cached
    for path, version in cache.older_format_entries(cache_dir, payload):
        _say(
            options,
            f"Statistics cache {path} holds these inputs in format {version}, which this version "
            f"of mergekit_sparsegpt does not read (format {cache.FORMAT_VERSION}); recomputing. "
            "Delete it to free the space.",
        )
    return None


def _discard(name: str, matrix: torch.Tensor) -> None:
    """Where ranks other than the main one put whole matrices: only the main rank caches."""


def compute_statistics(
    task: CalibrationTask,
    config: PretrainedConfig,
    windows: torch.Tensor,
    settings: PrepassSettings,
    options: MergeOptions,
    store_matrix: Callable[[str, torch.Tensor], None],
    ranks: Ranks = SINGLE_PROCESS,
    checkpoint: cache.EntryWriter | None = None,
) -> TaskStatistics:
    """The task's statistics; each whole matrix goes to ``store_matrix`` as soon as it exists.

    With several ranks, ``windows`` is this rank's share and the Hessians are summed over all.
    A resumable ``checkpoint`` writer supplies the blocks an interrupted run finished (they do
    not run again) and is offered each block this run finishes.
    """
    model_ref = task.forward_model
    load_tensor = CheckpointReader(model_ref, config.model_type)
    model = empty_model(config, options.trust_remote_code)
    layers_prefix, blocks = decoder_layers(model)
    description = f"Hessians of {model_ref} on {Path(task.key[1]).name}"
    resumed = checkpoint.take_resume_point() if checkpoint else None
    statistics = resumed.statistics if resumed else TaskStatistics.empty(layers_prefix)
    if resumed and checkpoint:
        _say(
            options,
            f"{description}: resuming at block {resumed.next_block} of {len(blocks)} "
            f"from checkpoint {checkpoint.checkpoint}",
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
        block_done=(
            (lambda index, outputs: checkpoint.block_finished(index, outputs, statistics))
            if checkpoint
            else None
        ),
    )
    del resumed  # its activations now belong to the capture, which overwrites them
    for layer in all_reduced_layers(layers, ranks):
        with together(ranks):
            try:
                statistics.add_layer(
                    layer,
                    settings.dampening,
                    settings.keep_factors,
                    settings.keep_hessians,
                    store_matrix,
                )
            except HessianError as error:
                raise ValueError(
                    f"Model {model_ref} on calibration {task.key[1]!r}: {error}. Check the "
                    "checkpoint for inf/NaN weights, or merge in float32."
                ) from None
    return statistics


def _report_fallbacks(
    task: CalibrationTask,
    statistics: TaskStatistics,
    settings: PrepassSettings,
    options: MergeOptions,
) -> None:
    report = statistics.fallback_report(settings.dampening)
    if any(report.values()):
        _say(
            options,
            f"Hessians of {task.forward_model} on {task.key[1]}: "
            f"{report['escalated_damping']} needed more damping than {settings.dampening}, "
            f"{report['pseudo_inverse']} needed the pseudo-inverse, "
            f"{report['never_ran']} linears never ran (ranked by |tau|)",
        )


def _say(options: MergeOptions, message: str) -> None:
    if not options.quiet:
        print(message, file=sys.stderr)
