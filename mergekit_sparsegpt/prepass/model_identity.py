"""Which models a config really names: one model under two spellings, or two copies, is one.

mergekit tells models apart by how they are written, so ``./expert``, ``./expert/`` and a
symlink to it are three models: each gets its own task vector, and the expert counts two or three
times. A copy of a directory does the same under another name; an expert that is the base adds
a zero task vector. A model listed twice in one list keeps one entry's parameters, silently.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from mergekit.common import ModelReference
from mergekit.config import MergeConfiguration

# Bytes hashed at each of a few offsets of each weight file: enough to tell fine-tunes apart at
# almost no cost; a match is confirmed by hashing the files whole before anything is refused.
_SAMPLE_BYTES = 1 << 16
_SAMPLES_PER_FILE = 8
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_READ_BYTES = 16 << 20
LOG = logging.getLogger(__name__)


def check_distinct_models(config: MergeConfiguration) -> None:
    """Refuse a config that names one model twice: by spelling in one list, by path, or by
    weights. Raises ``ValueError`` naming both entries and the fix."""
    _check_lists(config)
    by_identity: dict[tuple[str, str | None], ModelReference] = {}
    for model in sorted(config.referenced_models(), key=str):
        identity = _identity(model)
        seen = by_identity.setdefault(identity, model)
        if seen != model:
            raise ValueError(
                f"Models {seen} and {model} are the same model ({identity[0]}) spelled two ways: "
                "mergekit would treat them as two models and count its task vector twice. "
                "Write it one way everywhere in the config."
            )
    _check_weights(config, list(by_identity.values()))


def _check_lists(config: MergeConfiguration) -> None:
    for where, models in _model_lists(config):
        first: dict[ModelReference, int] = {}
        for index, model in enumerate(models):
            if model in first:
                raise ValueError(
                    f"Model {model} is listed twice in {where} (entries {first[model]} and "
                    f"{index}): mergekit keeps only one entry's parameters. List it once."
                )
            first[model] = index


def _model_lists(config: MergeConfiguration) -> Iterator[tuple[str, list[ModelReference]]]:
    yield "models", [entry.model for entry in config.models or []]
    for name, module in (config.modules or {}).items():
        yield f"modules.{name}.models", [entry.model for entry in module.models or []]
    slices = [("slices", s) for s in config.slices or []] + [
        (f"modules.{name}.slices", s)
        for name, module in (config.modules or {}).items()
        for s in module.slices or []
    ]
    for index, (prefix, output_slice) in enumerate(slices):
        yield f"{prefix}[{index}].sources", [source.model for source in output_slice.sources]


def identity(model: ModelReference) -> str:
    """The model as one string that does not depend on how it is spelled: what names it in
    cache keys, so ``./expert`` and its absolute path share their statistics."""
    path, lora = _identity(model)
    return path if lora is None else f"{path}+{lora}"


def _identity(model: ModelReference) -> tuple[str, str | None]:
    """The resolved directory (or hub id and revision) of the model and of its LoRA adapter."""
    return _where(model.model.path, model.model.revision), (
        _where(model.lora.path, model.lora.revision) if model.lora is not None else None
    )


def _where(path: str, revision: str | None) -> str:
    if os.path.isdir(path):
        return os.path.realpath(path)
    return f"{path}@{revision}" if revision else path


def _base_models(config: MergeConfiguration) -> set[ModelReference]:
    modules = (config.modules or {}).values()
    slices = [*(config.slices or []), *(s for m in modules for s in m.slices or [])]
    return {m for m in [config.base_model, *(s.base_model for s in slices)] if m is not None}


def _check_weights(config: MergeConfiguration, models: list[ModelReference]) -> None:
    """Two local models (without adapters) whose weight files are byte for byte the same: two
    experts are refused; an expert equal to the base is merged as asked, with a warning."""
    local = [m for m in models if m.lora is None and os.path.isdir(m.model.path)]
    bases = _base_models(config)
    by_sample: dict[str, ModelReference] = {}
    for model in local:
        other = by_sample.setdefault(_fingerprint(Path(model.model.path), whole=False), model)
        if other is model or not _same_weights(Path(other.model.path), Path(model.model.path)):
            continue
        if other in bases or model in bases:
            base, expert = (other, model) if other in bases else (model, other)
            LOG.warning(
                "Model %s has the same weights as the base model %s: its task vector is zero, "
                "so it only dilutes the merge. Check that it is the fine-tuned checkpoint you "
                "meant, or leave it out.",
                expert,
                base,
            )
            continue
        raise ValueError(
            f"Models {other} and {model} have the same weights (a copy of one directory): the "
            "merge would count that model twice. List it once."
        )


def _same_weights(a: Path, b: Path) -> bool:
    """Whether two directories whose sampled fingerprints agree hold the same weights: the same
    files (links to one another's) without reading them, else by hashing them whole."""
    files_a, files_b = _weight_files(a), _weight_files(b)
    if [f.name for f in files_a] == [f.name for f in files_b] and all(
        x.resolve() == y.resolve() for x, y in zip(files_a, files_b, strict=True)
    ):
        return True
    return _fingerprint(a, whole=True) == _fingerprint(b, whole=True)


def _fingerprint(directory: Path, whole: bool) -> str:
    """A hash of the model's weight files: sampled at a few offsets, or ``whole``."""
    digest = hashlib.sha256()
    for file in _weight_files(directory):
        size = file.stat().st_size
        digest.update(f"{file.name}:{size};".encode())
        with file.open("rb") as handle:
            if whole or size <= _SAMPLE_BYTES * _SAMPLES_PER_FILE:
                while block := handle.read(_READ_BYTES):
                    digest.update(block)
                continue
            step = (size - _SAMPLE_BYTES) // (_SAMPLES_PER_FILE - 1)
            for k in range(_SAMPLES_PER_FILE):
                handle.seek(k * step)
                digest.update(handle.read(_SAMPLE_BYTES))
    return digest.hexdigest()


def _weight_files(directory: Path) -> list[Path]:
    return sorted(
        p for p in directory.iterdir() if p.name.endswith(_WEIGHT_SUFFIXES) and p.is_file()
    )
