"""The first steps of every pre-pass (a merge's, ``calibrate``'s, ``calibrate --export``'s):
the config checked and planned, and every model's weights checked, before any heavy work."""

from __future__ import annotations

from dataclasses import dataclass

from mergekit.common import ModelReference
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions

from mergekit_sparsegpt.capture.weights import CheckpointReader
from mergekit_sparsegpt.methods.base import PluginMethod
from mergekit_sparsegpt.methods.context import PlannedTensor
from mergekit_sparsegpt.methods.registry import plugin_method
from mergekit_sparsegpt.prepass.model_checks import check_models_usable, check_weights
from mergekit_sparsegpt.prepass.plan import PrepassSettings, plan_tensors
from mergekit_sparsegpt.prepass.validate import check_parameter_names, validate_parameters


@dataclass(frozen=True)
class CheckedMerge:
    """A merge whose config, parameters and weights passed every check."""

    method: PluginMethod
    planned: list[PlannedTensor]
    settings: PrepassSettings
    readers: dict[ModelReference, CheckpointReader]


def checked_merge(merge_config: MergeConfiguration, options: MergeOptions) -> CheckedMerge:
    method = plugin_method(merge_config.merge_method)
    check_parameter_names(merge_config, method.spec.parameters)
    check_models_usable(merge_config, options)
    planned = plan_tensors(merge_config, options)
    settings = validate_parameters(planned, method)
    readers = {
        model: CheckpointReader(model, model.config(options.trust_remote_code).model_type)
        for model in {m for tensor in planned for m in tensor.inputs}
    }
    check_weights(planned, readers, merge_config, options)
    return CheckedMerge(method, planned, settings, readers)
