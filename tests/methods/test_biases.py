"""A linear's weight and bias solved together by RegMean, against a least-squares solve over
every model's stacked inputs [x, 1]; the trimming methods' stock rule for biases."""

from dataclasses import replace

import pytest
import torch
from mergekit import merge_methods
from mergekit.merge_methods.base import TensorGroup

from mergekit_sparsegpt.capture.accumulate import HessianAccumulator, TensorLayout
from mergekit_sparsegpt.methods.biases import CONSTANT_INPUT
from mergekit_sparsegpt.methods.context import MergeContext, activated
from mergekit_sparsegpt.statistics.hessian import hessian_statistics
from mergekit_sparsegpt.statistics.task_statistics import TaskStatistics

WEIGHT, BIAS = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.bias"
OUT, IN, SEQUENCES, TOKENS = 3, 4, 2, 10
WEIGHTS = {"a": 1.0, "b": 0.5, "c": 2.0}
F64 = torch.float64


def _inputs(seed: int) -> torch.Tensor:
    """[sequences, tokens, in] rows with a mean far from zero: the bias matters."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(SEQUENCES, TOKENS, IN, generator=generator) + 2.0 * seed


def _tensors(conv1d: bool) -> dict[str, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    base_w, base_b = (
        torch.randn(OUT, IN, generator=generator),
        torch.randn(OUT, generator=generator),
    )
    tensors = {}
    for model in ("base", *WEIGHTS):
        shift = model != "base"
        weight = base_w + shift * torch.randn(OUT, IN, generator=generator)
        bias = base_b + shift * torch.randn(OUT, generator=generator)
        tensors[model] = {WEIGHT: weight.T.contiguous() if conv1d else weight, BIAS: bias}
    return tensors


def _context(tensors, conv1d: bool, with_bias: bool = True) -> MergeContext:
    tasks = {}
    for seed, model in enumerate(WEIGHTS, start=1):
        accumulator = HessianAccumulator(IN, sums=True)
        accumulator.add_batch(_inputs(seed))
        task = TaskStatistics.empty("model.layers")
        task.groups[WEIGHT] = WEIGHT
        stats = hessian_statistics(accumulator.hessian, keep_hessian=True)
        task.statistics[WEIGHT] = replace(stats, input_sum=accumulator.sums)
        task.samples[WEIGHT] = SEQUENCES
        task.linear_suffixes = frozenset({"self_attn.q_proj.weight"})
        if conv1d:
            task.layouts[WEIGHT] = TensorLayout(input_axis=-2)
        tasks[(model, f"{model}.txt")] = task
    return MergeContext(
        hessian_inputs={},
        tasks=tasks,
        planned_inputs={
            name: {model: name for model in ("base", *WEIGHTS)}
            for name in ((WEIGHT, BIAS) if with_bias else (WEIGHT,))
        },
        read_tensor=lambda model, name: tensors[model][name],
    )


def _merge(method, context, tensors, name, **parameters) -> torch.Tensor:
    group = TensorGroup.from_tensors(
        [tensors[m][name] for m in ("base", *WEIGHTS)],
        ids=["base", *WEIGHTS],
        base_index=0,
        name=name,
    )
    values = {"weight": WEIGHTS, "calibration": {m: f"{m}.txt" for m in WEIGHTS}, **parameters}
    with activated(context):
        (merged,) = merge_methods.get(method)([group], parameters=values)
    return merged


def _least_squares(tensors, conv1d: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """argmin over [W, b] of sum_i w_i ||X_i W^T + b - (X_i W_i^T + b_i)||^2, stacked rows."""
    rows, targets = [], []
    for seed, model in enumerate(WEIGHTS, start=1):
        x = _inputs(seed).reshape(-1, IN).to(F64)
        weight = tensors[model][WEIGHT].to(F64)
        weight = weight.T if conv1d else weight
        scale = WEIGHTS[model] ** 0.5
        rows.append(scale * torch.cat([x, torch.ones(len(x), 1, dtype=F64)], dim=1))
        targets.append(scale * (x @ weight.T + tensors[model][BIAS].to(F64)))
    solution = torch.linalg.lstsq(torch.cat(rows), torch.cat(targets)).solution  # [in + 1, out]
    return solution[:IN].T, solution[IN]


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_weight_and_bias_are_the_joint_least_squares_merge(conv1d):
    tensors = _tensors(conv1d)
    context = _context(tensors, conv1d)
    weight = _merge("regmean", context, tensors, WEIGHT)
    bias = _merge("regmean", context, tensors, BIAS)
    expected_weight, expected_bias = _least_squares(tensors, conv1d)
    torch.testing.assert_close(
        (weight.T if conv1d else weight).to(F64), expected_weight, rtol=1e-4, atol=1e-4
    )
    torch.testing.assert_close(bias.to(F64), expected_bias, rtol=1e-4, atol=1e-4)
    assert context.report[WEIGHT]["with_bias"] == BIAS
    assert (context.report[BIAS]["path"], context.report[BIAS]["kind"]) == ("regmean", "bias")
    assert context.report[BIAS]["with_weight"] == WEIGHT


def test_the_other_tensor_is_read_under_each_models_own_name():
    """Under slices a model's input to an output tensor has another name (another layer):
    the partner is read by that name, as mergekit reads the tensor itself."""
    tensors = _tensors(False)
    expected = _merge("regmean", _context(tensors, False), tensors, BIAS)
    moved = {m: dict(t) for m, t in tensors.items()}
    own = {name: name.replace("layers.0", "layers.3") for name in (WEIGHT, BIAS)}
    moved["c"] = {own[name]: value for name, value in tensors["c"].items()}
    context = _context(moved, False)
    for name in (WEIGHT, BIAS):
        context.planned_inputs[name]["c"] = own[name]
    group_tensors = {**tensors, "c": tensors["c"]}  # the kernel's own group is unchanged
    assert torch.equal(_merge("regmean", context, group_tensors, BIAS), expected)


def test_without_its_bias_in_the_merge_the_weight_is_solved_alone():
    tensors = _tensors(False)
    joint = _merge("regmean", _context(tensors, False), tensors, WEIGHT)
    context = _context(tensors, False, with_bias=False)
    alone = _merge("regmean", context, tensors, WEIGHT)
    assert "with_bias" not in context.report[WEIGHT]
    assert not torch.allclose(joint, alone, atol=1e-3)  # the bias moved the weight's solve


@pytest.mark.parametrize("method", ["sparsegpt_ties", "sparsegpt_dare"])
def test_trimming_methods_take_the_stock_rule_for_a_bias_and_say_why(method):
    tensors = _tensors(False)
    context = _context(tensors, False)
    merged = _merge(method, context, tensors, BIAS, density=1.0)
    stock = merge_methods.get("ties" if method == "sparsegpt_ties" else "dare_linear")
    group = TensorGroup.from_tensors(
        [tensors[m][BIAS] for m in ("base", *WEIGHTS)], ids=["base", *WEIGHTS], base_index=0
    )
    (expected,) = stock([group], parameters={"weight": WEIGHTS, "density": 1.0})
    torch.testing.assert_close(merged, expected)
    assert context.report[BIAS]["path"] == "fallback"
    assert context.report[BIAS]["reason"] == CONSTANT_INPUT
