import pytest
import torch
from mergekit.sparsify import magnitude

from mergekit_sparsegpt.statistics.hessian import HessianStatistics, hessian_statistics
from mergekit_sparsegpt.trim.importance import COLUMN_WEIGHTS, importance_scores, top_density_mask


def _statistics(columns: int, seed: int = 0) -> HessianStatistics:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(50, columns, generator=generator) * torch.linspace(0.1, 3, columns)
    return hessian_statistics(2 / 50 * inputs.T @ inputs)


def _reference_score(name: str, tau: float, stats: HessianStatistics, column: int) -> float:
    h = stats.hessian_diagonal[column].item()
    inverse = stats.inverse_diagonal[column].item()
    u = stats.cholesky_diagonal[column].item()
    return {
        "obs": tau**2 / inverse,
        "sparsegpt": tau**2 / u**2,
        "wanda": tau**2 * h,
        "design_note": tau**2 / inverse**2,
    }[name]


@pytest.mark.parametrize("name", sorted(COLUMN_WEIGHTS))
def test_scores_equal_per_entry_reference(name):
    stats = _statistics(5)
    tau = torch.randn(4, 5, generator=torch.Generator().manual_seed(3))
    scores = importance_scores(tau, stats, name)
    for r in range(4):
        for c in range(5):
            expected = _reference_score(name, tau[r, c].item(), stats, c)
            assert scores[r, c].item() == pytest.approx(expected, rel=1e-5)


def test_broadcast_equals_repeat_over_flattened_rows():
    # The design note's "bug fix": repeat over a row-major flattened W[out, in] is the same thing.
    stats = _statistics(6)
    tau = torch.randn(3, 6)
    column_weight = 1 / stats.inverse_diagonal
    repeated = (tau.flatten() ** 2 * column_weight.repeat(3)).reshape(3, 6)
    torch.testing.assert_close(importance_scores(tau, stats, "obs"), repeated)


def test_shape_mismatch_and_unknown_score_are_errors():
    stats = _statistics(5)
    with pytest.raises(ValueError, match="does not match a Hessian over 5"):
        importance_scores(torch.randn(4, 6), stats, "obs")
    with pytest.raises(ValueError, match="Unknown importance 'magnitude'"):
        importance_scores(torch.randn(4, 5), stats, "magnitude")


def _reference_mask(scores: torch.Tensor, density: float) -> torch.Tensor:
    flat = scores.flatten().tolist()
    if density >= 1:
        return torch.ones_like(scores, dtype=torch.bool)
    if density <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    k = max(1, int(density * len(flat)))
    order = sorted(range(len(flat)), key=lambda i: (-flat[i], i))
    mask = [False] * len(flat)
    for i in order[:k]:
        mask[i] = True
    return torch.tensor(mask).reshape(scores.shape)


@pytest.mark.parametrize("density", [0.0, 0.05, 0.3, 0.5, 0.99, 1.0])
def test_mask_keeps_top_density_fraction(density):
    scores = torch.rand(7, 9, generator=torch.Generator().manual_seed(5))
    mask = top_density_mask(scores, density)
    assert torch.equal(mask, _reference_mask(scores, density))


@pytest.mark.parametrize("density", [0.1, 0.25, 0.5, 0.75])
def test_uniform_hessian_mask_equals_mergekit_magnitude_with_ties(density):
    # Integer task vectors have many equal magnitudes: ties at the threshold must be broken
    # exactly as mergekit's magnitude trim breaks them.
    tau = torch.randint(-3, 4, (8, 10), generator=torch.Generator().manual_seed(7)).float()
    uniform = hessian_statistics(torch.eye(10))
    for name in COLUMN_WEIGHTS:
        mask = top_density_mask(importance_scores(tau, uniform, name), density)
        stock_kept = magnitude(tau, density) != 0
        ours_kept = mask & (tau != 0)
        assert torch.equal(ours_kept, stock_kept), name
        assert int(mask.sum()) == max(1, int(density * tau.numel()))


def test_tiny_tensors_and_edge_densities():
    one = torch.tensor([[2.0]])
    assert top_density_mask(one, 0.1).tolist() == [[True]]  # positive density keeps one entry
    assert top_density_mask(one, 0.0).tolist() == [[False]]
    assert top_density_mask(torch.empty(0, 3), 0.5).numel() == 0
    assert top_density_mask(torch.rand(2, 2), 1.0).all()


@pytest.mark.parametrize("density", [0.0, 0.2, 0.5, 1.0])
def test_row_selection_keeps_top_fraction_of_every_row(density):
    scores = torch.rand(6, 11, generator=torch.Generator().manual_seed(9))
    mask = top_density_mask(scores, density, selection="row")
    for r in range(6):
        expected = _reference_mask(scores[r : r + 1], density)
        assert torch.equal(mask[r : r + 1], expected)


def test_unknown_selection_is_an_error():
    with pytest.raises(ValueError, match="Unknown selection 'block'"):
        top_density_mask(torch.rand(2, 2), 0.5, selection="block")


@pytest.mark.parametrize("importance", ["obs", "sparsegpt", "design_note"])
def test_scores_that_read_the_inverse_refuse_diagonal_only_statistics(importance):
    """A linear's diag H alone gives diag(H)^-1, not diag(H^-1): never used for those scores."""
    estimated = hessian_statistics(torch.tensor([2.0, 1.0, 3.0]), estimated=True)
    tau = torch.ones(2, 3)
    with pytest.raises(ValueError, match="hold only diag H"):
        importance_scores(tau, estimated, importance)
    wanda = importance_scores(tau, estimated, "wanda")
    torch.testing.assert_close(wanda, torch.tensor([[2.0, 1.0, 3.0]] * 2))
    exact = hessian_statistics(torch.tensor([2.0, 1.0, 3.0]))  # a norm's: exactly diagonal
    assert importance_scores(tau, exact, importance).shape == (2, 3)
