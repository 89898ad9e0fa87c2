"""Models are told apart by where they are and what their weights hold, not how they are spelt.

The refusals through a whole merge are rows of test_bad_input.py; here the weight comparison
against a plain byte-for-byte reference."""

from __future__ import annotations

import filecmp
from pathlib import Path

import pytest
from mergekit.config import MergeConfiguration

from mergekit_sparsegpt.prepass import model_identity
from mergekit_sparsegpt.prepass.model_identity import check_distinct_models


def _model(directory: Path, data: bytes) -> Path:
    directory.mkdir()
    (directory / "config.json").write_text("{}")
    (directory / "model.safetensors").write_bytes(data)
    return directory


def _config(*paths: Path) -> MergeConfiguration:
    return MergeConfiguration.model_validate(
        {
            "merge_method": "ties",
            "base_model": str(paths[0]),
            "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in paths[1:]],
        }
    )


def _same_bytes(a: Path, b: Path) -> bool:
    return filecmp.cmp(a / "model.safetensors", b / "model.safetensors", shallow=False)


@pytest.mark.parametrize("differ_at", [None, 0, 100_000, 1_999_999])
def test_weights_are_the_same_exactly_when_the_bytes_are(tmp_path, differ_at):
    """A 2 MB file differing in one byte between the sampled blocks, inside one, or nowhere."""
    data = bytes(range(256)) * (2_000_000 // 256) + bytes(2_000_000 % 256)
    other = bytearray(data)
    if differ_at is not None:
        other[differ_at] ^= 0xFF
    base = _model(tmp_path / "base", bytes(reversed(data)))
    a, b = _model(tmp_path / "a", data), _model(tmp_path / "b", bytes(other))
    if _same_bytes(a, b):
        with pytest.raises(ValueError, match="have the same weights"):
            check_distinct_models(_config(base, a, b))
    else:
        check_distinct_models(_config(base, a, b))


def test_a_sampled_match_is_confirmed_by_the_whole_files(tmp_path, monkeypatch):
    """Files alike at every sampled block but not elsewhere are different models."""
    size = model_identity._SAMPLE_BYTES * model_identity._SAMPLES_PER_FILE * 4
    data = bytearray(size)
    other = bytearray(size)
    other[model_identity._SAMPLE_BYTES + 10] = 1  # after the first block, before the second
    base = _model(tmp_path / "base", b"\x07" * size)
    a, b = _model(tmp_path / "a", bytes(data)), _model(tmp_path / "b", bytes(other))
    sampled = model_identity._fingerprint(a, whole=False)
    assert sampled == model_identity._fingerprint(b, whole=False)
    check_distinct_models(_config(base, a, b))


def test_two_revisions_of_one_hub_repo_are_two_models():
    parsed = MergeConfiguration.model_validate(
        {
            "merge_method": "ties",
            "base_model": "org/model@v1",
            "models": [{"model": "org/model@v2", "parameters": {"weight": 1.0}}],
        }
    )
    check_distinct_models(parsed)  # two revisions of one repo are two models


@pytest.mark.parametrize("how", ["copied", "linked"])
def test_an_expert_equal_to_the_base_is_merged_with_a_warning(tmp_path, caplog, how):
    base = _model(tmp_path / "base", b"weights" * 1000)
    expert = tmp_path / "expert"
    expert.mkdir()
    for file in base.iterdir():
        if how == "copied":
            (expert / file.name).write_bytes(file.read_bytes())
        else:
            (expert / file.name).symlink_to(file)
    other = _model(tmp_path / "other", b"tuned" * 1000)
    check_distinct_models(_config(base, expert, other))
    assert f"Model {expert} has the same weights as the base model {base}" in caplog.text
    assert "its task vector is zero" in caplog.text
