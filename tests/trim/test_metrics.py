import pytest
import torch

from mergekit_sparsegpt.statistics.hessian import hessian_statistics
from mergekit_sparsegpt.trim.metrics import output_error, trim_entry


def _problem(seed=0):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(100, 6, generator=generator, dtype=torch.float64)
    inputs[:, 1:] += 0.5 * inputs[:, :-1]
    return 2 / 100 * inputs.T @ inputs, torch.randn(4, 6, generator=generator, dtype=torch.float64)


def test_full_error_equals_trace_formula_of_damped_hessian():
    hessian, delta = _problem()
    stats = hessian_statistics(hessian.float(), dampening=0.01, keep_factor=True)
    damped = hessian + 0.01 * torch.diagonal(hessian).mean() * torch.eye(6, dtype=torch.float64)
    expected = torch.trace(delta @ damped @ delta.T).item()
    assert output_error(delta.float(), stats) == pytest.approx(expected, rel=1e-4)


def test_diagonal_error_ignores_cross_terms():
    hessian, delta = _problem(1)
    stats = hessian_statistics(hessian.float())
    expected = sum(
        delta[r, c].item() ** 2 * hessian[c, c].item() for r in range(4) for c in range(6)
    )
    assert output_error(delta.float(), stats) == pytest.approx(expected, rel=1e-5)


def test_trim_entry_fields():
    hessian, tau = _problem(2)
    tau = tau.float()
    stats = hessian_statistics(hessian.float())
    mask = torch.zeros_like(tau, dtype=torch.bool)
    mask[:, :3] = True
    entry = trim_entry(tau, tau * mask, mask, stats, density=0.5)
    assert entry["kept_fraction"] == 0.5
    assert entry["mass_kept"] == pytest.approx((tau[:, :3] ** 2).sum() / (tau**2).sum())
    diag = stats.hessian_diagonal
    ours = ((tau * ~mask) ** 2 * diag).sum() / (tau**2 * diag).sum()
    assert entry["relative_output_error"] == pytest.approx(ours.item(), rel=1e-5)
    k = 12
    keep = torch.argsort(tau.abs().flatten(), descending=True)[:k]
    magnitude = torch.zeros(tau.numel())
    magnitude[keep] = tau.flatten()[keep]
    residual = tau - magnitude.reshape(tau.shape)
    expected = (residual**2 * diag).sum() / (tau**2 * diag).sum()
    assert entry["magnitude_relative_output_error"] == pytest.approx(expected.item(), rel=1e-5)
    assert entry["error_estimate"] == "diagonal"
    magnitude_kept = set(keep.tolist())
    ours_kept = {r * 6 + c for r in range(4) for c in range(3)}
    assert entry["magnitude_overlap"] == pytest.approx(len(ours_kept & magnitude_kept) / 12)
    assert entry["norm_ratio"] == pytest.approx(((tau * mask) ** 2).sum().sqrt() / tau.norm())
    mean = sum(diag.tolist()) / 6
    deviation = (sum((d - mean) ** 2 for d in diag.tolist()) / 6) ** 0.5
    assert entry["input_energy_cv"] == pytest.approx(deviation / mean, rel=1e-5)


def test_norm_ratio_shows_a_refit_that_grows_the_vector():
    hessian, tau = _problem(3)
    tau = tau.float()
    stats = hessian_statistics(hessian.float())
    mask = torch.ones_like(tau, dtype=torch.bool)
    assert trim_entry(tau, 3 * tau, mask, stats, density=1.0)["norm_ratio"] == pytest.approx(3)


def test_rescaled_trim_is_compared_with_a_rescaled_magnitude_trim():
    hessian, tau = _problem(4)
    tau = tau.float()
    stats = hessian_statistics(hessian.float())
    mask = torch.zeros_like(tau, dtype=torch.bool)
    mask[:, ::2] = True
    ours = tau * mask * (tau.abs().sum() / (tau * mask).abs().sum())  # DARE's L1 rescale
    entry = trim_entry(tau, ours, mask, stats, density=0.5, rescaled=True)
    assert entry["rescaled"] is True
    diag = stats.hessian_diagonal
    total = (tau**2 * diag).sum()
    assert entry["relative_output_error"] == pytest.approx(
        (((tau - ours) ** 2 * diag).sum() / total).item(), rel=1e-5
    )
    keep = torch.argsort(tau.abs().flatten(), descending=True)[:12]
    magnitude = torch.zeros(tau.numel())
    magnitude[keep] = tau.flatten()[keep]
    magnitude = magnitude.reshape(tau.shape) * (tau.abs().sum() / magnitude.abs().sum())
    expected = ((tau - magnitude) ** 2 * diag).sum() / total
    assert entry["magnitude_relative_output_error"] == pytest.approx(expected.item(), rel=1e-5)
    unrescaled = trim_entry(tau, ours, mask, stats, density=0.5)
    assert unrescaled["rescaled"] is False
    assert unrescaled["magnitude_relative_output_error"] != pytest.approx(expected.item())
