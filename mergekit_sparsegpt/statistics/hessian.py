"""Layer-input Hessians and the per-column statistics the importance scores read.

For a linear layer y = W x the layer-wise reconstruction loss ||(W - W') X||^2 has Hessian
H = 2 X X^T with respect to each row of W (SparseGPT, Frantar & Alistarh 2023, eq. 1).
``HessianAccumulator`` is SparseGPT's ``add_batch``; ``hessian_statistics`` is the preamble of
SparseGPT's ``fasterprune`` (dead columns, damping, Cholesky of H^-1), keeping only the diagonals
that the scores need so that a task's statistics stay O(columns) per layer on disk, unless a
method asks for a whole matrix (compensation: the Cholesky factor; RegMean: H itself). When both
are asked, only H is kept: the factor is recomputed from it, bit for bit, by ``upper_factor``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

# Relative damping steps tried after the configured one when Cholesky fails; SparseGPT uses a
# single fixed 1% and simply crashes on failure.
DAMPING_LADDER = (0.01, 0.1, 1.0)
# The ``inverse_path`` of the statistics of a diagonal H (a norm's): these vectors are all its
# statistics, with no matrix to keep or export.
DIAGONAL = "diagonal"
# ... and of a linear whose whole H was not accumulated, only its diagonal: the inverse's
# diagonals are those of diag(H)^-1, which no score that reads H^-1 may use.
DIAGONAL_ONLY = "diagonal only"
# The whole-matrix fields of ``HessianStatistics``, kept only on request: O(columns^2) each.
OPTIONAL_MATRICES = ("cholesky_factor", "hessian")


class HessianError(ValueError):
    """A Hessian that cannot be turned into statistics (non-finite, wrong shape)."""


@dataclass(frozen=True)
class HessianStatistics:
    """Per-input-column statistics of one Hessian (one entry per column of W[out, in]).

    ``hessian_diagonal`` is undamped (with dead columns set to 1); the other two come from the
    damped Hessian. ``damping`` is the relative damping that succeeded and ``inverse_path`` says
    whether Cholesky worked or the pseudo-inverse fallback was needed (``DIAGONAL``: H is
    diagonal, inverted exactly). ``cholesky_factor`` is the whole upper factor U of H^-1, kept
    only when error compensation needs it, Cholesky worked and H is not kept; read it through
    ``upper_factor``.
    ``hessian`` is the whole H as accumulated (undamped, dead columns left at 0, float32), kept
    only when RegMean needs it.
    """

    hessian_diagonal: torch.Tensor
    inverse_diagonal: torch.Tensor
    cholesky_diagonal: torch.Tensor
    damping: float
    inverse_path: str
    cholesky_factor: torch.Tensor | None = None
    hessian: torch.Tensor | None = None
    # (2/n) [sum x, tokens]: with H, the Gram of the input [x; 1] of a linear with a bias.
    input_sum: torch.Tensor | None = None

    def cpu(self) -> HessianStatistics:
        return HessianStatistics(
            **{
                name: value.cpu() if isinstance(value, torch.Tensor) else value
                for name, value in vars(self).items()
            }
        )

    def upper_factor(self) -> torch.Tensor | None:
        """U with H^-1 = U^T U: the stored factor, else recomputed from the stored H exactly as
        ``hessian_statistics`` computed it (bit for bit on the same device); None when neither
        is kept or the pseudo-inverse was needed."""
        if self.cholesky_factor is not None:
            return self.cholesky_factor
        if self.hessian is None or self.inverse_path != "cholesky":
            return None
        private = self.hessian.to(torch.float32).clone()
        found = _inverse_factors(private, [self.damping * _revive_dead_columns(private)])
        if found is None or found[2] is None:
            raise HessianError(
                f"the Cholesky factor of H^-1 at the stored damping {self.damping} cannot be "
                "recomputed from the stored Hessian (the entry is corrupt); delete it and rerun"
            )
        return found[2]

    @property
    def is_diagonal(self) -> bool:
        """Whether only vectors exist (a diagonal H, or a linear's diag H alone)."""
        return self.inverse_path in (DIAGONAL, DIAGONAL_ONLY)

    @property
    def is_estimate(self) -> bool:
        """Whether H^-1's diagonals are those of diag(H)^-1, not of the whole H^-1."""
        return self.inverse_path == DIAGONAL_ONLY

    def tensors(self) -> dict[str, torch.Tensor]:
        vectors = {
            "hessian_diagonal": self.hessian_diagonal,
            "inverse_diagonal": self.inverse_diagonal,
            "cholesky_diagonal": self.cholesky_diagonal,
        }
        for name in (*OPTIONAL_MATRICES, "input_sum"):
            if getattr(self, name) is not None:
                vectors[name] = getattr(self, name)
        return vectors


def hessian_statistics(
    hessian: torch.Tensor,
    dampening: float = 0.01,
    keep_factor: bool = False,
    keep_hessian: bool = False,
    estimated: bool = False,
) -> HessianStatistics:
    """Dead columns -> 1, relative damping, Cholesky of H^-1; escalate damping, then pinv.

    A 1-D ``hessian`` is the diagonal of H: exact statistics of a diagonal H (a norm's scale:
    each weight reads one channel), or, ``estimated``, a linear's diag H alone; either way they
    hold no matrix, whatever is asked to be kept."""
    if hessian.dim() == 1:
        if not torch.isfinite(hessian).all():
            raise HessianError("Hessian has non-finite entries (inf/NaN activations)")
        statistics = diagonal_statistics(hessian, dampening)
        return replace(statistics, inverse_path=DIAGONAL_ONLY) if estimated else statistics
    if hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1]:
        raise HessianError(f"Hessian must be square, got shape {tuple(hessian.shape)}")
    if not torch.isfinite(hessian).all():
        raise HessianError("Hessian has non-finite entries (inf/NaN activations)")
    # With H kept, the factor is not: ``upper_factor`` recomputes it from H when asked.
    statistics = _inverse_statistics(
        hessian.to(torch.float32).clone(), dampening, keep_factor and not keep_hessian
    )
    if not keep_hessian:
        return statistics
    # RegMean solves with the true Gram matrix: no damping, and a dead column stays dead so it
    # gets no say in the merge (the diag-1 trick above is only for inverting). The caller's
    # matrix itself, not a copy: a capture is done with its Grams, and RegMean's pre-pass holds
    # every task's Grams of a block, which a copy would double.
    return replace(statistics, hessian=hessian.to(torch.float32))


def diagonal_statistics(diagonal: torch.Tensor, dampening: float = 0.0) -> HessianStatistics:
    """The statistics of H = diag(``diagonal``), as ``hessian_statistics`` computes them for a
    whole matrix (dead columns -> 1, relative damping), in closed form: H^-1 and the Cholesky
    factor of H^-1 are diagonal too."""
    hessian_diagonal = diagonal.to(torch.float32).clone()
    hessian_diagonal.masked_fill_(hessian_diagonal == 0, 1)
    damped = hessian_diagonal + dampening * hessian_diagonal.mean()
    return HessianStatistics(
        hessian_diagonal=hessian_diagonal,
        inverse_diagonal=damped.reciprocal(),
        cholesky_diagonal=damped.rsqrt(),
        damping=dampening,
        inverse_path=DIAGONAL,
    )


def _inverse_statistics(
    hessian: torch.Tensor, dampening: float, keep_factor: bool
) -> HessianStatistics:
    """``hessian`` is the caller's private copy: its diagonal is changed in place."""
    mean_diagonal = _revive_dead_columns(hessian)
    hessian_diagonal = torch.diagonal(hessian).clone()
    dampings = _damping_steps(dampening)
    ridges = [damping * mean_diagonal for damping in dampings]
    start = 0
    while (found := _inverse_factors(hessian, ridges[start:])) is not None:
        step, inverse_diagonal, upper = found
        start += step + 1
        if upper is not None:
            return HessianStatistics(
                hessian_diagonal,
                inverse_diagonal,
                torch.diagonal(upper).clone(),
                dampings[start - 1],
                "cholesky",
                upper if keep_factor else None,
            )
    return _pseudo_inverse_statistics(hessian, hessian_diagonal, mean_diagonal, dampening)


def _revive_dead_columns(hessian: torch.Tensor) -> float:
    """Set the zero diagonal entries of the private ``hessian`` to 1; its mean diagonal.

    A column whose input is always zero carries no curvature; SparseGPT sets it to 1 so the
    matrix stays invertible and the column is ranked by |tau| alone.
    """
    diagonal = torch.diagonal(hessian)
    diagonal.masked_fill_(diagonal == 0, 1)
    return diagonal.mean().item()


def _inverse_factors(
    hessian: torch.Tensor, ridges: Sequence[float]
) -> tuple[int, torch.Tensor, torch.Tensor | None] | None:
    """The first ``ridges`` index at which the ridged ``hessian`` has a Cholesky factor, with
    diag H^-1 and the upper factor U of H^-1 (None if H^-1 has none); None if no ridge works.

    The one computation of U, for ``hessian_statistics`` and ``upper_factor`` alike. The ridge
    goes on the private ``hessian``'s diagonal and comes off again, and each matrix is released
    once the next one exists, so at most three d x d matrices are alive: at d = 11008 (a 7B
    Llama's down_proj) each is 0.5 GB, and a damped copy plus all intermediates would hold 2.4 GB.
    """
    found = first_cholesky(hessian, ridges, in_place=True)
    if found is None:
        return None
    step, lower = found
    inverse = torch.cholesky_inverse(lower)
    del lower
    upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
    inverse_diagonal = torch.diagonal(inverse).clone()
    del inverse
    return step, inverse_diagonal, upper if info.item() == 0 else None


def first_cholesky(
    matrix: torch.Tensor, ridges: Sequence[float], *, in_place: bool = False
) -> tuple[int, torch.Tensor] | None:
    """The first ``ridges`` index at which the symmetric ``matrix`` plus that ridge on its
    diagonal has a Cholesky factor, with the lower factor; None if none has.

    ``in_place`` puts each ridge on ``matrix``'s own diagonal and takes it off again, so no
    d x d copy is made (the caller's matrix must be its private one); otherwise each ridged
    matrix is a copy. A zero ridge is not added at all.
    """
    diagonal = torch.diagonal(matrix)
    original = diagonal.clone() if in_place else None
    for index, ridge in enumerate(ridges):
        damped = matrix
        if ridge and original is not None:
            diagonal.add_(ridge)
        elif ridge:
            damped = matrix.clone()
            damped.diagonal().add_(ridge)
        lower, info = torch.linalg.cholesky_ex(damped)
        del damped
        if ridge and original is not None:
            diagonal.copy_(original)
        if info.item() == 0:
            return index, lower
    return None


def _damping_steps(dampening: float) -> list[float]:
    return [dampening] + [step for step in DAMPING_LADDER if step > dampening]


def _pseudo_inverse_statistics(
    hessian: torch.Tensor, hessian_diagonal: torch.Tensor, mean_diagonal: float, dampening: float
) -> HessianStatistics:
    damped = hessian + dampening * mean_diagonal * torch.eye(len(hessian), device=hessian.device)
    inverse = torch.linalg.pinv(damped.double(), hermitian=True)
    inverse_diagonal = torch.diagonal(inverse).clamp_min(torch.finfo(torch.float32).tiny).float()
    # Without a Cholesky factor, sqrt(diag H^-1) (the first step of sequential OBS) stands in for
    # the factor's diagonal.
    return HessianStatistics(
        hessian_diagonal, inverse_diagonal, inverse_diagonal.sqrt(), dampening, "pinv"
    )
