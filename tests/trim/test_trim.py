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


def _statistics(seed: int, keep_factor: bool = False) -> TensorStatistics:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(40, COLUMNS, generator=generator) * torch.linspace(0.2, 4, COLUMNS)
    stats = hessian_statistics(2 / 40 * inputs.T @ inputs, keep_factor=keep_factor)
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
