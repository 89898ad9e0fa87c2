"""Calibration split across processes: ``torchrun ... mergekit-sparsegpt calibrate CONFIG``.

Every rank runs its contiguous share of each task's calibration windows through the model,
block by block. H = (2/n) sum X X^T is a mean over sequences, so per block and Hessian group the
ranks all-reduce ``n_r * H_r`` and their counts ``n_r`` and divide: the same H as one process
computing over every window (up to float rounding). Only the main rank touches the cache.

Each step that can fail on one rank (reading weights, a forward pass, a Cholesky, writing the
cache) ends with the ranks comparing outcomes, so a failure on one rank is the same error on all
of them instead of the others waiting in a collective until it times out.

With one process (no ``torchrun``) every function here is the identity: ``SINGLE_PROCESS``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from mergekit_sparsegpt.capture.accumulate import LayerHessians

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place among the calibration processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # index among the processes of this machine: picks its GPU

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self, requested: str | None) -> str:
        """The device this rank calibrates on: each rank of a machine takes its own GPU."""
        if requested is None:
            return "cpu"
        if self.world_size > 1 and requested == "cuda":
            return f"cuda:{self.local_rank}"
        return requested


SINGLE_PROCESS = Ranks()


def launched_ranks() -> Ranks:
    """The ranks torchrun (or any launcher setting its environment variables) started."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return SINGLE_PROCESS
    return Ranks(
        rank=int(os.environ["RANK"]),
        world_size=world_size,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


@contextmanager
def process_group(ranks: Ranks, device: str) -> Iterator[None]:
    """Join the launcher's process group for the block (NCCL on GPUs, gloo on CPU)."""
    if ranks.world_size == 1 or dist.is_initialized():
        yield
        return
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend)
    try:
        yield
    finally:
        dist.destroy_process_group()


def shard_windows(windows: torch.Tensor, ranks: Ranks, task: str) -> torch.Tensor:
    """This rank's contiguous share of the windows (shares differ in size by at most one)."""
    if ranks.world_size == 1:
        return windows
    if len(windows) < ranks.world_size:
        raise ValueError(
            f"Calibration of {task} has {len(windows)} windows for {ranks.world_size} "
            "processes: every process needs at least one. Raise calibration_samples or start "
            "fewer processes."
        )
    return windows.tensor_split(ranks.world_size)[ranks.rank]


def _gathered(value: Any, ranks: Ranks) -> list[Any]:
    values: list[Any] = [None] * ranks.world_size
    dist.all_gather_object(values, value)
    return values


def decided_by_main(value: T, ranks: Ranks) -> T:
    """The main rank's ``value`` on every rank."""
    if ranks.world_size == 1:
        return value
    holder = [value if ranks.main else None]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


@contextmanager
def together(ranks: Ranks) -> Iterator[None]:
    """Run the block on every rank; if it raises on any rank, raise on all of them.

    The rank that failed re-raises its own exception; the others raise one naming that rank,
    a ``ValueError`` if the original was one (a user error), else a ``RuntimeError``.
    """
    failure: Exception | None = None
    try:
        yield
    except Exception as error:
        if ranks.world_size == 1:
            raise
        failure = error
    if ranks.world_size == 1:
        return
    outcomes = _gathered(
        None if failure is None else (isinstance(failure, ValueError), str(failure)), ranks
    )
    if failure is not None:
        raise failure
    for rank, outcome in enumerate(outcomes):
        if outcome is not None:
            user_error, message = outcome
            raise (ValueError if user_error else RuntimeError)(
                f"Calibration process {rank} failed: {message}"
            )


def all_reduced(layer: LayerHessians, ranks: Ranks) -> LayerHessians:
    """One set of Hessians over the windows of every rank (the identity in one process)."""
    return layer if ranks.world_size == 1 else _all_reduced(layer, ranks)


def gathered_on_main(tensor: torch.Tensor, ranks: Ranks) -> torch.Tensor | None:
    """Every rank's ``tensor`` (this rank's share of one task's windows) concatenated in rank
    order on the main rank, so it is what one process holds; None on the other ranks. The
    tensors travel on the rank's collective device and come back where ``tensor`` was."""
    if ranks.world_size == 1:
        return tensor
    lengths = _gathered(len(tensor), ranks)
    moved = tensor.to(_collective_device())
    padded = moved.new_zeros((max(lengths), *tensor.shape[1:]))
    padded[: len(tensor)] = moved
    pieces = [torch.empty_like(padded) for _ in lengths] if ranks.main else None
    dist.gather(padded, pieces, dst=0)
    if pieces is None:
        return None
    joined = torch.cat([piece[:n] for piece, n in zip(pieces, lengths, strict=True)])
    return joined.to(tensor.device)


def share_of_main(tensor: torch.Tensor | None, ranks: Ranks) -> torch.Tensor:
    """This rank's contiguous share (as ``shard_windows`` cuts) of the main rank's ``tensor``
    (every window of one task); the other ranks pass None and receive theirs, on the CPU."""
    if ranks.world_size == 1:
        assert tensor is not None
        return tensor
    shape, dtype = decided_by_main((tensor.shape, tensor.dtype) if ranks.main else None, ranks)
    whole = (
        tensor.to(_collective_device())
        if ranks.main and tensor is not None
        else torch.empty(shape, dtype=dtype, device=_collective_device())
    )
    dist.broadcast(whole, src=0)
    return whole.tensor_split(ranks.world_size)[ranks.rank].to("cpu").clone()


def _collective_device() -> torch.device:
    """Where tensors must be for the process group's collectives: NCCL's GPU, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduced_layers(layers: Iterable[LayerHessians], ranks: Ranks) -> Iterator[LayerHessians]:
    """Each block's Hessians over the windows of every rank."""
    if ranks.world_size == 1:
        yield from layers
        return
    iterator = iter(layers)
    while True:
        with together(ranks):
            layer = next(iterator, None)
        finished = _gathered(layer is None, ranks)
        if all(finished):
            return
        if any(finished):
            raise RuntimeError(
                f"Calibration processes disagree on the number of blocks: {finished}"
            )
        assert layer is not None
        yield all_reduced(layer, ranks)


def _all_reduced(layer: LayerHessians, ranks: Ranks) -> LayerHessians:
    """Sum ``n_r * H_r`` and ``n_r`` over the ranks, group by group.

    A linear that received no input on some rank (an expert no token was routed to) is a group
    of its own there; its group is taken from the ranks where it ran.
    """
    shapes_here = {g: tuple(h.shape) for g, h in layer.hessians.items()}
    views = _gathered((layer.groups, layer.samples, shapes_here, sorted(layer.sums)), ranks)
    groups: dict[str, str] = {}
    shapes: dict[str, tuple[int, ...]] = {}  # [d, d]; [d] for a norm's channel energies
    for weight in layer.groups:
        ran = {
            view_groups[weight]
            for view_groups, samples, *_ in views
            if samples[view_groups[weight]]
        }
        if len(ran) > 1:
            raise RuntimeError(f"Calibration processes grouped {weight} differently: {sorted(ran)}")
        groups[weight] = ran.pop() if ran else weight
        shapes.setdefault(groups[weight], max(view[2].get(groups[weight], ()) for view in views))
    device = next(iter(layer.hessians.values())).device
    counts = torch.zeros(len(shapes), dtype=torch.float64, device=device)
    hessians: dict[str, torch.Tensor] = {}
    for index, group in enumerate(sorted(shapes)):
        local = layer.samples.get(group, 0) if layer.groups.get(group) == group else 0
        if local:
            hessians[group] = layer.hessians[group].mul_(local)
        else:
            hessians[group] = torch.zeros(shapes[group], dtype=torch.float32, device=device)
        counts[index] = local
        dist.all_reduce(hessians[group])
    dist.all_reduce(counts)
    samples = {}
    for index, group in enumerate(sorted(shapes)):
        samples[group] = int(counts[index].item())
        if samples[group]:
            hessians[group].div_(samples[group])
    sums = {}
    for group in sorted({group for view in views for group in view[3]}):
        local = layer.samples.get(group, 0) if group in layer.sums else 0
        if local:
            sums[group] = layer.sums[group].mul_(local)
        else:
            sums[group] = torch.zeros(shapes[group][-1] + 1, dtype=torch.float32, device=device)
        dist.all_reduce(sums[group])
        if samples[group]:
            sums[group].div_(samples[group])
    return LayerHessians(hessians, groups, samples, layer.layouts, sums, layer.estimated)
