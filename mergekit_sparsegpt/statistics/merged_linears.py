"""A merge's decoder linears, solved by the pre-pass: the cache entry RegMean merges read.

RegMean's pre-pass solves each linear while it calibrates (prepass/merged_linears.py), so the
entry it caches is the merged weight of every linear with a Hessian, in the output dtype, plus
each tensor's report record (solve path, trim details). Its size is one merged model's linears
whatever the number of experts; the kernel returns the stored weight instead of solving again.

The tensors are streamed into the entry by ``EntryWriter.add`` as they are solved; the report
records travel in the safetensors metadata.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from mergekit_sparsegpt.statistics.cache_dir import (
    READ_ERRORS,
    require_regular,
)
from mergekit_sparsegpt.statistics.entries import check_identity, load_entry
from mergekit_sparsegpt.statistics.keys import canonical
from mergekit_sparsegpt.statistics.task_statistics import StoredMatricesError

# The entry kind, in its payload and its metadata: not a task's statistics.
KIND = "merged_linears"
_REPORTS = "merged_linears"  # the metadata field of the report records


class MergedLinears:
    """The merged value of each solved linear (read from the entry when asked) and the report
    record the kernel would have written for it.

    Without a ``path`` the tensors are those of ``tensors`` (the pass that computes them).
    """

    def __init__(
        self,
        reports: dict[str, dict[str, Any]],
        path: Path | None = None,
        key: str | None = None,
        tensors: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.reports = reports
        self.path = path
        self._key = key
        self._tensors = tensors or {}
        self._lock = threading.Lock()  # mergekit's multi-GPU executor runs kernels in threads

    def __contains__(self, name: str) -> bool:
        return name in self.reports

    def tensor(self, name: str) -> torch.Tensor:
        """The merged value of linear ``name``; raises ``StoredMatricesError`` when the entry
        can no longer be read."""
        if self.path is None:
            return self._tensors[name]
        with self._lock:
            try:
                require_regular(self.path)
                with safe_open(self.path, framework="pt") as handle:
                    if (handle.metadata() or {}).get("key") != self._key:
                        raise ValueError("it now holds another merge")
                    value = handle.get_tensor(name)
            except READ_ERRORS as error:
                raise StoredMatricesError(
                    f"cache entry {self.path} can no longer be read ({error})"
                ) from None
        if not torch.isfinite(value).all():
            raise StoredMatricesError(f"cache entry {self.path} is corrupt: {name} is not finite")
        return value

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """What ``EntryWriter.commit`` writes besides the streamed tensors: the records."""
        return {}, {"kind": KIND, _REPORTS: json.dumps(self.reports, sort_keys=True)}

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> MergedLinears:
        """The records ``to_tensors`` wrote (the tensors stay where they were streamed);
        raises ``ValueError`` when they are unreadable."""
        try:
            reports = json.loads(metadata[_REPORTS])
        except (KeyError, json.JSONDecodeError) as error:
            raise ValueError(f"its report records are unreadable ({error!r})") from None
        if not isinstance(reports, dict):
            raise ValueError("its report records are unreadable (not a mapping)")
        return cls(reports)


def read_merged_linears(path: Path, payload: dict[str, Any]) -> MergedLinears:
    """The entry's records, its tensors left in the file; raises one of ``READ_ERRORS``."""
    key = canonical(payload)
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata() or {}
        check_identity(metadata, key)
        if metadata.get("kind") != KIND:
            raise ValueError("it is not a merged-linears entry")
        names = set(handle.keys())
    reports = MergedLinears.from_metadata(metadata).reports
    if set(reports) != names:
        raise ValueError("its report records do not match its tensors")
    return MergedLinears(reports, path, key)


def load_merged_linears(path: Path, payload: dict[str, Any]) -> MergedLinears | None:
    """The cached merged linears, or None (with a warning) when absent, stale or corrupt."""
    return load_entry(path, payload, read_merged_linears)
