"""The statistics of the merge in progress, which the merge kernels read by tensor name.

A mergekit kernel sees only the output tensor name and each input's ``ModelReference``; the
pre-pass (``prepass.run_with_statistics``) activates a ``MergeContext`` for the duration of
``run_merge`` so the kernel can find the right Hessian statistics.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from mergekit.common import ModelReference
from mergekit.merge_methods.base import TensorGroup

from mergekit_sparsegpt.statistics.merged_linears import MergedLinears
from mergekit_sparsegpt.statistics.task_statistics import (
    ModelRoles,
    StoredMatricesError,
    TaskStatistics,
    TensorStatistics,
    TokenStatistics,
)

TaskKey = tuple[ModelReference, str]  # (model whose task vector it is, calibration source)
# The report path of a tensor merged by the method's stock rule.
FALLBACK = "fallback"


@dataclass
class MergeContext:
    # output tensor name -> model -> the tensor name whose Hessian applies (differs under slices)
    hessian_inputs: dict[str, dict[ModelReference, str]]
    tasks: dict[TaskKey, TaskStatistics]
    usage: Counter = field(default_factory=Counter)
    # output tensor -> {"path": ..., "models": {model: trim_entry(...)}, **details}, for the
    # JSON report
    report: dict[str, dict[str, Any]] = field(default_factory=dict)
    # What the model card says about the merge set by the pre-pass.
    card_facts: CardFacts | None = None
    # The linears the pre-pass already solved (RegMean): their values replace the kernel's.
    merged: MergedLinears | None = None
    # Where the base model keeps its token embedding and head: the report's tensor kinds.
    roles: ModelRoles | None = None
    # Every output tensor's inputs (model -> its own tensor name, which differs under slices)
    # and a reader of every model's tensors: for a tensor solved together with another (a
    # linear's weight and bias), whose kernel reads both.
    planned_inputs: dict[str, dict[ModelReference, str]] = field(default_factory=dict)
    read_tensor: Callable[[ModelReference, str], torch.Tensor] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def tensor_statistics_for(
        self, output_name: str, model: ModelReference, calibration: str | None
    ) -> TensorStatistics | None:
        """Statistics of every matrix of ``output_name`` for ``model``'s contribution (None:
        the tensor has no Hessian, and is merged by the stock rule)."""
        task = self.tasks.get((model, calibration or ""))
        if task is None:
            raise ValueError(
                f"No Hessian statistics were prepared for model {model} with calibration "
                f"{calibration!r}; run the merge through mergekit-yaml or run_merge"
            )
        input_name = self.hessian_inputs.get(output_name, {}).get(model, output_name)
        try:
            return task.for_tensor(input_name)
        except KeyError:
            raise ValueError(
                f"Tensor {input_name} of model {model} is a linear layer but no Hessian was "
                f"captured for it (calibration {calibration!r}); does the calibrated model have "
                "that layer? Delete the statistics cache entry or fix hessian_source / slices."
            ) from None
        except StoredMatricesError as error:
            # The pre-pass checked the entry; something changed it during the merge.
            raise ValueError(
                f"Hessian statistics of model {model} with calibration {calibration!r}, needed "
                f"for {input_name}: {error}. Delete that cache entry and rerun the merge; the "
                "pre-pass will recompute it."
            ) from None

    def token_statistics_for(
        self, output_name: str, model: ModelReference, calibration: str | None
    ) -> TokenStatistics | None:
        """The token embedding's statistics for ``model``'s contribution when ``output_name``
        is that embedding and its tokens were counted; None otherwise."""
        task = self.tasks.get((model, calibration or ""))
        if task is None:
            return None
        return task.for_tokens(self.hessian_inputs.get(output_name, {}).get(model, output_name))

    def partner_tensors(
        self, output_name: str, models: Iterable[ModelReference]
    ) -> dict[ModelReference, torch.Tensor] | None:
        """Every model's input to output tensor ``output_name`` (its own name under slices);
        None when the merge has no such tensor or no reader."""
        inputs = self.planned_inputs.get(output_name)
        if inputs is None or self.read_tensor is None:
            return None
        return {model: self.read_tensor(model, inputs[model]) for model in models}

    def record(
        self,
        tensor: str,
        path: str,
        value: torch.Tensor,
        models: dict[str, Any] | None = None,
        **details: Any,
    ) -> None:
        """Count ``tensor`` (of the base's ``value``) under ``path``; ``details`` (e.g. RegMean's
        solve) go to the report, with the tensor's kind."""
        kind = self.tensor_kind(tensor, value, path)
        with self._lock:
            self.usage[(path, "tensors")] += 1
            self.usage[(path, "parameters")] += value.numel()
            self.report[tensor] = {"path": path, "kind": kind, "models": models or {}, **details}

    def tensor_kind(self, name: str, value: torch.Tensor, path: str) -> str:
        """What the tensor is in the model, as the report and the run's summary group them."""
        roles = self.roles
        if roles is not None and name == roles.embedding:
            return "token embedding (tied to the head)" if roles.tied else "token embedding"
        if roles is not None and name == roles.head:
            return "output head"
        if path.startswith("norm"):  # trimming methods merge a [channels, 1] view of a scale
            return "norm or scale"
        if value.dim() >= 2:
            return "decoder linear" if path != FALLBACK else "other matrix"
        return "bias" if name.endswith("bias") else "norm or scale"


_active: MergeContext | None = None


@contextmanager
def activated(context: MergeContext) -> Iterator[MergeContext]:
    global _active
    previous, _active = _active, context
    try:
        yield context
    finally:
        _active = previous


def active_context(method_name: str) -> MergeContext:
    if _active is None:
        # Falling back to the stock rule here would make every tensor data-free without a word:
        # a kernel cannot tell which tensors a pre-pass would have given a Hessian.
        raise RuntimeError(
            f"{method_name} needs Hessian statistics from calibration text, which only the "
            "pre-pass computes, and the pre-pass runs only inside a whole merge: mergekit-yaml "
            "(or mergekit-sparsegpt-yaml) CONFIG OUT, or mergekit.merge.run_merge(config, "
            "out_path, options) with a MergeConfiguration whose models have `calibration:`. "
            "mergekit's in-memory API (merge_methods.api.merge_tensors / merge_state_dicts) and "
            "direct kernel calls have no pre-pass; for an in-memory merge without data use the "
            "stock method (ties, dare_linear, task_arithmetic)."
        )
    return _active


WEIGHT, BIAS = ".weight", ".bias"


def bias_of(weight_name: str) -> str | None:
    return weight_name.removesuffix(WEIGHT) + BIAS if weight_name.endswith(WEIGHT) else None


def weight_of(bias_name: str) -> str | None:
    return bias_name.removesuffix(BIAS) + WEIGHT if bias_name.endswith(BIAS) else None


@dataclass(frozen=True)
class LinearBias:
    """A bias's statistics: those of the weight it is added to (``weight``), per model."""

    weight: str
    statistics: dict[Any, TensorStatistics | None]


KernelStatistics = dict[Any, TensorStatistics | None] | dict[Any, TokenStatistics] | LinearBias


def kernel_statistics(
    method_name: str, group: TensorGroup, calibration: dict[Any, str]
) -> tuple[MergeContext, str, KernelStatistics] | None:
    """The active context, the tensor's name, and every merged model's statistics for it:
    its Hessians, or for the token embedding every model's ``TokenStatistics``.

    For a bias, the statistics of its weight (``LinearBias``) when that weight has some.
    None when no model has statistics for the tensor: the tensor is then recorded under the
    "fallback" path, and the kernel applies its stock rule. Inputs with inf/NaN entries are
    refused here: they would silently make the merged tensor inf/NaN.
    """
    _check_finite(group)
    context = active_context(method_name)
    name = group.metadata.name or "<unnamed tensor>"
    statistics = {
        entry.id: context.tensor_statistics_for(name, entry.id, calibration[entry.id])
        for entry in group.non_base
    }
    if all(stats is None for stats in statistics.values()):
        tokens = {
            entry.id: context.token_statistics_for(name, entry.id, calibration[entry.id])
            for entry in group.non_base
        }
        if all(stats is not None for stats in tokens.values()):
            return context, name, tokens  # type: ignore[return-value]
        linear = _weight_statistics(context, group, name, calibration)
        if linear is not None:
            return context, name, linear
        context.record(name, FALLBACK, group.base.tensor)
        return None
    layouts = {stats.layout for stats in statistics.values() if stats is not None}
    if len(layouts) > 1:
        raise ValueError(
            f"The models' Hessian statistics for {name} lay its matrices out differently "
            f"({sorted(map(str, layouts))}): the models are not of one architecture"
        )
    return context, name, statistics


def _weight_statistics(
    context: MergeContext, group: TensorGroup, name: str, calibration: dict[Any, str]
) -> LinearBias | None:
    """The statistics of the weight a bias is added to, when that weight has some. A weight not
    captured yet (a block the RegMean++ pass is still building) counts as having none."""
    weight = weight_of(name)
    if weight is None or group.base.tensor.dim() != 1:
        return None
    try:
        linear = {
            entry.id: context.tensor_statistics_for(weight, entry.id, calibration[entry.id])
            for entry in group.non_base
        }
    except ValueError:
        return None
    return LinearBias(weight, linear) if any(s is not None for s in linear.values()) else None


def regrouped(group: TensorGroup, tensors: dict[Any, torch.Tensor], name: str) -> TensorGroup:
    """A group of the same models (the same base) holding ``tensors`` (by model) as ``name``."""
    return TensorGroup.from_tensors(
        [tensors[entry.id] for entry in group.entries],
        ids=[entry.id for entry in group.entries],
        base_index=next(i for i, entry in enumerate(group.entries) if entry.is_base),
        name=name,
    )


def solved_linear(context: MergeContext, group: TensorGroup) -> torch.Tensor | None:
    """The tensor's value from the pre-pass's solved linears (``context.merged``), its report
    record replayed. None for a tensor they do not hold: the pre-pass solved every tensor that
    has a Hessian, so it has none and is recorded under "fallback" for the stock rule."""
    assert context.merged is not None
    _check_finite(group)
    name = group.metadata.name or "<unnamed tensor>"
    base = group.base.tensor
    if name not in context.merged:
        context.record(name, FALLBACK, base)
        return None
    record = dict(context.merged.reports[name])
    path, models = record.pop("path"), record.pop("models", {})
    try:
        value = context.merged.tensor(name)
    except StoredMatricesError as error:
        raise ValueError(
            f"The solved linears of this merge, needed for {name}: {error}. Delete that cache "
            "entry and rerun the merge; the pre-pass will recompute it."
        ) from None
    if value.shape != base.shape:
        raise ValueError(
            f"The solved linears of this merge hold {name} with shape {tuple(value.shape)}, "
            f"but the base model's is {tuple(base.shape)}: delete that cache entry and rerun"
        )
    record.pop("kind", None)  # recomputed: entries of earlier versions have none
    context.record(name, path, base, models, **record)
    return value.to(device=base.device, dtype=base.dtype)


def _check_finite(group: TensorGroup) -> None:
    for entry in (group.base, *group.non_base):
        if not torch.isfinite(entry.tensor).all():
            raise ValueError(
                f"{group.metadata.name or '<unnamed tensor>'} of model {entry.id} has inf/NaN "
                "entries. Check that checkpoint; if its values overflow the merge dtype, merge "
                "with dtype: float32."
            )


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
class CardFacts:
    """What the model card says about the merge, besides how each tensor went."""

    method_name: str
    planned: list[PlannedTensor]
    windows: dict[TaskKey, tuple[int, int]]  # (windows, tokens each) per task
