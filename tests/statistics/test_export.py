"""The statistics folder: its round trip, folder names, atomic writes, and damaged folders."""

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mergekit_sparsegpt.capture.accumulate import LayerHessians
from mergekit_sparsegpt.statistics import export
from mergekit_sparsegpt.statistics.export import (
    MANIFEST_FILE,
    STATISTICS_FILE,
    ExportFolderError,
    Manifest,
    check_writable_target,
    content_fingerprint,
    folder_names,
    read_folder,
    read_manifest,
    tokenizer_fingerprint,
    write_folder,
)
from mergekit_sparsegpt.statistics.task_statistics import TaskStatistics

GROUPS = ("model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight")


def _gram(columns: int, seed: int) -> torch.Tensor:
    x = torch.randn(columns, 3 * columns, generator=torch.Generator().manual_seed(seed))
    return 2 * x @ x.T / x.shape[1]


def _statistics(with_factors: bool = False) -> TaskStatistics:
    """Two Hessian groups with whole Hessians (and a stand-in factor when asked) in memory."""
    statistics = TaskStatistics.empty("model.layers")
    hessians = {name: _gram(4 + 2 * i, i) for i, name in enumerate(GROUPS)}
    layer = LayerHessians(hessians, {n: n for n in GROUPS}, {name: 12 for name in GROUPS})
    statistics.add_layer(layer, 0.01, False, keep_hessians=True)
    if with_factors:
        for group, stats in statistics.statistics.items():
            factor = torch.eye(len(stats.hessian_diagonal))
            statistics.statistics[group] = replace(stats, cholesky_factor=factor)
    return statistics


def _manifest(**changes) -> Manifest:
    fields = dict(
        model="./expert",
        forward_model="./expert",
        weights={"model": "abc"},
        tokenizer="def",
        calibration={
            "source": "code.txt",
            "field": "text",
            "split": "train",
            "windows": 8,
            "seq_len": 32,
            "tokens": 256,
            "tokens_sha256": "0" * 64,
        },
        settings={"hessian_source": "finetuned", "dampening": 0.01},
    )
    return Manifest(**{**fields, **changes})


def test_round_trip_keeps_every_vector_and_hessian_and_only_the_hessian(tmp_path):
    written = _statistics(with_factors=True)
    write_folder(tmp_path / "expert", written, _manifest())
    manifest, read = read_folder(tmp_path / "expert")
    assert manifest == _manifest()
    assert read.groups == written.groups and read.samples == written.samples
    assert read.layers_prefix == written.layers_prefix
    for name in GROUPS:
        ours, theirs = written.for_weight(name), read.for_weight(name)
        for field in ("hessian_diagonal", "inverse_diagonal", "cholesky_diagonal", "hessian"):
            assert torch.equal(getattr(ours, field), getattr(theirs, field)), field
        assert (theirs.damping, theirs.inverse_path) == (ours.damping, ours.inverse_path)
        # The factor is derived from H when needed, never stored.
        assert ours.cholesky_factor is not None and theirs.cholesky_factor is None
        derived = replace(ours, cholesky_factor=None).upper_factor()
        assert derived is not None and torch.equal(theirs.upper_factor(), derived)
    with safe_open(tmp_path / "expert" / STATISTICS_FILE, "pt") as handle:
        assert not any(name.endswith("::cholesky_factor") for name in handle.keys())
        assert str(tmp_path) not in json.dumps(handle.metadata())


def test_manifest_is_plain_json_with_versions(tmp_path):
    write_folder(tmp_path / "expert", _statistics(), _manifest())
    record = json.loads((tmp_path / "expert" / MANIFEST_FILE).read_text())
    assert record["format"] == export.EXPORT_FORMAT_VERSION
    assert record["statistics_format"] == export.FORMAT_VERSION
    assert record["calibration"]["tokens"] == 256 and record["weights"] == {"model": "abc"}
    assert read_manifest(tmp_path / "expert").token_shape == (8, 32)


def test_folder_names_take_a_numeric_suffix_when_taken():
    assert folder_names(["a", "b", "a", "a", "a-2"]) == ["a", "b", "a-2", "a-3", "a-2-2"]


def test_a_failed_write_leaves_nothing_and_keeps_the_previous_export(tmp_path, monkeypatch):
    write_folder(tmp_path / "expert", _statistics(), _manifest(tokenizer="first"))

    def failing(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export, "raw_bytes", failing)
    with pytest.raises(OSError, match="disk full"):
        write_folder(tmp_path / "expert", _statistics(), _manifest(tokenizer="second"))
    with pytest.raises(OSError, match="disk full"):
        write_folder(tmp_path / "new", _statistics(), _manifest())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["expert"]
    assert read_manifest(tmp_path / "expert").tokenizer == "first"


def test_an_earlier_export_is_replaced_whole(tmp_path):
    write_folder(tmp_path / "expert", _statistics(), _manifest(tokenizer="first"))
    write_folder(tmp_path / "expert", _statistics(), _manifest(tokenizer="second"))
    assert read_manifest(tmp_path / "expert").tokenizer == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["expert"]


def test_a_target_that_is_not_an_export_is_refused(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ExportFolderError, match="is not a statistics folder"):
        check_writable_target(tmp_path / "mine")
    with pytest.raises(ExportFolderError, match="is not a statistics folder"):
        write_folder(tmp_path / "mine", _statistics(), _manifest())
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def _damage_version(folder: Path) -> None:
    record = json.loads((folder / MANIFEST_FILE).read_text())
    record["format"] = 99
    (folder / MANIFEST_FILE).write_text(json.dumps(record))


def _truncate(folder: Path) -> None:
    path = folder / STATISTICS_FILE
    path.write_bytes(path.read_bytes()[:-40])


DAMAGES = {
    "missing folder": (lambda folder: os.rename(folder, folder.with_name("gone")), "does not"),
    "no manifest": (lambda folder: (folder / MANIFEST_FILE).unlink(), "has no statistics.json"),
    "other version": (_damage_version, "has format 99"),
    "bad json": (lambda folder: (folder / MANIFEST_FILE).write_text("{"), "cannot be read"),
    "truncated safetensors": (_truncate, "statistics.safetensors cannot be used"),
    "no safetensors": (
        lambda folder: (folder / STATISTICS_FILE).unlink(),
        "statistics.safetensors cannot be used",
    ),
    "another folder's safetensors": (
        lambda folder: (folder / MANIFEST_FILE).write_text(
            json.dumps({**json.loads((folder / MANIFEST_FILE).read_text()), "weights": {}})
        ),
        "does not belong to statistics.json",
    ),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_folder_is_one_clear_error(tmp_path, damage):
    make_damage, message = DAMAGES[damage]
    folder = tmp_path / "expert"
    write_folder(folder, _statistics(), _manifest())
    make_damage(folder)
    with pytest.raises(ExportFolderError, match=message) as raised:
        read_folder(folder)
    assert str(folder) in str(raised.value)


def test_content_fingerprint_ignores_modification_times_not_bytes(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(bytes(range(256)) * 1000)
    first = content_fingerprint([path])
    os.utime(path, (1, 1))
    assert content_fingerprint([path]) == first
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # the last bytes are always sampled
    path.write_bytes(bytes(data))
    assert content_fingerprint([path]) != first


def test_tokenizer_fingerprint_hashes_the_saved_tokenizer_files(tmp_path):
    assert tokenizer_fingerprint(tmp_path) is None
    (tmp_path / "tokenizer.json").write_text('{"a": 1}')
    first = tokenizer_fingerprint(tmp_path)
    (tmp_path / "model.safetensors").write_text("not a tokenizer file")
    assert tokenizer_fingerprint(tmp_path) == first
    (tmp_path / "tokenizer.json").write_text('{"a": 2}')
    assert tokenizer_fingerprint(tmp_path) != first
