"""A shareable statistics folder: one task's statistics, written once and used by any merge.

``mergekit-sparsegpt calibrate CONFIG --export DIR`` writes one folder per model: the task's
statistics as safetensors (the vectors and every whole Hessian, from which importance
diagonals, RegMean's H and compensation's factor are all derived) and ``statistics.json``, the
manifest, saying which weights, tokenizer, calibration data and settings produced them. The
safetensors file has the cache entry's layout with metadata of its own: no cache key, so no
path of the machine that wrote it.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from mergekit_sparsegpt.statistics.cache_dir import READ_ERRORS, require_regular
from mergekit_sparsegpt.statistics.entries import (
    CachedMatrices,
    raw_bytes,
    safetensors_header,
    vectors_and_matrix_shapes,
    write_tensors,
)
from mergekit_sparsegpt.statistics.hessian import OPTIONAL_MATRICES
from mergekit_sparsegpt.statistics.keys import FORMAT_VERSION, canonical
from mergekit_sparsegpt.statistics.task_statistics import (
    TaskStatistics,
    split_tensor_key,
    tensor_key,
)

# The folder's own layout (file names, manifest fields); the statistics in it follow
# FORMAT_VERSION, recorded next to it. Bump when either changes what a folder means.
EXPORT_FORMAT_VERSION = 1
MANIFEST_FILE = "statistics.json"
STATISTICS_FILE = "statistics.safetensors"
# The matrix a folder keeps per Hessian group: compensation's factor is derived from it.
KEPT_MATRIX = "hessian"
# Files a tokenizer is saved as (``save_pretrained`` of the fast and the slow tokenizers).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
)
_SAMPLE_BYTES = 1 << 16
_SAMPLES = 16


class ExportFolderError(ValueError):
    """A statistics folder that cannot be used: missing, incomplete, another version, damaged."""


@dataclass(frozen=True)
class Manifest:
    """What ``statistics.json`` says: what produced the folder's statistics.

    ``weights``: content fingerprint per role ("model": whose task it is, "forward_model": the
    model the text ran through, when another); ``calibration``: source, field, split, windows,
    seq_len, tokens and tokens_sha256; ``settings``: hessian_source, dampening,
    calibration_samples and calibration_seq_len as resolved.
    """

    model: str
    forward_model: str
    weights: dict[str, str]
    tokenizer: str | None
    calibration: dict[str, Any]
    settings: dict[str, Any]
    format: int = EXPORT_FORMAT_VERSION
    statistics_format: int = FORMAT_VERSION

    @property
    def token_shape(self) -> tuple[int, int]:
        return int(self.calibration["windows"]), int(self.calibration["seq_len"])


def content_fingerprint(files: Iterable[str | os.PathLike[str]]) -> str:
    """Names, sizes and sampled bytes of ``files``; unlike the cache key's fingerprint, not
    their modification times, which a download or a copy to another machine changes."""
    digest = hashlib.sha256()
    for path in sorted(Path(file) for file in files):
        size = path.stat().st_size
        digest.update(f"{path.name}:{size};".encode())
        with path.open("rb") as handle:
            for k in range(_SAMPLES + 1):
                handle.seek(max(0, size - _SAMPLE_BYTES) * k // _SAMPLES)
                digest.update(handle.read(_SAMPLE_BYTES))
    return digest.hexdigest()


def tokenizer_fingerprint(directory: str | os.PathLike[str]) -> str | None:
    """A hash of the tokenizer files saved in ``directory`` (whole: they are small); None when
    it holds none."""
    files = [Path(directory) / name for name in TOKENIZER_FILES]
    present = [file for file in files if file.is_file()]
    if not present:
        return None
    digest = hashlib.sha256()
    for file in present:
        digest.update(f"{file.name}:".encode())
        digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


def folder_names(names: Iterable[str]) -> list[str]:
    """One folder name per model, in order: its own, or with ``-2``, ``-3`` when taken."""
    taken: set[str] = set()
    result = []
    for name in names:
        candidate, number = name, 1
        while candidate in taken:
            number += 1
            candidate = f"{name}-{number}"
        taken.add(candidate)
        result.append(candidate)
    return result


def check_writable_target(folder: Path) -> None:
    """Refuse, before any work, a target that holds something other than an earlier export
    (which ``write_folder`` replaces)."""
    if folder.exists() and not (folder.is_dir() and (folder / MANIFEST_FILE).is_file()):
        raise ExportFolderError(
            f"{folder} exists and is not a statistics folder; remove it or export to another "
            "directory"
        )


def write_folder(folder: Path, statistics: TaskStatistics, manifest: Manifest) -> None:
    """Write ``folder`` whole or not at all: into a temporary sibling renamed into place (an
    earlier export there is replaced only once the new one is complete)."""
    check_writable_target(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = _sibling(folder, "partial")
    try:
        _write_statistics(partial / STATISTICS_FILE, statistics, manifest)
        (partial / MANIFEST_FILE).write_text(
            json.dumps(asdict(manifest), indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
        if not folder.exists():
            os.replace(partial, folder)
            return
        previous = _sibling(folder, "old")
        os.replace(folder, previous / folder.name)
        try:
            os.replace(partial, folder)
        except OSError:
            os.replace(previous / folder.name, folder)
            raise
        shutil.rmtree(previous, ignore_errors=True)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _sibling(folder: Path, why: str) -> Path:
    """A new hidden directory next to ``folder`` (made under the umask, unlike mkdtemp's 0700:
    the folder it becomes is meant to be shared)."""
    while True:
        candidate = folder.with_name(f".{folder.name}.{why}-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue


def _write_statistics(path: Path, statistics: TaskStatistics, manifest: Manifest) -> None:
    """The vectors held in memory, then each group's Hessian, read from the statistics' store
    one group at a time (a task's Hessians do not fit in memory at once for large models)."""
    vectors, metadata = statistics.to_tensors()
    vectors = {k: v for k, v in vectors.items() if split_tensor_key(k)[1] not in OPTIONAL_MATRICES}
    # A diagonal H (a norm's) is its vectors: it has no matrix to export.
    groups = sorted(g for g, stats in statistics.statistics.items() if not stats.is_diagonal)
    shapes = {group: _hessian_shape(statistics, group) for group in groups}
    matrices = {
        tensor_key(group, KEPT_MATRIX): torch.empty(shape, dtype=torch.float32, device="meta")
        for group, shape in shapes.items()
    }
    metadata = {**metadata, **_identity(manifest)}
    header = safetensors_header({**vectors, **matrices}, metadata)
    with open(path, "wb") as handle:
        write_tensors(handle, header, vectors.values())
        for group in groups:
            hessian = _hessian(statistics, group)
            if hessian.dtype != torch.float32 or tuple(hessian.shape) != shapes[group]:
                raise ValueError(f"the Hessian of {group} is not a float32 {shapes[group]}")
            handle.write(raw_bytes(hessian))


def _hessian_shape(statistics: TaskStatistics, group: str) -> tuple[int, ...]:
    stored = statistics.matrices.shapes(group) if statistics.matrices is not None else {}
    if KEPT_MATRIX in stored:
        return tuple(stored[KEPT_MATRIX])
    in_memory = statistics.statistics[group].hessian
    if in_memory is None:
        raise ValueError(f"the statistics of {group} hold no whole Hessian to export")
    return tuple(in_memory.shape)


def _hessian(statistics: TaskStatistics, group: str) -> torch.Tensor:
    in_memory = statistics.statistics[group].hessian
    if in_memory is not None:
        return in_memory
    assert statistics.matrices is not None  # _hessian_shape found it there
    return statistics.matrices.read(group)[KEPT_MATRIX]


def _identity(manifest: Manifest) -> dict[str, str]:
    """The file's own metadata: what ``CachedMatrices`` re-checks on every read, so that a file
    replaced during a merge is noticed."""
    key = {"export": manifest.format, "weights": manifest.weights, **manifest.calibration}
    return {"key": canonical(key), "format": str(FORMAT_VERSION)}


def read_manifest(folder: str | os.PathLike[str]) -> Manifest:
    """The folder's manifest; ``ExportFolderError`` saying what is wrong with it."""
    folder = Path(folder)
    if not folder.is_dir():
        problem = "is not a directory" if folder.exists() else "does not exist"
        raise ExportFolderError(
            f"statistics folder {folder} {problem}; give the folder that `mergekit-sparsegpt "
            "calibrate --export` wrote"
        )
    path = folder / MANIFEST_FILE
    try:
        require_regular(path)
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportFolderError(
            f"statistics folder {folder} has no {MANIFEST_FILE}, so it was not written by "
            "`mergekit-sparsegpt calibrate --export`; export it again"
        ) from None
    except (OSError, ValueError) as error:
        raise ExportFolderError(f"{path} cannot be read ({error}); export it again") from None
    versions = (record.get("format"), record.get("statistics_format"))
    if not isinstance(record, dict) or versions != (EXPORT_FORMAT_VERSION, FORMAT_VERSION):
        raise ExportFolderError(
            f"statistics folder {folder} has format {versions[0]} (statistics format "
            f"{versions[1]}); this version of mergekit_sparsegpt reads format "
            f"{EXPORT_FORMAT_VERSION} (statistics format {FORMAT_VERSION}) only. Export it "
            "again with this version, or calibrate the model (`calibration:`)"
        )
    try:
        return Manifest(**record)
    except TypeError as error:
        raise ExportFolderError(f"{path} is incomplete ({error}); export it again") from None


def read_folder(folder: str | os.PathLike[str]) -> tuple[Manifest, TaskStatistics]:
    """The manifest and the statistics, whose Hessians stay in the file until a kernel reads
    them; ``ExportFolderError`` when either cannot be used."""
    manifest = read_manifest(folder)
    path = Path(folder) / STATISTICS_FILE
    try:
        require_regular(path)
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            vectors, shapes = vectors_and_matrix_shapes(handle)
        if metadata.get("key") != _identity(manifest)["key"]:
            raise ValueError(f"it does not belong to {MANIFEST_FILE}")
        stored = CachedMatrices(path, metadata["key"], shapes)
        statistics = TaskStatistics.from_tensors(vectors, metadata, stored)
        missing = [
            group
            for group, stats in statistics.statistics.items()
            if not stats.is_diagonal and KEPT_MATRIX not in stored.shapes(group)
        ]
        if missing:
            raise ValueError(f"it holds no Hessian of {missing[0]}")
    except READ_ERRORS as error:
        raise ExportFolderError(
            f"{path} cannot be used ({error}); export the folder again"
        ) from None
    return manifest, statistics
