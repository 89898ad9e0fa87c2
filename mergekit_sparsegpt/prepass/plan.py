"""The merge as mergekit plans it (the one place that reads mergekit's internals), and the
settings and calibration tasks the pre-pass derives from it."""

from __future__ import annotations

import os
from dataclasses import dataclass

from mergekit.common import ModelReference
from mergekit.config import MergeConfiguration
from mergekit.io.tasks import LoaderCache, SaveTensor
from mergekit.options import MergeOptions

from mergekit_sparsegpt.methods.context import PlannedTensor, TaskKey

# hessian_source: merged (RegMean++) measures every task's inputs in the merged model.
MERGED = "merged"
HESSIAN_SOURCES = ("finetuned", "base", MERGED)


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
    # Every consumer reads only diag H (wanda, combine, the report's estimate): the pre-pass
    # accumulates nothing more.
    diagonal: bool = False


@dataclass(frozen=True)
class CalibrationTask:
    key: TaskKey  # (model whose task vector is trimmed, calibration source)
    forward_model: ModelReference  # the model the calibration text runs through
    # A folder `calibrate --export` wrote, read instead of calibrating (key[1] is then "").
    statistics: str | None = None


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
