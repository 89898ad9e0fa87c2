from dataclasses import replace

import pytest
import torch

from mergekit_sparsegpt.capture.accumulate import DiagonalAccumulator, HessianAccumulator
from mergekit_sparsegpt.statistics import hessian as hessian_module
from mergekit_sparsegpt.statistics.hessian import HessianError, hessian_statistics


def test_accumulator_equals_two_over_n_x_transpose_x():
    torch.manual_seed(0)
    batches = [torch.randn(3, 5, 4), torch.randn(2, 5, 4), torch.randn(1, 5, 4)]
    accumulator = HessianAccumulator(4)
    for batch in batches:
        accumulator.add_batch(batch)
    rows = torch.cat([b.reshape(-1, 4) for b in batches]).double()
    sequences = sum(len(b) for b in batches)
    expected = 2 / sequences * rows.T @ rows
    assert accumulator.samples == sequences
    torch.testing.assert_close(accumulator.hessian.double(), expected, rtol=1e-5, atol=1e-6)


def test_two_dimensional_input_counts_as_one_sample():
    inputs = torch.randn(7, 3)
    accumulator = HessianAccumulator(3)
    accumulator.add_batch(inputs)
    assert accumulator.samples == 1
    expected = 2 * inputs.double().T @ inputs.double()
    torch.testing.assert_close(accumulator.hessian.double(), expected, rtol=1e-5, atol=1e-6)


def test_diagonal_accumulator_is_the_diagonal_of_the_whole_one():
    torch.manual_seed(0)
    batches = [torch.randn(3, 5, 4), torch.randn(2, 5, 4), torch.randn(7, 4)]
    whole, diagonal = HessianAccumulator(4), DiagonalAccumulator(4)
    for batch in batches:
        whole.add_batch(batch, sequences=2 if batch.dim() == 2 else None)
        diagonal.add_batch(batch, sequences=2 if batch.dim() == 2 else None)
    assert diagonal.samples == whole.samples == 7
    assert diagonal.hessian.shape == (4,)
    torch.testing.assert_close(diagonal.hessian, torch.diagonal(whole.hessian))


@pytest.mark.parametrize("dampening", [0.0, 0.01])
def test_diagonal_hessian_statistics_are_those_of_the_diagonal_matrix(dampening):
    diagonal = torch.tensor([2.0, 0.5, 0.0, 7.0])  # a dead channel
    stats = hessian_statistics(diagonal, dampening, keep_factor=True, keep_hessian=True)
    expected = _reference_statistics(torch.diag(diagonal), dampening)
    for actual, reference in zip(
        (stats.hessian_diagonal, stats.inverse_diagonal, stats.cholesky_diagonal),
        expected,
        strict=True,
    ):
        torch.testing.assert_close(actual.double(), reference, rtol=1e-5, atol=1e-7)
    assert stats.hessian is None and stats.cholesky_factor is None  # nothing whole to keep
    with pytest.raises(HessianError, match="non-finite"):
        hessian_statistics(torch.tensor([1.0, float("nan")]))


def _reference_statistics(hessian: torch.Tensor, dampening: float):
    h = hessian.double().clone()
    for c in range(len(h)):
        if h[c, c] == 0:
            h[c, c] = 1
    diagonal = torch.tensor([h[c, c].item() for c in range(len(h))], dtype=torch.float64)
    damped = h + dampening * diagonal.mean() * torch.eye(len(h), dtype=torch.float64)
    inverse = torch.linalg.inv(damped)
    upper = torch.linalg.cholesky(inverse).T  # upper factor: inverse = upper.T @ upper
    assert torch.allclose(upper.T @ upper, inverse)
    return diagonal, torch.diagonal(inverse), torch.diagonal(upper)


def test_statistics_match_float64_reference_with_dead_column():
    torch.manual_seed(1)
    inputs = torch.randn(64, 6)
    inputs[:, 2] = 0  # a dead input column
    hessian = 2 / 64 * inputs.T @ inputs
    stats = hessian_statistics(hessian, dampening=0.01)
    diagonal, inverse_diagonal, cholesky_diagonal = _reference_statistics(hessian, 0.01)
    assert stats.hessian_diagonal[2] == 1
    torch.testing.assert_close(stats.hessian_diagonal.double(), diagonal, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        stats.inverse_diagonal.double(), inverse_diagonal, rtol=1e-4, atol=1e-6
    )
    torch.testing.assert_close(
        stats.cholesky_diagonal.double(), cholesky_diagonal, rtol=1e-4, atol=1e-6
    )
    assert stats.inverse_path == "cholesky" and stats.damping == 0.01


def test_singular_hessian_escalates_damping():
    singular = torch.ones(3, 3)  # rank one, so Cholesky fails without damping
    stats = hessian_statistics(singular, dampening=0.0)
    assert stats.inverse_path == "cholesky"
    assert stats.damping == hessian_module.DAMPING_LADDER[0]
    _, inverse_diagonal, _ = _reference_statistics(singular, stats.damping)
    torch.testing.assert_close(
        stats.inverse_diagonal.double(), inverse_diagonal, rtol=1e-4, atol=1e-6
    )


def test_caller_hessian_is_left_unchanged_through_damping_escalation():
    """Damping is applied to a private copy's diagonal in place and taken off after each try."""
    singular = torch.ones(4, 4)
    singular[3, 3] = 0  # a dead column as well
    original = singular.clone()
    stats = hessian_statistics(singular, dampening=0.0, keep_factor=True)
    assert torch.equal(singular, original)
    reference = singular.double().clone()
    reference[3, 3] = 1
    reference += stats.damping * reference.diagonal().mean() * torch.eye(4, dtype=torch.float64)
    upper = torch.linalg.cholesky(torch.linalg.inv(reference), upper=True)
    torch.testing.assert_close(stats.cholesky_factor.double(), upper, rtol=1e-4, atol=1e-6)


def test_pseudo_inverse_fallback_when_cholesky_always_fails(monkeypatch):
    def failing_cholesky(matrix, upper=False):
        return matrix, torch.tensor(1)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", failing_cholesky)
    hessian = torch.tensor([[2.0, 0.5], [0.5, 1.0]])
    stats = hessian_statistics(hessian, dampening=0.01)
    assert stats.inverse_path == "pinv"
    damped = hessian.double() + 0.01 * 1.5 * torch.eye(2, dtype=torch.float64)
    expected = torch.diagonal(torch.linalg.pinv(damped))
    torch.testing.assert_close(stats.inverse_diagonal.double(), expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(
        stats.cholesky_diagonal.double(), expected.sqrt(), rtol=1e-5, atol=1e-7
    )


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_hessian_is_an_error(bad):
    hessian = torch.eye(3)
    hessian[1, 1] = bad
    with pytest.raises(HessianError, match="non-finite"):
        hessian_statistics(hessian)


def test_non_square_hessian_is_an_error():
    with pytest.raises(HessianError, match="square"):
        hessian_statistics(torch.ones(2, 3))


def test_whole_hessian_is_kept_only_on_request_undamped_and_with_dead_columns():
    inputs = torch.randn(30, 5, generator=torch.Generator().manual_seed(3))
    inputs[:, 2] = 0
    hessian = 2 / 30 * inputs.T @ inputs
    assert hessian_statistics(hessian).hessian is None
    stats = hessian_statistics(hessian, dampening=0.1, keep_hessian=True)
    assert torch.equal(stats.hessian, hessian)  # no damping, column 2 still all zero
    # The caller's matrix, not a copy: every capture's accumulators are its own and done with
    # once read, and a copy would double the Grams RegMean's pre-pass holds per block.
    assert stats.hessian is hessian
    plain = hessian_statistics(hessian, dampening=0.1)
    assert torch.equal(stats.hessian_diagonal, plain.hessian_diagonal)
    assert stats.hessian_diagonal[2] == 1  # the inverse statistics still use the diag-1 trick
    assert "hessian" in stats.tensors() and "hessian" not in plain.tensors()


def _gram(columns: int, samples: int, dead: int) -> torch.Tensor:
    """A Gram matrix with column ``dead`` dead; rank deficient (Cholesky fails undamped) when
    ``samples`` < ``columns``."""
    inputs = torch.randn(samples, columns, generator=torch.Generator().manual_seed(columns))
    inputs[:, dead] = 0
    return 2 / samples * inputs.T @ inputs


def _rank_one_with_dead_column() -> torch.Tensor:
    hessian = torch.ones(4, 4)
    hessian[3, 3] = 0
    return hessian


@pytest.mark.parametrize(
    "hessian, dampening, escalated",
    [
        (_gram(24, 60, dead=5), 0.01, False),
        (_gram(24, 6, dead=5), 0.0, True),
        (_rank_one_with_dead_column(), 0.0, True),
    ],
    ids=["dead column", "ladder escalated", "rank one with a dead column"],
)
def test_factor_recomputed_from_the_hessian_is_bit_identical_to_the_kept_one(
    hessian, dampening, escalated
):
    kept = hessian_statistics(hessian, dampening, keep_factor=True)
    assert kept.inverse_path == "cholesky" and (kept.damping > dampening) == escalated
    assert (hessian.diagonal() == 0).any()
    both = hessian_statistics(hessian, dampening, keep_factor=True, keep_hessian=True)
    assert both.cholesky_factor is None and torch.equal(both.hessian, hessian)  # H only
    assert both.damping == kept.damping
    assert torch.equal(both.upper_factor(), kept.cholesky_factor)
    assert kept.upper_factor() is kept.cholesky_factor
    assert torch.equal(both.hessian, hessian)  # recomputing works on a copy
    # And it is the factor: U^T U = (H with dead columns at 1 + ridge)^-1, in float64.
    revived = hessian.double().clone()
    revived.diagonal()[revived.diagonal() == 0] = 1
    damped = revived + both.damping * revived.diagonal().mean() * torch.eye(len(revived)).double()
    upper = both.upper_factor().double()
    assert torch.equal(upper, upper.triu())
    torch.testing.assert_close(
        upper.T @ upper @ damped, torch.eye(len(upper)).double(), atol=1e-3, rtol=0
    )


def test_factor_is_none_without_matrices_or_after_the_pseudo_inverse(monkeypatch):
    hessian = _gram(6, 30, dead=1)
    assert hessian_statistics(hessian).upper_factor() is None
    assert hessian_statistics(hessian, keep_factor=True).upper_factor() is not None
    assert hessian_statistics(hessian, keep_hessian=True).upper_factor() is not None

    def failing_cholesky(matrix, upper=False):
        return matrix, torch.tensor(1)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", failing_cholesky)
    pinv = hessian_statistics(hessian, keep_factor=True, keep_hessian=True)
    assert pinv.inverse_path == "pinv" and pinv.upper_factor() is None


def test_a_hessian_whose_factor_cannot_be_recomputed_is_a_clear_error():
    stats = hessian_statistics(torch.eye(3), keep_hessian=True)
    corrupt = replace(stats, hessian=-torch.eye(3), damping=0.0)
    with pytest.raises(HessianError, match="cannot be recomputed"):
        corrupt.upper_factor()


def test_factor_is_recomputed_at_the_damping_reached_when_h_inverse_had_no_factor(monkeypatch):
    """The ladder also climbs when Cholesky of H^-1 (not of H) fails: the first time, here."""
    real = torch.linalg.cholesky_ex
    failures = []

    def first_upper_fails(matrix, upper=False):
        factor, info = real(matrix, upper=upper)
        if upper and not failures:
            failures.append(True)
            return factor, torch.ones_like(info)
        return factor, info

    hessian = _gram(16, 40, dead=3)
    monkeypatch.setattr(torch.linalg, "cholesky_ex", first_upper_fails)
    kept = hessian_statistics(hessian, 0.01, keep_factor=True)
    monkeypatch.setattr(torch.linalg, "cholesky_ex", real)
    assert kept.inverse_path == "cholesky" and kept.damping == hessian_module.DAMPING_LADDER[1]
    both = hessian_statistics(hessian, 0.01, keep_hessian=True)
    recomputed = replace(both, damping=kept.damping)  # as its entry would have recorded
    assert torch.equal(recomputed.upper_factor(), kept.cholesky_factor)
