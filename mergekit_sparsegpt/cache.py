"""On-disk cache of task statistics: safetensors files keyed by everything that shapes them.

The key is a hash of a JSON payload (model identity and weights fingerprint, the exact token ids
fed to it, damping, format version, which whole matrices were kept); the payload is also stored
in the file and compared on load, so a hash collision or a hand-copied file cannot be used for
the wrong task.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import PretrainedConfig

from mergekit_sparsegpt.statistics import TaskStatistics

LOG = logging.getLogger(__name__)

FORMAT_VERSION = 3  # bump whenever the statistics a given key maps to change (3: "hessians")
# Payload flags for the optional whole matrices an entry holds (``HessianStatistics``'s
# cholesky_factor and hessian). An entry holding more than a merge needs serves it too.
OPTIONAL_CONTENTS = ("factors", "hessians")
# Bytes hashed from each weight file: the start (safetensors header), the end, and evenly spaced
# samples between; reading whole multi-GB checkpoints would cost more than the pre-pass.
_FINGERPRINT_CHUNK = 1 << 16
_FINGERPRINT_SAMPLES = 16


def default_cache_dir() -> Path:
    configured = os.environ.get("MERGEKIT_SPARSEGPT_CACHE")
    if configured:
        return Path(configured)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(xdg) / "mergekit_sparsegpt"


def file_fingerprint(path: str | os.PathLike[str]) -> str:
    """Size, modification time and sampled bytes of one file.

    The modification time catches an in-place edit the samples miss; a copied checkpoint gets a
    new one and is recomputed once, which is the safe direction.
    """
    digest = hashlib.sha256()
    status = os.stat(path)
    size = status.st_size
    digest.update(f"{size}:{status.st_mtime_ns}".encode())
    with open(path, "rb") as handle:
        offsets = {0, max(0, size - _FINGERPRINT_CHUNK)}
        offsets.update(
            size * k // (_FINGERPRINT_SAMPLES + 1) for k in range(1, _FINGERPRINT_SAMPLES)
        )
        for offset in sorted(offsets):
            handle.seek(offset)
            digest.update(handle.read(_FINGERPRINT_CHUNK))
    return digest.hexdigest()


def weights_fingerprint(weight_files: list[str]) -> str:
    digest = hashlib.sha256()
    for path in sorted(weight_files):
        digest.update(os.path.basename(path).encode())
        digest.update(file_fingerprint(path).encode())
    return digest.hexdigest()


def config_fingerprint(config: PretrainedConfig) -> str:
    """The model's architecture settings (activation, norm epsilon, RoPE...) shape its Hessians."""
    return hashlib.sha256(config.to_json_string(use_diff=False).encode()).hexdigest()


def tokens_fingerprint(windows: torch.Tensor) -> str:
    return hashlib.sha256(windows.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def serving_payloads(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """The payloads whose entries can serve ``payload``: itself first, then every entry that
    also holds optional matrices ``payload`` does not ask for (fewest extras first)."""
    missing = [flag for flag in OPTIONAL_CONTENTS if not payload.get(flag)]
    extras = [
        {flag: True for flag, take in zip(missing, choice, strict=True) if take}
        for choice in itertools.product((False, True), repeat=len(missing))
    ]
    return [{**payload, **extra} for extra in sorted(extras, key=len)]


def cache_key(payload: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical(payload).encode()).hexdigest()


def cache_path(cache_dir: str | os.PathLike[str], payload: dict[str, Any]) -> Path:
    return Path(cache_dir) / f"{cache_key(payload)}.safetensors"


def save_statistics(path: Path, statistics: TaskStatistics, payload: dict[str, Any]) -> None:
    """Write atomically: a reader sees the old file, the new file, or nothing."""
    tensors, metadata = statistics.to_tensors()
    metadata = {**metadata, "key": _canonical(payload), "format": str(FORMAT_VERSION)}
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".partial")
    os.close(handle)
    try:
        save_file(tensors, temporary, metadata=metadata)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load_statistics(path: Path, payload: dict[str, Any]) -> TaskStatistics | None:
    """The cached statistics, or None (with a warning) when absent, stale or corrupt."""
    if not path.exists():
        return None
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        if metadata.get("key") != _canonical(payload):
            raise ValueError("it was written for different inputs")
        return TaskStatistics.from_tensors(tensors, metadata)
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        LOG.warning("Ignoring statistics cache %s: %s; recomputing.", path, error)
        return None


def _canonical(payload: dict[str, Any]) -> str:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"))
