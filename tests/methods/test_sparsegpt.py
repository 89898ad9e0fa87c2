import pytest
import torch
from mergekit import merge_methods
from mergekit.merge_methods.base import TensorGroup

from mergekit_sparsegpt.integration.registration import register_methods
from mergekit_sparsegpt.methods.context import MergeContext, activated
from mergekit_sparsegpt.statistics.hessian import hessian_statistics
from mergekit_sparsegpt.statistics.task_statistics import TaskStatistics

register_methods()

LINEAR = "model.layers.0.mlp.down_proj.weight"
COLUMNS = 6


def _task(seed: int) -> TaskStatistics:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(40, COLUMNS, generator=generator) * torch.linspace(0.2, 4, COLUMNS)
    task = TaskStatistics.empty("model.layers")
    task.groups[LINEAR] = LINEAR
    task.statistics[LINEAR] = hessian_statistics(2 / 40 * inputs.T @ inputs)
    task.samples[LINEAR] = 40
    task.linear_suffixes = frozenset({"mlp.down_proj.weight"})
    return task


@pytest.fixture
def context():
    tasks = {("a", "a.txt"): _task(1), ("b", "b.txt"): _task(2)}
    with activated(MergeContext(hessian_inputs={}, tasks=tasks)) as active:
        yield active


def _group(name: str = LINEAR, shape=(5, COLUMNS)) -> TensorGroup:
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(*shape, generator=generator)
    tensors = [base] + [base + 0.1 * torch.randn(*shape, generator=generator) for _ in range(2)]
    return TensorGroup.from_tensors(tensors, ids=["base", "a", "b"], base_index=0, name=name)


def _parameters(**overrides):
    parameters = {
        "weight": {"a": 1.0, "b": 0.5},
        "density": {"a": 0.4, "b": 0.6},
        "calibration": {"a": "a.txt", "b": "b.txt"},
        "importance": "obs",
        # These tests check the trim in front of mergekit's own mean; sparsegpt_ties' default
        # energy-weighted mean is tested in test_combine.py.
        "combine": "mean",
    }
    parameters.update(overrides)
    return parameters


def _reference_trim(tau, stats, density, importance, rescale):
    """Loop reference: score every entry, keep the top k by (score, position)."""
    column = {
        "obs": lambda c: 1 / stats.inverse_diagonal[c].item(),
        "sparsegpt": lambda c: 1 / stats.cholesky_diagonal[c].item() ** 2,
        "wanda": lambda c: stats.hessian_diagonal[c].item(),
        "design_note": lambda c: 1 / stats.inverse_diagonal[c].item() ** 2,
    }[importance]
    rows, cols = tau.shape
    entries = [
        (tau[r, c].item() ** 2 * column(c), r * cols + c) for r in range(rows) for c in range(cols)
    ]
    k = max(1, int(density * rows * cols))
    keep = {index for _, index in sorted(entries, key=lambda e: (-e[0], e[1]))[:k]}
    trimmed = torch.zeros_like(tau)
    for index in keep:
        trimmed[index // cols, index % cols] = tau[index // cols, index % cols]
    if rescale and trimmed.abs().sum() > 0:
        trimmed = trimmed * (tau.abs().sum() / trimmed.abs().sum())
    return trimmed


def _reference_ties(group, context, parameters, normalize=True):
    base = group.base.tensor
    trimmed = {}
    for entry in group.non_base:
        stats = context.tasks[(entry.id, parameters["calibration"][entry.id])].statistics[LINEAR]
        tau = entry.tensor - base
        trimmed[entry.id] = parameters["weight"][entry.id] * _reference_trim(
            tau, stats, parameters["density"][entry.id], parameters["importance"], rescale=False
        )
    merged = torch.zeros_like(base)
    rows, cols = base.shape
    for r in range(rows):
        for c in range(cols):
            total = sum(t[r, c].item() for t in trimmed.values())
            sign = 1.0 if total >= 0 else -1.0
            agree = [
                m
                for m, t in trimmed.items()
                if t[r, c].item() != 0 and (t[r, c].item() > 0) == (sign > 0)
            ]
            value = sum(trimmed[m][r, c].item() for m in agree)
            divisor = sum(parameters["weight"][m] for m in agree) or 1.0
            merged[r, c] = value / divisor if normalize else value
    return base + merged


@pytest.mark.parametrize("importance", ["obs", "sparsegpt", "wanda", "design_note"])
def test_sparsegpt_ties_equals_reference(context, importance):
    group = _group()
    parameters = _parameters(importance=importance)
    (merged,) = merge_methods.get("sparsegpt_ties")([group], parameters=parameters)
    torch.testing.assert_close(
        merged, _reference_ties(group, context, parameters), rtol=1e-5, atol=1e-6
    )


def test_sparsegpt_dare_equals_reference_weighted_sum_with_l1_rescale(context):
    group = _group()
    parameters = _parameters(importance="sparsegpt")
    (merged,) = merge_methods.get("sparsegpt_dare")([group], parameters=parameters)
    base = group.base.tensor
    expected = base.clone()
    for entry in group.non_base:
        stats = context.tasks[(entry.id, parameters["calibration"][entry.id])].statistics[LINEAR]
        trimmed = _reference_trim(
            entry.tensor - base, stats, parameters["density"][entry.id], "sparsegpt", rescale=True
        )
        expected += parameters["weight"][entry.id] * trimmed
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-6)


def test_dare_without_rescale_and_lambda(context):
    group = _group()
    parameters = _parameters(rescale=False, **{"lambda": 0.5})
    (merged,) = merge_methods.get("sparsegpt_dare")([group], parameters=parameters)
    base = group.base.tensor
    expected = torch.zeros_like(base)
    for entry in group.non_base:
        stats = context.tasks[(entry.id, parameters["calibration"][entry.id])].statistics[LINEAR]
        expected += parameters["weight"][entry.id] * _reference_trim(
            entry.tensor - base, stats, parameters["density"][entry.id], "obs", rescale=False
        )
    torch.testing.assert_close(merged, base + 0.5 * expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "ours, stock, name",
    [
        ("sparsegpt_ties", "ties", "model.embed_tokens.weight"),
        ("sparsegpt_ties", "ties", "model.layers.0.input_layernorm.weight"),
        ("sparsegpt_dare", "dare_linear", "model.embed_tokens.weight"),
    ],
)
def test_tensors_without_hessian_equal_stock_output_bit_for_bit(context, ours, stock, name):
    shape = (5,) if "norm" in name else (9, 4)
    group = _group(name=name, shape=shape)
    parameters = _parameters()
    stock_parameters = {k: v for k, v in parameters.items() if k in ("weight", "density")}
    torch.manual_seed(11)
    (merged,) = merge_methods.get(ours)([group], parameters=parameters)
    torch.manual_seed(11)
    (expected,) = merge_methods.get(stock)([group], parameters=stock_parameters)
    assert torch.equal(merged, expected)
    assert context.usage[("fallback", "tensors")] == 1
    assert context.usage[("importance", "tensors")] == 0


def test_importance_path_is_counted(context):
    merge_methods.get("sparsegpt_ties")([_group()], parameters=_parameters())
    assert context.usage[("importance", "tensors")] == 1
    assert context.usage[("importance", "parameters")] == 5 * COLUMNS


def test_missing_hessian_for_a_linear_is_an_error(context):
    group = _group(name="model.layers.7.mlp.down_proj.weight")
    with pytest.raises(
        ValueError, match="model.layers.7.mlp.down_proj.weight of model a is a linear"
    ):
        merge_methods.get("sparsegpt_ties")([group], parameters=_parameters())


def test_shape_mismatch_names_tensor_and_model(context):
    group = _group(shape=(5, COLUMNS + 1))
    with pytest.raises(ValueError, match=f"{LINEAR} of model a: .*over {COLUMNS} input columns"):
        merge_methods.get("sparsegpt_ties")([group], parameters=_parameters())


def _tasks_with_factors() -> dict:
    """Tasks whose inputs are strongly correlated, so compensation moves kept entries a lot."""
    tasks = {}
    for model, seed in (("a", 1), ("b", 2)):
        generator = torch.Generator().manual_seed(seed)
        inputs = torch.randn(40, COLUMNS, generator=generator)
        inputs = inputs @ (torch.eye(COLUMNS) + torch.randn(COLUMNS, COLUMNS, generator=generator))
        task = _task(seed)
        task.statistics[LINEAR] = hessian_statistics(2 / 40 * inputs.T @ inputs, keep_factor=True)
        tasks[(model, f"{model}.txt")] = task
    return tasks


@pytest.mark.parametrize("sign_from", ["compensated", "raw"])
@pytest.mark.parametrize("rescale", [False, True])
def test_compensated_ties_equals_reference(rescale, sign_from):
    from mergekit_sparsegpt.trim.compensation import compensated_trim
    from mergekit_sparsegpt.trim.importance import importance_scores, top_density_mask

    tasks = _tasks_with_factors()
    group = _group()
    parameters = _parameters(
        compensate=True, importance="sparsegpt", rescale=rescale, sign_from=sign_from
    )
    with activated(MergeContext(hessian_inputs={}, tasks=tasks)):
        (merged,) = merge_methods.get("sparsegpt_ties")([group], parameters=parameters)

    base = group.base.tensor
    values, electors = {}, {}
    for entry in group.non_base:
        stats = tasks[(entry.id, f"{entry.id}.txt")].statistics[LINEAR]
        tau = entry.tensor - base
        mask = top_density_mask(
            importance_scores(tau, stats, "sparsegpt"), parameters["density"][entry.id]
        )
        compensated = compensated_trim(tau, stats.cholesky_factor, mask)
        assert torch.equal(compensated == 0, ~mask | (compensated == 0))
        if rescale:
            compensated = compensated * tau.abs().sum() / compensated.abs().sum()
        weight = parameters["weight"][entry.id]
        values[entry.id] = weight * compensated
        electors[entry.id] = weight * (compensated if sign_from == "compensated" else tau * mask)
    expected = base.clone()
    rows, cols = base.shape
    for r in range(rows):
        for c in range(cols):
            positive = sum(e[r, c].item() for e in electors.values()) >= 0
            agree = [
                m for m, e in electors.items() if e[r, c].item() != 0 and (e[r, c] > 0) == positive
            ]
            divisor = sum(parameters["weight"][m] for m in agree) or 1.0
            expected[r, c] += sum(values[m][r, c].item() for m in agree) / divisor
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-6)


def test_raw_sign_election_differs_from_compensated():
    """The two sign sources must give different merges here, or the reference test is blind."""
    parameters = _parameters(compensate=True, importance="sparsegpt", density={"a": 0.5, "b": 0.5})
    merged = {}
    for sign_from in ("compensated", "raw"):
        with activated(MergeContext(hessian_inputs={}, tasks=_tasks_with_factors())):
            (merged[sign_from],) = merge_methods.get("sparsegpt_ties")(
                [_group()], parameters={**parameters, "sign_from": sign_from}
            )
    assert not torch.allclose(merged["compensated"], merged["raw"])


def test_raw_sign_election_is_the_default():
    parameters = _parameters(compensate=True, importance="sparsegpt")
    merged = []
    for extra in ({}, {"sign_from": "raw"}):
        with activated(MergeContext(hessian_inputs={}, tasks=_tasks_with_factors())):
            merged += merge_methods.get("sparsegpt_ties")([_group()], parameters=parameters | extra)
    assert torch.equal(merged[0], merged[1])


def test_sign_from_is_offered_only_with_sign_election():
    names = {
        method: {p.name for p in merge_methods.get(method).spec.parameters}
        for method in ("sparsegpt_ties", "sparsegpt_dare")
    }
    assert "sign_from" in names["sparsegpt_ties"]
    assert "sign_from" not in names["sparsegpt_dare"]


def test_compensate_without_factor_is_a_clear_error(context):
    with pytest.raises(ValueError, match="compensate needs the Cholesky factor"):
        merge_methods.get("sparsegpt_ties")([_group()], parameters=_parameters(compensate=True))


def _sign_election_inputs(
    device: str,
) -> tuple[list[torch.Tensor], list[torch.Tensor], TensorGroup]:
    group = _group()
    base = group.base.tensor
    trimmed = [(entry.tensor - base).to(device) for entry in group.non_base]
    electors = [vector.sign() * (1 + vector.abs()) for vector in trimmed]
    on_device = TensorGroup.from_tensors(
        [base.to(device), *(entry.tensor.to(device) for entry in group.non_base)],
        ids=["base", "a", "b"],
        base_index=0,
        name=LINEAR,
    )
    return electors, trimmed, on_device


def _combine(device: str, **overrides) -> torch.Tensor:
    method = merge_methods.get("sparsegpt_ties")
    electors, trimmed, group = _sign_election_inputs(device)
    parameters = {"weight": {"a": 1.0, "b": 0.5}, "normalize": True, "lambda": 1.0, **overrides}
    return method._combine_with_signs_of(electors, trimmed, group, parameters)


def test_sign_election_creates_every_tensor_on_the_inputs_device():
    """On meta inputs a tensor made without device= is a CPU tensor, and torch refuses the mix:
    the CPU stand-in for a --cuda merge with compensate: true."""
    merged = _combine("meta")
    assert merged.device.type == "meta"
    assert merged.shape == (5, COLUMNS)


def test_sign_election_with_int8_mask_is_the_same_merge():
    assert torch.equal(_combine("cpu", int8_mask=True), _combine("cpu", int8_mask=False))


@pytest.mark.parametrize("int8_mask", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_sign_election_by_its_own_vectors_is_mergekits(int8_mask, normalize):
    """With the trimmed vectors as their own electors, the copy of mergekit's sign election is
    mergekit's TIES combination (no sparsification) of those vectors."""
    from mergekit.merge_methods.generalized_task_arithmetic import (
        ConsensusMethod,
        GeneralizedTaskArithmeticMerge,
    )

    _, trimmed, group = _sign_election_inputs("cpu")
    parameters = {
        "weight": {"a": 1.0, "b": 0.5},
        "normalize": normalize,
        "lambda": 0.7,
        "int8_mask": int8_mask,
    }
    ours = merge_methods.get("sparsegpt_ties")._combine_with_signs_of(
        trimmed, trimmed, group, parameters
    )
    stock = GeneralizedTaskArithmeticMerge(
        consensus_method=ConsensusMethod.sum,
        sparsification_method=None,
        default_normalize=True,
        default_rescale=False,
        method_name="ties_without_trim",
        method_pretty_name=None,
        method_reference_url=None,
    )
    expected = stock.merge_group(group, **parameters, rescale=False, density={"a": 1, "b": 1})
    torch.testing.assert_close(group.base.tensor + ours, expected, rtol=1e-6, atol=1e-7)
