from dataclasses import replace

import pytest
import torch
from mergekit.sparsify import SparsificationMethod, sparsify

from mergekit_sparsegpt.capture.accumulate import TensorLayout
from mergekit_sparsegpt.statistics.hessian import hessian_statistics
from mergekit_sparsegpt.statistics.task_statistics import TensorStatistics
from mergekit_sparsegpt.trim.importance import importance_scores, top_density_mask
from mergekit_sparsegpt.trim.trim import (
    matrix_views,
    tensor_entry,
    trim_task_vector,
    trim_task_vectors,
)

ROWS, COLUMNS = 5, 6
NAME = "model.layers.0.mlp.down_proj.weight"


def _statistics(
    seed: int, keep_factor: bool = False, keep_hessian: bool = False
) -> TensorStatistics:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(40, COLUMNS, generator=generator) * torch.linspace(0.2, 4, COLUMNS)
    inputs[:, 2] = 0  # a dead column: the recomputed factor must revive it as the kept one did
    stats = hessian_statistics(
        2 / 40 * inputs.T @ inputs, keep_factor=keep_factor, keep_hessian=keep_hessian
    )
    return TensorStatistics(TensorLayout(), (stats,), (40,))


def _tensors() -> tuple[torch.Tensor, list[tuple[str, torch.Tensor]]]:
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(ROWS, COLUMNS, generator=generator)
    models = [(m, base + 0.1 * torch.randn(ROWS, COLUMNS, generator=generator)) for m in "ab"]
    return base, models


def _parameters(**overrides):
    parameters = {
        "density": {"a": 0.4, "b": 0.6},
        "importance": "wanda",
        "selection": "tensor",
        "compensate": False,
    }
    return parameters | overrides


def test_each_model_keeps_its_top_density_by_importance():
    base, models = _tensors()
    statistics = {"a": _statistics(1), "b": _statistics(2)}
    trimmed, masks, report = trim_task_vectors(base, models, statistics, _parameters(), NAME)
    for (model, tensor), vector, mask in zip(models, trimmed, masks, strict=True):
        tau = tensor - base
        stats = statistics[model].matrices[0]
        density = _parameters()["density"][model]
        expected = top_density_mask(importance_scores(tau, stats, "wanda"), density)
        assert torch.equal(mask, expected)
        assert torch.equal(vector, tau * expected)
    assert set(report) == {"a", "b"}
    assert report["a"]["kept_fraction"] == pytest.approx(int(0.4 * ROWS * COLUMNS) / 30)


def test_model_without_statistics_takes_the_stock_trim():
    base, models = _tensors()
    statistics = {"a": _statistics(1), "b": None}
    trimmed, masks, report = trim_task_vectors(
        base, models, statistics, _parameters(), NAME, SparsificationMethod.magnitude
    )
    expected = sparsify(models[1][1] - base, 0.6, SparsificationMethod.magnitude)
    assert torch.equal(trimmed[1], expected)
    assert masks[1] is None
    assert set(report) == {"a"}


def test_model_without_statistics_and_no_stock_trim_is_a_clear_error():
    base, models = _tensors()
    with pytest.raises(ValueError, match=f"{NAME} of model b has no Hessian statistics"):
        trim_task_vectors(base, models, {"a": _statistics(1), "b": None}, _parameters(), NAME)


def test_compensate_without_factor_names_where():
    tau = _tensors()[1][0][1] - _tensors()[0]
    stats = _statistics(1).matrices[0]
    with pytest.raises(ValueError, match="^here: compensate needs the Cholesky factor"):
        trim_task_vector(tau, stats, 0.5, _parameters(compensate=True), "here")


def test_compensated_trim_keeps_only_the_mask_and_rescales_to_l1():
    tau = _tensors()[1][0][1] - _tensors()[0]
    stats = _statistics(1, keep_factor=True).matrices[0]
    vector, mask = trim_task_vector(
        tau, stats, 0.5, _parameters(compensate=True, rescale=True), "here"
    )
    assert torch.all(vector[~mask] == 0)
    torch.testing.assert_close(vector.abs().sum(), tau.abs().sum())


def test_matrix_views_error_names_tensor_and_model():
    layout = TensorLayout(experts=2)
    with pytest.raises(ValueError, match="^t of model a: "):
        matrix_views(layout, torch.zeros(3, 4), "t of model a")


def test_tensor_entry_of_one_matrix_is_its_entry():
    entry = {"kept_fraction": 0.5, "error_estimate": "diagonal"}
    assert tensor_entry([entry], _statistics(1)) is entry


@pytest.mark.parametrize("rescale", [False, True])
def test_compensating_from_the_hessian_alone_is_the_trim_with_the_kept_factor(monkeypatch, rescale):
    base, models = _tensors()
    parameters = _parameters(compensate=True, rescale=rescale)
    kept = {m: _statistics(seed, keep_factor=True) for seed, m in enumerate("ab", 1)}
    hessian_only = {m: _statistics(seed, True, True) for seed, m in enumerate("ab", 1)}
    assert all(s.matrices[0].cholesky_factor is None for s in hessian_only.values())
    expected = trim_task_vectors(base, models, kept, parameters, NAME)
    factorisations = []
    original = torch.linalg.cholesky_ex

    def counting(*args, **kwargs):
        factorisations.append(kwargs.get("upper", False))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", counting)
    trimmed, masks, report = trim_task_vectors(base, models, hessian_only, parameters, NAME)
    # One factor per model, shared by the re-fit and the report's three error estimates.
    assert factorisations == [False, True] * len(models)
    for ours, theirs in zip(trimmed, expected[0], strict=True):
        assert torch.equal(ours, theirs)
    assert all(torch.equal(ours, theirs) for ours, theirs in zip(masks, expected[1], strict=True))
    assert report == expected[2]
    assert {entry["error_estimate"] for entry in report.values()} == {"full"}


def test_without_compensate_a_kept_hessian_gives_no_factor_and_the_diagonal_estimate(
    monkeypatch,
):
    base, models = _tensors()
    statistics = {m: _statistics(seed, True, True) for seed, m in enumerate("ab", 1)}

    def no_factorisation(*args, **kwargs):
        raise AssertionError("a Cholesky factor was computed without compensate")

    monkeypatch.setattr(torch.linalg, "cholesky_ex", no_factorisation)
    _, _, report = trim_task_vectors(base, models, statistics, _parameters(), NAME)
    assert {entry["error_estimate"] for entry in report.values()} == {"diagonal"}


def test_trim_task_vector_alone_recomputes_the_factor_from_the_hessian():
    tau = _tensors()[1][0][1] - _tensors()[0]
    parameters = _parameters(compensate=True)
    kept, hessian_only = _statistics(1, True).matrices[0], _statistics(1, True, True).matrices[0]
    expected = trim_task_vector(tau, kept, 0.5, parameters, "here")
    ours = trim_task_vector(tau, hessian_only, 0.5, parameters, "here")
    assert torch.equal(ours[0], expected[0]) and torch.equal(ours[1], expected[1])


def test_a_factor_that_cannot_be_recomputed_names_where():
    base, models = _tensors()
    broken = replace(_statistics(1, True, True).matrices[0], hessian=-torch.eye(COLUMNS))
    statistics = {"a": TensorStatistics(TensorLayout(), (broken,), (40,)), "b": _statistics(2)}
    with pytest.raises(ValueError, match=f"^{NAME} of model a: the Cholesky factor"):
        trim_task_vectors(base, models, statistics, _parameters(compensate=True), NAME)
