import pytest
import torch

from mergekit_sparsegpt.statistics.hessian import hessian_statistics
from mergekit_sparsegpt.trim.compensation import compensated_trim
from mergekit_sparsegpt.trim.importance import importance_scores, top_density_mask


def _problem(rows=5, columns=9, seed=0):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(200, columns, generator=generator, dtype=torch.float64)
    inputs[:, 1:] += 0.8 * inputs[:, :-1]  # correlated inputs, so compensation has work to do
    hessian = 2 / 200 * inputs.T @ inputs
    tau = torch.randn(rows, columns, generator=generator, dtype=torch.float64)
    mask = torch.rand(rows, columns, generator=generator) < 0.4
    return hessian, tau, mask


def _damped(hessian, dampening):
    return hessian + dampening * torch.diagonal(hessian).mean() * torch.eye(len(hessian))


def _dense_sequential_obs(tau, hessian, mask):
    """Textbook OBS, one row at a time: visit columns in order; dropping column i moves its
    weight onto the columns after i through the inverse of the Hessian restricted to them."""
    result = tau.clone()
    columns = tau.shape[1]
    for r in range(tau.shape[0]):
        w = tau[r].clone()
        for i in range(columns):
            if not mask[r, i]:
                free = list(range(i, columns))
                inverse = torch.linalg.inv(hessian[free][:, free])
                w[free] -= w[i] / inverse[0, 0] * inverse[0]
                w[i] = 0.0
        result[r] = w
    return result


@pytest.mark.parametrize("block_size", [128, 4, 1])
def test_equals_dense_sequential_obs(block_size):
    hessian, tau, mask = _problem()
    stats = hessian_statistics(hessian.float(), dampening=0.01, keep_factor=True)
    ours = compensated_trim(tau.float(), stats.cholesky_factor, mask, block_size=block_size)
    reference = _dense_sequential_obs(tau, _damped(hessian, 0.01), mask)
    torch.testing.assert_close(ours.double(), reference, rtol=1e-4, atol=1e-5)
    assert torch.equal(ours == 0, ~mask | (reference == 0))


def _output_error(delta, hessian):
    return torch.trace(delta @ hessian @ delta.T).item()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("importance", ["sparsegpt", "wanda"])
def test_compensation_lowers_output_error_of_an_importance_mask(seed, importance):
    hessian, tau, _ = _problem(rows=8, columns=16, seed=seed)
    stats = hessian_statistics(hessian.float(), keep_factor=True)
    mask = top_density_mask(importance_scores(tau.float(), stats, importance), 0.3)
    compensated = compensated_trim(tau.float(), stats.cholesky_factor, mask).double()
    assert _output_error(tau - compensated, hessian) < _output_error(tau * ~mask, hessian)


def test_keep_everything_changes_nothing_and_dtype_is_kept():
    hessian, tau, _ = _problem()
    stats = hessian_statistics(hessian.float(), keep_factor=True)
    full = torch.ones_like(tau, dtype=torch.bool)
    result = compensated_trim(tau.to(torch.bfloat16), stats.cholesky_factor, full)
    assert result.dtype == torch.bfloat16
    assert torch.equal(result, tau.to(torch.bfloat16))
