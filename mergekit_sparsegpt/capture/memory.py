"""The pre-pass's host memory: what the activations take, and glibc tuning that keeps the
resident memory flat across blocks."""

from __future__ import annotations

import ctypes
import sys

import torch


def activation_bytes(samples: int, seq_len: int, hidden_size: int, dtype: torch.dtype) -> int:
    """Bytes of one task's calibration activations, [samples, seq_len, hidden_size] in
    ``dtype``: what the block runner holds on the host per task between blocks."""
    return samples * seq_len * hidden_size * dtype.itemsize


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


_GLIBC = _glibc()
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number, from glibc's malloc.h
MMAP_THRESHOLD_BYTES = 1 << 20


def map_large_allocations() -> None:
    """Have glibc give every allocation of 1 MiB or more its own mapping, returned on free.

    By default glibc raises this threshold (up to 32 MiB) whenever a mapped block is freed, so
    the per-batch activations of a block then come from its heap, where freed pieces of
    different sizes fragment it: the peak inside a block rose with every block when the blocks'
    whole Hessians were held (measured in benchmarks/perf). The price: every fresh mapping is
    faulted in page by page, for each batch temporary of every block, so passes that hold no
    d x d matrix do without it. Setting the threshold also turns glibc's raising off, for the
    rest of the process. A no-op off glibc.
    """
    if _GLIBC is not None:
        _GLIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def release_freed_memory() -> None:
    """Hand memory freed by the finished block back to the system.

    glibc keeps freed blocks of up to 32 MB in its heap once larger ones have been freed, so a
    block's weights and Hessians, freed after the block, stayed resident: peak RSS grew with
    depth (measured in benchmarks/perf). A no-op off glibc.
    """
    if _GLIBC is not None:
        _GLIBC.malloc_trim(0)
