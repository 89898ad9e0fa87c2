"""Every kernel and the trim on ``meta`` tensors: a tensor made without ``device=`` is a CPU
tensor, and torch refuses to mix it with a meta one, so this is the CPU stand-in for a merge on
an accelerator (``--cuda``).

Data-dependent reads (``.item()``, ``bool()``, boolean-mask indexing) cannot run on meta; the
``_MetaValues`` mode answers them with a fixed stand-in so the kernel runs to its end, and every
other op still runs on meta and still refuses a CPU operand.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import pytest
import torch
from mergekit import merge_methods
from mergekit.merge_methods.base import TensorGroup
from torch.overrides import TorchFunctionMode

from mergekit_sparsegpt.integration.registration import register_methods
from mergekit_sparsegpt.methods.context import MergeContext, activated
from mergekit_sparsegpt.statistics.hessian import HessianStatistics, hessian_statistics
from mergekit_sparsegpt.statistics.task_statistics import ModelRoles, TaskStatistics
from mergekit_sparsegpt.trim.trim import trim_task_vectors

register_methods()

LINEAR = "model.layers.0.mlp.down_proj.weight"
ROWS, COLUMNS = 5, 6
MODELS = ("a", "b")
META = torch.device("meta")


def _on_meta(value: Any) -> Any:
    return value.to(META) if isinstance(value, torch.Tensor) else value


class _MetaValues(TorchFunctionMode):
    """Stand-in answers for the reads that need data; everything else runs as it is."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        this = args[0] if args else None
        on_meta = isinstance(this, torch.Tensor) and this.device.type == "meta"
        if on_meta and func in (torch.Tensor.item, torch.Tensor.__float__):
            return 0 if this.dtype in (torch.int32, torch.int64) else 1.0
        if on_meta and func in (torch.Tensor.__bool__, torch.Tensor.__int__):
            return True if func is torch.Tensor.__bool__ else 1
        if on_meta and func is torch.Tensor.__getitem__ and _is_mask(args[1]):
            return this.reshape(-1)
        return func(*args, **kwargs)


def _is_mask(index: Any) -> bool:
    return isinstance(index, torch.Tensor) and index.dtype == torch.bool


def _statistics(seed: int) -> HessianStatistics:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(40, COLUMNS, generator=generator) @ (
        torch.eye(COLUMNS) + torch.randn(COLUMNS, COLUMNS, generator=generator)
    )
    stats = hessian_statistics(2 / 40 * inputs.T @ inputs, keep_factor=True, keep_hessian=True)
    return HessianStatistics(**{f.name: _on_meta(getattr(stats, f.name)) for f in fields(stats)})


def _context() -> MergeContext:
    tasks = {}
    for seed, model in enumerate(MODELS):
        task = TaskStatistics.empty("model.layers")
        task.groups[LINEAR] = LINEAR
        task.statistics[LINEAR] = _statistics(seed)
        task.samples[LINEAR] = 40
        task.linear_suffixes = frozenset({"mlp.down_proj.weight"})
        tasks[(model, f"{model}.txt")] = task
    return MergeContext(hessian_inputs={}, tasks=tasks)


def _group(name: str = LINEAR, shape: tuple[int, ...] = (ROWS, COLUMNS)) -> TensorGroup:
    tensors = [torch.empty(shape, device=META) for _ in ("base", *MODELS)]
    return TensorGroup.from_tensors(tensors, ids=["base", *MODELS], base_index=0, name=name)


def _parameters(method: str, **overrides: Any) -> dict[str, Any]:
    specs = merge_methods.get(method).spec.parameters
    values = {p.name: p.default for p in specs if not p.required and p.scope.value == "shared"}
    values |= {
        "weight": dict.fromkeys(MODELS, 1.0),
        "density": dict.fromkeys(MODELS, 0.5),
        "calibration": {model: f"{model}.txt" for model in MODELS},
    }
    return values | overrides


CASES = [
    ("sparsegpt_ties", {"compensate": False}),
    ("sparsegpt_ties", {"compensate": True, "sign_from": "raw"}),
    ("sparsegpt_ties", {"compensate": True, "sign_from": "compensated"}),
    ("sparsegpt_ties", {"compensate": True, "int8_mask": True}),
    ("sparsegpt_ties", {"combine": "energy"}),
    ("sparsegpt_ties", {"combine": "energy", "compensate": True, "sign_from": "raw"}),
    ("sparsegpt_dare", {"combine": "energy"}),
    ("sparsegpt_dare", {"compensate": False}),
    ("sparsegpt_dare", {"compensate": True}),
    ("regmean", {}),
    ("sparsegpt_regmean", {"compensate": False}),
    ("sparsegpt_regmean", {"compensate": True}),
]


@pytest.mark.parametrize("method, overrides", CASES, ids=[f"{m}-{o}" for m, o in CASES])
def test_kernel_runs_on_meta(method, overrides):
    context = _context()
    parameters = _parameters(method, **overrides)
    with activated(context), _MetaValues():
        merged = merge_methods.get(method).merge_group(_group(), **parameters)
    assert merged.device == META
    assert merged.shape == (ROWS, COLUMNS)
    assert context.report[LINEAR]["path"] in ("importance", "regmean")


@pytest.mark.parametrize("method", sorted({method for method, _ in CASES}))
def test_fallback_runs_on_meta(method):
    context = _context()
    group = _group("model.layers.0.input_layernorm.weight", (4,))
    with activated(context), _MetaValues():
        merged = merge_methods.get(method).merge_group(group, **_parameters(method))
    assert merged.device == META
    assert context.report["model.layers.0.input_layernorm.weight"]["path"] == "fallback"


EMBED, HEAD, VOCABULARY = "model.embed_tokens.weight", "lm_head.weight", 9


def _token_context(tied: bool) -> MergeContext:
    """Every task's token counts and (for a tied embedding) the head's statistics, on meta."""
    context = _context()
    roles = ModelRoles(EMBED, HEAD, tied)
    for task in context.tasks.values():
        task.roles = roles
        task.token_counts = torch.empty(VOCABULARY, device=META)
        task.groups[HEAD] = HEAD
        task.statistics[HEAD] = _statistics(7)
        task.samples[HEAD] = 40
    context.roles = roles
    return context


TOKEN_CASES = [
    ("regmean", {"tied_embeddings": "blend"}, True),
    ("regmean", {}, False),
    ("sparsegpt_regmean", {}, False),
    ("sparsegpt_ties", {"combine": "energy"}, False),
    ("sparsegpt_dare", {}, True),
]


@pytest.mark.parametrize("method, overrides, tied", TOKEN_CASES)
def test_token_rules_run_on_meta(method, overrides, tied):
    context = _token_context(tied)
    group = _group(EMBED, (VOCABULARY, COLUMNS))
    with activated(context), _MetaValues():
        merged = merge_methods.get(method).merge_group(group, **_parameters(method, **overrides))
    assert merged.device == META and merged.shape == (VOCABULARY, COLUMNS)
    assert context.report[EMBED]["path"] == "tokens"


@pytest.mark.parametrize("compensate", [False, True])
@pytest.mark.parametrize("rescale", [False, True])
def test_trim_runs_on_meta(compensate, rescale):
    context = _context()
    statistics = {m: context.tensor_statistics_for(LINEAR, m, f"{m}.txt") for m in MODELS}
    group = _group()
    models = [(entry.id, entry.tensor) for entry in group.non_base]
    parameters = _parameters("sparsegpt_dare", compensate=compensate, rescale=rescale)
    with _MetaValues():
        trimmed, masks, report = trim_task_vectors(
            group.base.tensor, models, statistics, parameters, LINEAR
        )
    assert all(vector.device == META for vector in trimmed)
    assert all(mask is not None and mask.device == META for mask in masks)
    assert set(report) == set(MODELS)


def test_a_cpu_tensor_among_meta_ones_is_caught():
    """The mode must not hide the very error these tests look for."""
    with _MetaValues(), pytest.raises((RuntimeError, NotImplementedError, ValueError)):
        torch.empty(3, device=META) + torch.ones(3)
