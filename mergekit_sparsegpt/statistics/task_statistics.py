"""One task's Hessian statistics: what the kernel looks up by tensor name, and its disk form.

The per-column vectors stay in memory. The whole matrices (``OPTIONAL_MATRICES``, d_in x d_in
each) may instead live in a ``MatrixStore`` (the cache file, ``cache.CachedMatrices``), read per
Hessian group when a kernel asks for that tensor's statistics: a task's matrices for a 7B model
are about 22 GB, too much to hold for every task at once.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from dataclasses import field as dataclass_field
from typing import Any, Protocol

import torch

from mergekit_sparsegpt.capture.accumulate import LayerHessians, TensorLayout
from mergekit_sparsegpt.statistics.hessian import (
    OPTIONAL_MATRICES,
    HessianError,
    HessianStatistics,
    hessian_statistics,
)

# Tensor names in the disk form: "<group>::<field>" ("model.layers.0.mlp.up_proj.weight::hessian").
KEY_SEPARATOR = "::"
# The disk name of the per-token counts of the task's calibration windows.
TOKEN_COUNTS = "token_counts"


class StoredMatricesError(ValueError):
    """Whole matrices that could not be read back from their store (deleted, truncated, corrupt)."""


class MatrixStore(Protocol):
    """Where a task's whole matrices are kept when memory does not hold them."""

    def shapes(self, group: str) -> dict[str, tuple[int, ...]]:
        """The stored matrices of ``group`` by field name and their shapes ({}: none)."""
        ...

    def read(self, group: str) -> dict[str, torch.Tensor]:
        """The stored matrices of ``group`` by field name; raises ``StoredMatricesError``."""
        ...


def tensor_key(group: str, field: str) -> str:
    return f"{group}{KEY_SEPARATOR}{field}"


def split_tensor_key(key: str) -> tuple[str, str]:
    group, _, field = key.rpartition(KEY_SEPARATOR)
    return group, field


@dataclass(frozen=True)
class TensorStatistics:
    """The statistics of one checkpoint tensor: one per matrix it holds (one per expert of a
    fused MoE tensor), with the tensor's layout and each matrix's sample count (0: never ran)."""

    layout: TensorLayout
    matrices: tuple[HessianStatistics, ...]
    samples: tuple[int, ...]


@dataclass(frozen=True)
class ModelRoles:
    """Which checkpoint tensors of the calibrated model play the token-indexed roles: the token
    embedding, the output head (its Hessian is kept under this name), and whether they are one
    tensor (``tied``)."""

    embedding: str | None
    head: str | None
    tied: bool

    def to_json(self) -> list[Any]:
        return [self.embedding, self.head, self.tied]

    @classmethod
    def from_json(cls, value: list[Any]) -> ModelRoles:
        embedding, head, tied = value
        return cls(embedding, head, bool(tied))


@dataclass(frozen=True)
class TokenStatistics:
    """The statistics of the token embedding: a linear whose input is one-hot, so its Gram is
    diag(counts), the calibration windows' count of each token. ``head`` is the output head's
    statistics when the head is this same tensor (tied embeddings), else None."""

    counts: torch.Tensor  # [vocabulary], float32
    head: TensorStatistics | None = None


def token_counts(windows: torch.Tensor, vocabulary: int) -> torch.Tensor:
    """How often each token id occurs in ``windows`` [samples, seq_len]: X^T X for the one-hot
    rows X of the embedding's input (exact in float32 up to 2^24 occurrences of a token)."""
    counts = torch.bincount(windows.reshape(-1).to(torch.int64), minlength=vocabulary)
    return counts.to(torch.float32)


def discard_matrix(name: str, matrix: torch.Tensor) -> None:
    """A ``store_matrix`` that keeps nothing: for whole matrices this process does not store
    (ranks other than the main one; RegMean's Grams once their linears are solved)."""


@dataclass
class TaskStatistics:
    """Statistics of one task: one model run forward on one calibration set.

    ``groups`` maps every captured matrix to its Hessian group: a linear weight by its state-dict
    name, expert ``e`` of a fused MoE tensor as ``tensor[e]``. ``layouts`` holds every tensor
    whose matrices are not plain [out, in] (GPT-2's Conv1D, fused experts). ``linear_suffixes``
    are the per-block names of the captured tensors (``self_attn.q_proj.weight``), so a linear of
    a block that was never captured can be told from a tensor that has no Hessian by nature
    (embeddings, norms, lm_head). With a ``matrices`` store, ``statistics`` holds only the
    vectors and ``for_weight`` adds the group's stored matrices, read when asked.
    """

    layers_prefix: str
    linear_suffixes: frozenset[str]
    groups: dict[str, str]
    statistics: dict[str, HessianStatistics]
    samples: dict[str, int]
    matrices: MatrixStore | None = None
    layouts: dict[str, TensorLayout] = dataclass_field(default_factory=dict)
    roles: ModelRoles | None = None  # where the token embedding and the head are
    token_counts: torch.Tensor | None = None  # ``token_counts`` of the task's windows

    @classmethod
    def empty(cls, layers_prefix: str, roles: ModelRoles | None = None) -> TaskStatistics:
        return cls(layers_prefix, frozenset(), {}, {}, {}, roles=roles)

    def add_layer(
        self,
        layer: LayerHessians,
        dampening: float,
        keep_factors: bool,
        keep_hessians: bool = False,
        store_matrix: Callable[[str, torch.Tensor], None] | None = None,
    ) -> None:
        """Add one block's statistics; ``store_matrix(key, matrix)`` takes each whole matrix
        away as soon as its group is done, so that they never pile up in memory."""
        for group, hessian in layer.hessians.items():
            try:
                # Inverting on the capture device: a 11008-column Cholesky is slow on a CPU.
                stats = hessian_statistics(
                    hessian,
                    dampening,
                    keep_factor=keep_factors,
                    keep_hessian=keep_hessians,
                    estimated=group in layer.estimated,
                ).cpu()
            except HessianError as error:
                raise HessianError(f"Hessian of {group}: {error}") from None
            sums = layer.sums.get(group)
            self.statistics[group] = replace(stats, input_sum=None if sums is None else sums.cpu())
            self.samples[group] = layer.samples[group]
            if store_matrix is not None:
                self.move_matrices(group, store_matrix)
        self.groups.update(layer.groups)
        self.layouts.update(layer.layouts)
        self.linear_suffixes = self.linear_suffixes | {
            _block_suffix(name, self.layers_prefix)
            for name in layer.tensor_names()
            if name.startswith(self.layers_prefix + ".")
        }

    def move_matrices(self, group: str, store_matrix: Callable[[str, torch.Tensor], None]) -> None:
        """Hand ``group``'s whole matrices to ``store_matrix``; memory keeps its vectors only."""
        stats = self.statistics[group]
        for field in OPTIONAL_MATRICES:
            if getattr(stats, field) is not None:
                store_matrix(tensor_key(group, field), getattr(stats, field))
        self.statistics[group] = replace(stats, **dict.fromkeys(OPTIONAL_MATRICES))

    def for_weight(self, weight_name: str) -> HessianStatistics | None:
        """Statistics for ``weight_name``; None for tensors that have no Hessian by nature.

        Raises ``KeyError`` for a linear of a decoder block whose Hessian was not captured
        (for example a layer index beyond the calibrated model's depth).
        """
        group = self.groups.get(weight_name)
        if group is not None:
            return self._with_matrices(group)
        if weight_name.startswith(self.layers_prefix + ".") and (
            _block_suffix(weight_name, self.layers_prefix) in self.linear_suffixes
        ):
            raise KeyError(weight_name)
        return None

    def for_tensor(self, tensor_name: str) -> TensorStatistics | None:
        """Statistics of every matrix of checkpoint tensor ``tensor_name``, as ``for_weight``
        (None: no Hessian by nature; ``KeyError``: a block's linear that was not captured)."""
        layout = self.layouts.get(tensor_name, TensorLayout())
        matrices = layout.matrix_names(tensor_name)
        if matrices[0] not in self.groups:
            return self.for_weight(tensor_name)  # None or KeyError: it has no matrix here
        groups = [self.groups[matrix] for matrix in matrices]
        return TensorStatistics(
            layout,
            tuple(self._with_matrices(group) for group in groups),
            tuple(self.samples.get(group, 0) for group in groups),
        )

    def for_tokens(self, tensor_name: str) -> TokenStatistics | None:
        """The token embedding's statistics when ``tensor_name`` is that embedding and the
        counts were taken; None otherwise."""
        roles = self.roles
        if roles is None or tensor_name != roles.embedding or self.token_counts is None:
            return None
        head = self.for_tensor(roles.head) if roles.tied and roles.head else None
        return TokenStatistics(self.token_counts, head)

    def _with_matrices(self, group: str) -> HessianStatistics:
        stats = self.statistics[group]
        if self.matrices is None or not self.matrices.shapes(group):
            return stats
        return replace(stats, **self.matrices.read(group))

    def fallback_report(self, dampening: float) -> dict[str, int]:
        """How many Hessian groups needed more damping, the pseudo-inverse, or never ran."""
        paths = [(s.inverse_path, s.damping) for s in self.statistics.values()]
        return {
            "escalated_damping": sum(m == "cholesky" and d > dampening for m, d in paths),
            "pseudo_inverse": sum(m == "pinv" for m, _ in paths),
            "never_ran": sum(count == 0 for count in self.samples.values()),
        }

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The tensors held in memory (not those of ``matrices``) and the layout metadata."""
        tensors = {
            tensor_key(group, key): value.contiguous()
            for group, stats in self.statistics.items()
            for key, value in stats.tensors().items()
        }
        layout = {
            "layers_prefix": self.layers_prefix,
            "linear_suffixes": sorted(self.linear_suffixes),
            "groups": self.groups,
            "samples": self.samples,
            "damping": {group: stats.damping for group, stats in self.statistics.items()},
            # The key stays "method": cache entries of earlier versions must still read.
            "method": {group: stats.inverse_path for group, stats in self.statistics.items()},
            "tensor_layouts": {name: layout.to_json() for name, layout in self.layouts.items()},
            "roles": None if self.roles is None else self.roles.to_json(),
        }
        if self.token_counts is not None:
            tensors[TOKEN_COUNTS] = self.token_counts.contiguous()
        return tensors, {"layout": json.dumps(layout, sort_keys=True)}

    @classmethod
    def from_tensors(
        cls,
        tensors: dict[str, torch.Tensor],
        metadata: dict[str, str],
        matrices: MatrixStore | None = None,
    ) -> TaskStatistics:
        """Inverse of ``to_tensors``; raises ``ValueError`` on any inconsistency.

        ``matrices`` holds the whole matrices that ``tensors`` lacks; only their shapes are
        checked here, their values when they are read.
        """
        try:
            layout = json.loads(metadata["layout"])
            statistics = {
                group: HessianStatistics(
                    hessian_diagonal=tensors[tensor_key(group, "hessian_diagonal")],
                    inverse_diagonal=tensors[tensor_key(group, "inverse_diagonal")],
                    cholesky_diagonal=tensors[tensor_key(group, "cholesky_diagonal")],
                    damping=float(layout["damping"][group]),
                    inverse_path=str(layout["method"][group]),
                    cholesky_factor=tensors.get(tensor_key(group, "cholesky_factor")),
                    hessian=tensors.get(tensor_key(group, "hessian")),
                    input_sum=tensors.get(tensor_key(group, "input_sum")),
                )
                for group in set(layout["groups"].values())
            }
            roles = layout.get("roles")
            result = cls(
                layout["layers_prefix"],
                frozenset(layout["linear_suffixes"]),
                dict(layout["groups"]),
                statistics,
                {group: int(count) for group, count in layout["samples"].items()},
                matrices=matrices,
                # Absent from entries written before GPT-2 and MoE support: all [out, in] then.
                layouts={
                    name: TensorLayout.from_json(value)
                    for name, value in layout.get("tensor_layouts", {}).items()
                },
                roles=None if roles is None else ModelRoles.from_json(roles),
                token_counts=tensors.get(TOKEN_COUNTS),
            )
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as error:
            raise ValueError(f"statistics layout is incomplete ({error!r})") from error
        for group, stats in statistics.items():
            _check_statistics(group, stats, {} if matrices is None else matrices.shapes(group))
        counts = result.token_counts
        if counts is not None and (
            counts.dim() != 1 or not torch.isfinite(counts).all() or (counts < 0).any()
        ):
            raise ValueError("the token counts are malformed")
        return result


def _check_statistics(
    group: str, stats: HessianStatistics, stored: Mapping[str, tuple[int, ...]]
) -> None:
    vectors = [stats.hessian_diagonal, stats.inverse_diagonal, stats.cholesky_diagonal]
    if len({v.shape for v in vectors}) != 1 or any(v.dim() != 1 for v in vectors):
        raise ValueError(f"statistics of {group} have inconsistent shapes")
    if not all(torch.isfinite(v).all() and (v > 0).all() for v in vectors):
        raise ValueError(f"statistics of {group} are not finite and positive")
    columns = len(vectors[0])
    sums = stats.input_sum
    if sums is not None and (sums.shape != (columns + 1,) or not torch.isfinite(sums).all()):
        raise ValueError(f"input sums of {group} are malformed")
    for name in OPTIONAL_MATRICES:
        matrix = getattr(stats, name)
        if matrix is not None and (
            matrix.shape != (columns, columns) or not torch.isfinite(matrix).all()
        ):
            raise ValueError(f"{name} of {group} is malformed")
    for name, shape in stored.items():
        if tuple(shape) != (columns, columns):
            raise ValueError(f"{name} of {group} is malformed")


def _block_suffix(weight_name: str, layers_prefix: str) -> str:
    # "model.layers.3.mlp.up_proj.weight" -> "mlp.up_proj.weight"
    return weight_name[len(layers_prefix) + 1 :].split(".", 1)[-1]
