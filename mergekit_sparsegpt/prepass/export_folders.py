"""``mergekit-sparsegpt calibrate CONFIG --export DIR``: each calibrated model's statistics,
written to a folder of its own under DIR for anyone to merge from (``statistics: FOLDER``)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from mergekit.common import ModelReference
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions
from tqdm.auto import tqdm

from mergekit_sparsegpt.capture.distributed import SINGLE_PROCESS, Ranks
from mergekit_sparsegpt.prepass.checked_merge import checked_merge
from mergekit_sparsegpt.prepass.exported import task_manifest
from mergekit_sparsegpt.prepass.messages import say
from mergekit_sparsegpt.prepass.plan import (
    MERGED,
    CalibrationTask,
    PrepassSettings,
)
from mergekit_sparsegpt.prepass.task_statistics import task_statistics
from mergekit_sparsegpt.prepass.tasks import all_task_windows, calibration_tasks, resolve_seq_len
from mergekit_sparsegpt.statistics.export import (
    check_writable_target,
    folder_names,
    write_folder,
)


def export_statistics(
    merge_config: MergeConfiguration,
    options: MergeOptions,
    directory: str | os.PathLike[str],
    ranks: Ranks = SINGLE_PROCESS,
) -> list[Path]:
    """Calibrate every model of the merge that has ``calibration:`` and write its folder under
    ``directory``; return the folders. The statistics keep every whole Hessian, whatever the
    method, so that a folder serves any method; they are cached as a calibration's are."""
    checked = checked_merge(merge_config, options)
    planned, settings = checked.planned, checked.settings
    if settings.hessian_source == MERGED:
        raise ValueError(
            f"hessian_source: {MERGED} (RegMean++, the default of regmean and sparsegpt_regmean) "
            "cannot be exported: each task's statistics are measured in the merged model, so "
            "they depend on every model of this merge. Set hessian_source: finetuned or base "
            "to export statistics that serve any merge."
        )
    tasks = [task for task in calibration_tasks(planned, settings)[0] if task.statistics is None]
    if not tasks:
        raise ValueError(
            "No model of this merge has `calibration:`, so there is nothing to export (models "
            "with `statistics:` are read from their folders, not calibrated)"
        )
    names = folder_names(_folder_name(task.key[0]) for task in tasks)
    root = Path(directory).absolute()
    folders = {task.key: root / name for task, name in zip(tasks, names, strict=True)}
    for folder in folders.values():
        check_writable_target(folder)
    settings = resolve_seq_len(settings, tasks, options, ranks)
    settings = dataclasses.replace(settings, keep_hessians=True, diagonal=False)
    windows = all_task_windows(tasks, settings, options)
    for task in tqdm(tasks, desc="Exporting tasks", disable=options.quiet or not ranks.main):
        _export_task(task, windows[task.key], settings, options, ranks, folders[task.key])
    return list(folders.values())


def _export_task(
    task: CalibrationTask,
    windows: torch.Tensor,
    settings: PrepassSettings,
    options: MergeOptions,
    ranks: Ranks,
    folder: Path,
) -> None:
    statistics = task_statistics(task, windows, settings, options, ranks)
    if statistics is None:  # not the main rank: it writes nothing
        return
    write_folder(folder, statistics, task_manifest(task, windows, settings))
    say(options, f"Hessian statistics for {task.key[0]} exported to {folder}")


def _folder_name(model: ModelReference) -> str:
    """The last path component of the model's directory or hub id (its adapter's, for a LoRA)."""
    path = model.lora.path if model.lora is not None else model.model.path
    if os.path.isdir(path):
        return Path(os.path.abspath(path)).name
    return path.rstrip("/").rsplit("/", 1)[-1]
