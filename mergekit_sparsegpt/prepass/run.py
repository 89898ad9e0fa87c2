"""The pre-pass: validate the config, load calibration data, and compute (or load) Hessians.

mergekit plans one kernel call per output tensor and gives a kernel no way to add graph
dependencies, so the statistics are prepared here, before ``run_merge`` starts, and handed to
the kernels through ``context.activated``. Everything a user can get wrong is checked before
any weight is read.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable
from typing import Any

import torch
from mergekit.common import ModelReference
from mergekit.config import MergeConfiguration
from mergekit.io.tasks import LoaderCache
from mergekit.options import MergeOptions
from tqdm.auto import tqdm
from transformers import AutoTokenizer, PretrainedConfig

from mergekit_sparsegpt.calibration.windows import (
    CalibrationSource,
    calibration_windows,
    read_calibration_texts,
)
from mergekit_sparsegpt.capture.blocks import (
    check_supported,
    empty_model,
)
from mergekit_sparsegpt.capture.distributed import (
    SINGLE_PROCESS,
    Ranks,
    launched_ranks,
)
from mergekit_sparsegpt.capture.weights import (
    CheckpointError,
    CheckpointReader,
    checked_weight_index,
)
from mergekit_sparsegpt.methods.context import CardFacts, MergeContext, TaskKey, activated
from mergekit_sparsegpt.methods.registry import plugin_method
from mergekit_sparsegpt.methods.regmean import SOLVE_PATHS
from mergekit_sparsegpt.prepass.local_paths import spelled_as_local
from mergekit_sparsegpt.prepass.merged_source import (
    MERGED,
    merged_model_statistics,
)
from mergekit_sparsegpt.prepass.messages import say as _say
from mergekit_sparsegpt.prepass.model_identity import check_distinct_models
from mergekit_sparsegpt.prepass.plan import (
    CalibrationTask,
    PlannedTensor,
    PrepassSettings,
    plan_tensors,
)
from mergekit_sparsegpt.prepass.staged_output import staged_output
from mergekit_sparsegpt.prepass.task_statistics import task_statistics
from mergekit_sparsegpt.prepass.validate import check_parameter_names, validate_parameters
from mergekit_sparsegpt.reporting import model_card
from mergekit_sparsegpt.termination import sigterm_as_interrupt
from mergekit_sparsegpt.trim.metrics import REPORT_FILE

# Tokens per calibration window when calibration_seq_len is not set (and the models read as many).
DEFAULT_SEQ_LEN = 512
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
        facts = CardFacts(method.spec.name, planned, _window_shapes(windows))
        return MergeContext(hessian_inputs=hessian_inputs, tasks=statistics, card_facts=facts)
    computed = {
        task.key: task_statistics(task, windows[task.key], settings, options, ranks)
        for task in tqdm(tasks, desc="Calibrating tasks", disable=options.quiet or not ranks.main)
    }
    statistics = {key: value for key, value in computed.items() if value is not None}
    facts = CardFacts(method.spec.name, planned, _window_shapes(windows))
    return MergeContext(hessian_inputs=hessian_inputs, tasks=statistics, card_facts=facts)


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
    facts = context.card_facts
    assert facts is not None, "the pre-pass sets card_facts"
    per_model: dict[ModelReference, list[dict[str, Any]]] = {}
    for tensor in facts.planned:
        for model, values in tensor.per_input.items():
            if model != tensor.base_model:
                per_model.setdefault(model, []).append(values)
    calibration = {model: (source, *shape) for (model, source), shape in facts.windows.items()}
    return model_card.calibration_section(
        plugin_method(facts.method_name),
        [tensor.shared for tensor in facts.planned],
        per_model,
        calibration,
        context,
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
