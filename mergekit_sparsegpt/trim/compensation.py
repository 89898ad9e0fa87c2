"""Error-compensated trimming: SparseGPT's weight updates applied to a task vector.

Dropping entries of tau changes the layer output by (tau - tau') X. SparseGPT (Frantar & Alistarh
2023, Algorithm 1) walks the input columns in order; when a column loses entries, their error is
pushed onto the columns not visited yet, by the Optimal Brain Surgeon update computed from the
upper Cholesky factor U of H^-1 (row i of U, scaled by 1/U_ii, is row i of the inverse Hessian
of the still-free columns). Updates are applied lazily per block of columns, as in SparseGPT.
Unlike SparseGPT the mask is fixed up front (by ``importance.py``), so the kept set is exactly the
one chosen by score and density.
"""

from __future__ import annotations

import torch

BLOCK_SIZE = 128


def compensated_trim(
    task_vector: torch.Tensor,
    cholesky_factor: torch.Tensor,
    mask: torch.Tensor,
    block_size: int = BLOCK_SIZE,
) -> torch.Tensor:
    """Zero ``task_vector`` outside ``mask`` and re-fit the kept entries to the dropped ones.

    ``cholesky_factor`` is U with H^-1 = U^T U (upper triangular, [in, in]); ``task_vector`` and
    ``mask`` are [out, in]. Returns a tensor of the input's dtype that is exactly zero where
    ``mask`` is False.
    """
    weights = task_vector.to(torch.float32).clone()
    factor = cholesky_factor.to(weights.device, torch.float32)
    keep = mask.to(weights.device, torch.bool)
    columns = weights.shape[1]
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        block = weights[:, start:end].clone()
        errors = torch.zeros_like(block)
        block_factor = factor[start:end, start:end]
        for i in range(end - start):
            kept = torch.where(keep[:, start + i], block[:, i], torch.zeros_like(block[:, i]))
            errors[:, i] = (block[:, i] - kept) / block_factor[i, i]
            block[:, i:] -= errors[:, i : i + 1] * block_factor[i : i + 1, i:]
            block[:, i] = kept  # exact zeros, not round-off, where the mask drops
        weights[:, start:end] = block
        weights[:, end:] -= errors @ factor[start:end, end:]
    return weights.to(task_vector.dtype)
