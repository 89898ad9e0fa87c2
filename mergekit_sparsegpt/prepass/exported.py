"""Statistics folders in a merge: what a task's folder records, and a task's statistics read
from its folder once the folder is checked against the models and settings of this merge."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from mergekit.common import ModelReference
from mergekit.io.tasks import LoaderCache

from mergekit_sparsegpt.prepass.plan import CalibrationTask, PrepassSettings
from mergekit_sparsegpt.statistics.export import (
    Manifest,
    content_fingerprint,
    read_folder,
    tokenizer_fingerprint,
)
from mergekit_sparsegpt.statistics.keys import tokens_fingerprint
from mergekit_sparsegpt.statistics.task_statistics import TaskStatistics

# The settings a folder's statistics depend on, compared with the merge's before it is used.
CHECKED_SETTINGS = ("hessian_source", "dampening")


def model_fingerprint(model: ModelReference) -> str:
    """``content_fingerprint`` of every weight file mergekit's loader indexes for ``model``."""
    index = LoaderCache().get(model).index
    return content_fingerprint(
        os.path.join(index.base_path, name) for name in set(index.tensor_paths.values())
    )


def weights_record(task: CalibrationTask) -> dict[str, str]:
    """Fingerprints of the weights the task's statistics belong to: its model's, and the model's
    the text ran through when that is another (hessian_source: base)."""
    model = task.key[0]
    record = {"model": model_fingerprint(model)}
    if task.forward_model != model:
        record["forward_model"] = model_fingerprint(task.forward_model)
    return record


def task_manifest(
    task: CalibrationTask, windows: torch.Tensor, settings: PrepassSettings
) -> Manifest:
    """The manifest of the folder ``task``'s statistics are exported to."""
    forward = task.forward_model
    directory = forward.model.path
    if not os.path.isdir(directory):  # a hub id: the files are in the loader's snapshot
        directory = LoaderCache().get(forward).index.base_path
    return Manifest(
        model=str(task.key[0]),
        forward_model=str(forward),
        weights=weights_record(task),
        tokenizer=tokenizer_fingerprint(directory),
        calibration={
            "source": task.key[1],
            "field": settings.calibration_field,
            "split": settings.calibration_split,
            "windows": len(windows),
            "seq_len": windows.shape[1],
            "tokens": windows.numel(),
            "tokens_sha256": tokens_fingerprint(windows),
        },
        settings={
            "hessian_source": settings.hessian_source,
            "dampening": settings.dampening,
            "calibration_samples": len(windows),
            "calibration_seq_len": windows.shape[1],
        },
    )


def checked_folder(
    task: CalibrationTask, settings: PrepassSettings
) -> tuple[Manifest, TaskStatistics]:
    """The manifest and statistics of ``task``'s folder, refused (``ValueError`` naming the
    model, the folder, both values and the fix) unless its weights and settings are this
    merge's. Only the vectors are read: the Hessians stay in the file until a kernel asks."""
    assert task.statistics is not None
    model, folder = task.key[0], task.statistics
    manifest, statistics = read_folder(folder)
    fix = (
        "Use the folder exported for this model with these settings, or give the model "
        "`calibration:` instead of `statistics:` to calibrate it"
    )
    for name in CHECKED_SETTINGS:
        theirs, ours = manifest.settings.get(name), getattr(settings, name)
        if theirs != ours:
            raise ValueError(
                f"Model {model}: statistics folder {folder} was computed with {name} {theirs!r}, "
                f"this merge uses {ours!r}. Set {name}: {theirs} for the merge, or: {fix}."
            )
    for role, ours in weights_record(task).items():
        theirs = manifest.weights.get(role)
        if theirs != ours:
            whose = "the model's" if role == "model" else f"{task.forward_model}'s"
            raise ValueError(
                f"Model {model}: statistics folder {folder} was computed from other weights than "
                f"{whose} (weights fingerprint {theirs} in {folder}, {ours} for the model "
                f"here). {fix}."
            )
    return manifest, statistics


def exported_windows(manifest: Manifest) -> torch.Tensor:
    """A stand-in for the token windows of a task read from a folder: their shape, as the
    model card reports it, and no tokens (the folder holds none, only their hash)."""
    return torch.empty(manifest.token_shape, dtype=torch.int64, device="meta")


def exported_statistics(
    task: CalibrationTask, settings: PrepassSettings, say: Callable[[str], None]
) -> TaskStatistics:
    """The task's statistics from its folder, checked as ``checked_folder`` does."""
    assert task.statistics is not None
    _, statistics = checked_folder(task, settings)
    say(f"Hessian statistics for {task.key[0]} from statistics folder {Path(task.statistics)}")
    return statistics
