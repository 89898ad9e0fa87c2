from dataclasses import replace

import pytest
import torch
from statistics_helpers import sample_layers

from mergekit_sparsegpt.statistics.hessian import hessian_statistics
from mergekit_sparsegpt.statistics.task_statistics import TaskStatistics


def _statistics(keep_factors: bool, keep_hessians: bool) -> TaskStatistics:
    statistics = TaskStatistics.empty("model.layers")
    for layer in sample_layers():
        statistics.add_layer(layer, 0.01, keep_factors, keep_hessians=keep_hessians)
    return statistics


@pytest.mark.parametrize(
    "keep_factors, keep_hessians, stored",
    [
        (False, False, set()),
        (True, False, {"cholesky_factor"}),
        (False, True, {"hessian"}),
        (True, True, {"hessian"}),  # the factor is recomputed from H when asked
    ],
)
def test_only_the_matrices_that_cannot_be_recomputed_are_written(
    keep_factors, keep_hessians, stored
):
    tensors, metadata = _statistics(keep_factors, keep_hessians).to_tensors()
    vectors = {"hessian_diagonal", "inverse_diagonal", "cholesky_diagonal"}
    assert {key.rpartition("::")[2] for key in tensors} == vectors | stored
    loaded = TaskStatistics.from_tensors(tensors, metadata)
    for layer in sample_layers():
        for group, hessian in layer.hessians.items():
            expected = hessian_statistics(hessian, 0.01, keep_factor=True).cholesky_factor
            factor = loaded.for_weight(group).upper_factor()
            assert (factor is None) == (stored == set())
            assert factor is None or torch.equal(factor, expected), group


def test_statistics_with_both_matrices_in_memory_still_round_trip():
    """The form of cache entries written before: both the factor and H."""
    statistics = _statistics(True, False)
    for layer in sample_layers():
        for group, hessian in layer.hessians.items():
            statistics.statistics[group] = replace(statistics.statistics[group], hessian=hessian)
    tensors, metadata = statistics.to_tensors()
    assert sum(key.endswith("::cholesky_factor") for key in tensors) == 4
    assert sum(key.endswith("::hessian") for key in tensors) == 4
    loaded = TaskStatistics.from_tensors(tensors, metadata)
    for group, stats in statistics.statistics.items():
        ours = loaded.for_weight(group)
        assert torch.equal(ours.hessian, stats.hessian)
        assert ours.upper_factor() is ours.cholesky_factor
        assert torch.equal(ours.cholesky_factor, stats.cholesky_factor)
