"""The merge's parameters checked before any work: names, types, ranges, and the settings
that shape the statistics."""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable
from typing import Any

from mergekit.common import ModelReference
from mergekit.config import ConditionalParameter, MergeConfiguration
from mergekit.merge_methods.base import ParameterScope, ParameterSpec
from pydantic import ValidationError

from mergekit_sparsegpt.methods.base import PluginMethod
from mergekit_sparsegpt.methods.context import PlannedTensor
from mergekit_sparsegpt.methods.parameters import PREPASS_PARAMETERS
from mergekit_sparsegpt.prepass.merged_source import (
    MERGED,
    check_merged_source,
)
from mergekit_sparsegpt.prepass.plan import HESSIAN_SOURCES, PrepassSettings


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


def validate_parameters(planned: list[PlannedTensor], method: PluginMethod) -> PrepassSettings:
    """Check every resolved value the method has; return the settings that must be constant."""
    for tensor in planned:
        method.check_shared(tensor.shared)
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
        keep_factors=any(method.keeps_factors(tensor.shared) for tensor in planned),
        keep_hessians=method.keeps_hessians,
        diagonal=all(method.reads_only_diagonals(tensor.shared) for tensor in planned),
    )
    _check_settings(settings)
    if settings.hessian_source == MERGED:
        check_merged_source(planned, method)
        _refuse_statistics_folders(planned)
    return settings


def _refuse_statistics_folders(planned: list[PlannedTensor]) -> None:
    for tensor in planned:
        for model, values in tensor.per_input.items():
            if model != tensor.base_model and values.get("statistics"):
                raise ValueError(
                    f"Model {model} has `statistics:`, but hessian_source: {MERGED} (RegMean++) "
                    "measures every task in the merged model, so its statistics depend on every "
                    "model of this merge and no folder can hold them. Use hessian_source: "
                    "finetuned or base with statistics folders exported with that source, or "
                    "give the model `calibration:`."
                )


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
    _check_data(model, values)


def _check_data(model: ModelReference, values: dict[str, Any]) -> None:
    """A merged model brings calibration text or a statistics folder: one of them."""
    if values["calibration"] and values.get("statistics"):
        raise ValueError(
            f"Model {model} has both 'calibration' and 'statistics': a statistics folder "
            "replaces calibrating the model. Keep one of them (a `calibration:` default under "
            "the top-level `parameters:` counts too)."
        )
    if not values["calibration"] and not values.get("statistics"):
        raise ValueError(
            f"Model {model} has no 'calibration' parameter. Every merged model needs "
            "calibration text: add `calibration: <file or dataset>` to its parameters "
            "(or a default under the top-level `parameters:`), or `statistics: <folder>` "
            "exported by `mergekit-sparsegpt calibrate --export`."
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
