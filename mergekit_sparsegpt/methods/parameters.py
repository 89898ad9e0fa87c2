"""The parameters our methods add to mergekit's, and the typed spec of the choice parameters."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from mergekit.merge_methods.base import ParameterScope, ParameterSpec

from mergekit_sparsegpt.trim.importance import (
    COLUMN_WEIGHTS,
    DEFAULT_IMPORTANCE,
    SELECTIONS,
    validate_importance,
)


@dataclass(frozen=True)
class Choice:
    """A merge-wide parameter that takes one of ``choices``.

    mergekit sees it as a ``str`` parameter (so its type check, and our "must be a string"
    message, stay as they are); ``check`` refuses a value outside ``choices``. ``validate``, when
    given, replaces the membership check (a layer below that owns the choices and its message).
    """

    name: str
    choices: tuple[str, ...]
    default: str
    validate: Callable[[str], object] | None = None

    @property
    def spec(self) -> ParameterSpec:
        return ParameterSpec(self.name, str, ParameterScope.SHARED, default=self.default)

    def check(self, shared: Mapping[str, Any]) -> None:
        if self.name not in shared:
            return
        value = shared[self.name]
        if self.validate is not None:
            self.validate(value)
        elif value not in self.choices:
            raise ValueError(f"{self.name} must be one of {', '.join(self.choices)}, got {value!r}")


# Parameters read by the pre-pass (calibration, Hessians, cache) rather than by the kernel.
PREPASS_PARAMETERS: tuple[ParameterSpec, ...] = (
    ParameterSpec("calibration", str | None, ParameterScope.NON_BASE, default=None),
    # A folder written by `mergekit-sparsegpt calibrate --export`: the model's statistics,
    # used instead of calibrating it.
    ParameterSpec("statistics", str | None, ParameterScope.NON_BASE, default=None),
    # None (not set): the pre-pass fits them to the text and the model, see
    # calibration.DEFAULT_SAMPLES and prepass.tasks.DEFAULT_SEQ_LEN.
    ParameterSpec("calibration_samples", int | None, ParameterScope.SHARED, default=None),
    ParameterSpec("calibration_seq_len", int | None, ParameterScope.SHARED, default=None),
    ParameterSpec("calibration_field", str, ParameterScope.SHARED, default="text"),
    ParameterSpec("calibration_split", str, ParameterScope.SHARED, default="train"),
    ParameterSpec("calibration_batch_size", int, ParameterScope.SHARED, default=8),
    # "base" (see docs/quality-benchmark.md): the merged model's activations are closer to the
    # base's than to any one expert's.
    ParameterSpec("hessian_source", str, ParameterScope.SHARED, default="base"),
    ParameterSpec("dampening", float, ParameterScope.SHARED, default=0.01),
    ParameterSpec("cache_dir", str | None, ParameterScope.SHARED, default=None),
)

# Read by every method's kernel: false merges the output head by the stock rule, as if it had
# no Hessian (its Hessian is captured all the same).
LM_HEAD_STATISTICS = ParameterSpec("lm_head_statistics", bool, ParameterScope.SHARED, default=True)
HEAD_PARAMETERS: tuple[ParameterSpec, ...] = (LM_HEAD_STATISTICS,)

IMPORTANCE = Choice(
    "importance", tuple(sorted(COLUMN_WEIGHTS)), DEFAULT_IMPORTANCE, validate_importance
)
SELECTION = Choice("selection", SELECTIONS, "tensor")
# Parameters of importance trimming (with the per-model ``density``), read by
# ``trim.trim.trim_task_vectors``.
TRIM_PARAMETERS: tuple[ParameterSpec, ...] = (
    IMPORTANCE.spec,
    SELECTION.spec,
    ParameterSpec("compensate", bool, ParameterScope.SHARED, default=False),
)

# Only for methods with sign election: which values elect the sign when compensation re-fitted
# the kept entries. "raw" (the fine-tuned values at the kept positions) is the default, as
# measured in docs/quality-benchmark.md; "compensated" is what a plain TIES would see.
SIGN_SOURCES = ("raw", "compensated")
SIGN_FROM = Choice("sign_from", SIGN_SOURCES, SIGN_SOURCES[0])
SIGN_PARAMETERS: tuple[ParameterSpec, ...] = (SIGN_FROM.spec,)


def check_trim(shared: Mapping[str, Any]) -> None:
    """The merge-wide values of importance trimming."""
    IMPORTANCE.check(shared)
    SELECTION.check(shared)


def check_finite(shared: Mapping[str, Any], *names: str) -> None:
    for name in names:
        if name in shared and not math.isfinite(shared[name]):
            raise ValueError(f"{name} must be finite, got {shared[name]}")
