"""The calibration tasks of a merge: which model's text runs through which model, in windows of
how many tokens."""

from __future__ import annotations

import dataclasses

import torch
from mergekit.common import ModelReference
from mergekit.options import MergeOptions

from mergekit_sparsegpt.calibration.source import CalibrationSource
from mergekit_sparsegpt.calibration.texts import read_calibration_texts
from mergekit_sparsegpt.calibration.windows import calibration_windows
from mergekit_sparsegpt.capture.distributed import SINGLE_PROCESS, Ranks
from mergekit_sparsegpt.methods.context import PlannedTensor, TaskKey
from mergekit_sparsegpt.prepass.exported import checked_folder, exported_windows
from mergekit_sparsegpt.prepass.messages import say
from mergekit_sparsegpt.prepass.model_checks import (
    check_tokens_fit,
    context_length,
    saved_tokenizer,
)
from mergekit_sparsegpt.prepass.plan import CalibrationTask, PrepassSettings

# Tokens per calibration window when calibration_seq_len is not set (and the models read as many).
DEFAULT_SEQ_LEN = 512


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
            # A folder's task is looked up as the kernels look up a model without calibration.
            folder = values.get("statistics")
            key = (model, values["calibration"] or "")
            task = tasks.setdefault(key, CalibrationTask(key, forward, folder))
            if task.forward_model != forward:
                raise ValueError(f"Model {model} would be calibrated through two base models")
            if task.statistics != folder:
                raise ValueError(
                    f"Model {model} has two statistics folders, {task.statistics} and {folder}, "
                    "for different tensors; give it one"
                )
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
        str(task.forward_model): context_length(
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
        say(options, f"calibration_seq_len not set: windows of {seq_len} tokens{why}")
    return dataclasses.replace(settings, calibration_seq_len=seq_len)


def uses_exported_statistics(tasks: list[CalibrationTask]) -> bool:
    """Whether any task is read from a statistics folder: such a merge sums each task's
    statistics at merge time (the folders hold per-task Hessians, not merged linears)."""
    return any(task.statistics is not None for task in tasks)


def all_task_windows(
    tasks: list[CalibrationTask], settings: PrepassSettings, options: MergeOptions
) -> dict[TaskKey, torch.Tensor]:
    """Every task's token windows. Statistics folders are checked first, before any text is
    read; their tasks get ``exported_windows``, the shape of the tokens that produced them."""
    windows = {
        task.key: exported_windows(checked_folder(task, settings)[0])
        for task in tasks
        if task.statistics is not None
    }
    for task in tasks:
        if task.statistics is None:
            windows[task.key] = task_windows(task, settings, options)
    return {task.key: windows[task.key] for task in tasks}


def task_windows(
    task: CalibrationTask, settings: PrepassSettings, options: MergeOptions
) -> torch.Tensor:
    """The token windows of ``task``: its model's text, tokenized by the model it runs through."""
    model, source = task.key
    name = str(task.forward_model)
    texts = read_calibration_texts(
        CalibrationSource(source, settings.calibration_field, settings.calibration_split),
        model_name=str(model),
    )
    try:
        tokenizer = saved_tokenizer(task.forward_model, options)
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


def window_shapes(windows: dict[TaskKey, torch.Tensor]) -> dict[TaskKey, tuple[int, int]]:
    """(windows, tokens each) per task, as the model card reports them."""
    return {key: (len(shaped), shaped.shape[1]) for key, shaped in windows.items()}
