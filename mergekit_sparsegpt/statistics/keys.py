"""What a cache entry is keyed by: a hash of a JSON payload of everything that shapes it.

The payload holds the model identity and weights fingerprint, the exact token ids fed to it,
damping, format version and which whole matrices were kept; it is also stored in the entry and
compared on load, so a hash collision or a hand-copied file cannot be used for the wrong task.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from pathlib import Path
from typing import Any

import torch
from mergekit.common import ModelReference
from mergekit.io.tasks import LoaderCache
from transformers import PretrainedConfig

from mergekit_sparsegpt.statistics.cache_dir import resolved_cache_dir

FORMAT_VERSION = 6  # bump whenever the statistics a given key maps to change (3: "hessians";
# 4: Conv1D and fused-expert Hessians, forward pass in the checkpoint's dtype; 5: the output
# head's Hessian and the token counts; 6: the norms' channel energies)
# Payload flags for the optional whole matrices an entry holds (``HessianStatistics``'s
# cholesky_factor and hessian). An entry holding more than a merge needs serves it too. With both
# flags an entry holds only H, the factor being recomputed from it bit for bit; entries written
# with both matrices stored serve the same key, so the format version stayed.
OPTIONAL_CONTENTS = ("factors", "hessians")
# Payload flag of an entry whose linears have only diag H (a merge that reads nothing else):
# absent from entries of whole Hessians, which serve such a merge too, never the reverse.
DIAGONAL = "diagonal"
# Bytes hashed from each weight file: the start (safetensors header), the end, and evenly spaced
# samples between; reading whole multi-GB checkpoints would cost more than the pre-pass.
_FINGERPRINT_CHUNK = 1 << 16
_FINGERPRINT_SAMPLES = 16


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


def model_weights_fingerprint(model: ModelReference) -> str:
    """``weights_fingerprint`` of every weight file mergekit's loader indexes for ``model``."""
    index = LoaderCache().get(model).index
    return weights_fingerprint(
        [os.path.join(index.base_path, name) for name in set(index.tensor_paths.values())]
    )


def config_fingerprint(config: PretrainedConfig) -> str:
    """The model's architecture settings (activation, norm epsilon, RoPE...) shape its Hessians.
    Where the config was read from does not: another spelling of the model's path shares its
    entries."""
    settings = {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def tokens_fingerprint(windows: torch.Tensor) -> str:
    return hashlib.sha256(windows.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def statistics_payload(
    *,
    weights: Any,
    config: str,
    tokens: Any,
    token_shape: list[int],
    dampening: float,
    factors: bool,
    hessians: bool,
    diagonal: bool = False,
    **identity: Any,
) -> dict[str, Any]:
    """The payload of one entry: ``identity`` names the forward model (``model``, or the merge
    for ``hessian_source: merged``), the other fields are what its statistics are computed from.
    """
    return {
        "format": FORMAT_VERSION,
        **identity,
        "weights": weights,
        "config": config,
        "tokens": tokens,
        "token_shape": token_shape,
        "dampening": dampening,
        "factors": factors,
        "hessians": hessians,
        **({DIAGONAL: True} if diagonal else {}),
    }


def serving_payloads(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """The payloads whose entries can serve ``payload``: itself first, then every entry that
    holds more: for a diagonal-only one, the entries of whole Hessians; and every entry that
    also holds optional matrices ``payload`` does not ask for (fewest extras first)."""
    if payload.get(DIAGONAL):
        whole = {key: value for key, value in payload.items() if key != DIAGONAL}
        return [payload, *serving_payloads(whole)]
    missing = [flag for flag in OPTIONAL_CONTENTS if not payload.get(flag)]
    extras = [
        {flag: True for flag, take in zip(missing, choice, strict=True) if take}
        for choice in itertools.product((False, True), repeat=len(missing))
    ]
    return [{**payload, **extra} for extra in sorted(extras, key=len)]


def older_format_entries(
    cache_dir: str | os.PathLike[str], payload: dict[str, Any]
) -> list[tuple[Path, int]]:
    """Entries of earlier format versions for the same inputs: the version is part of the key,
    so they are never read, only named so that the user knows why the cache missed."""
    found = []
    for version in range(1, FORMAT_VERSION):
        for candidate in serving_payloads({**payload, "format": version}):
            path = cache_path(cache_dir, candidate)
            if path.is_file():
                found.append((path, version))
    return found


def cache_key(payload: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(payload).encode()).hexdigest()


def cache_path(cache_dir: str | os.PathLike[str], payload: dict[str, Any]) -> Path:
    return resolved_cache_dir(cache_dir) / f"{cache_key(payload)}.safetensors"


def checkpoint_dir(path: Path) -> Path:
    """Where the pre-pass of entry ``path`` keeps what it needs to resume."""
    return path.with_suffix(".checkpoint")


def lock_path(path: Path) -> Path:
    return path.with_suffix(".lock")


def canonical(payload: dict[str, Any]) -> str:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"))
