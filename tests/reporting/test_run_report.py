"""The per-tensor JSON report a merge writes next to its weights."""

import json

import mergekit.merge
import pytest
from merge_configs import sparsegpt_config
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions
from safetensors.torch import load_file

from mergekit_sparsegpt.integration.registration import install
from mergekit_sparsegpt.trim.metrics import REPORT_FILE

install()

DOWN = "model.layers.{}.mlp.down_proj.weight"


def test_report_lists_every_tensor_and_its_path(tiny_models, tmp_path):
    config = sparsegpt_config(
        tiny_models, importance="obs", cache_dir=str(tmp_path / "cache"), norm_rule="energy"
    )
    mergekit.merge.run_merge(
        MergeConfiguration.model_validate(config), str(tmp_path / "out"), MergeOptions(quiet=True)
    )
    report = json.loads((tmp_path / "out" / REPORT_FILE).read_text())["tensors"]
    merged = load_file(tmp_path / "out" / "model.safetensors")
    assert set(report) == set(merged)
    linear = report[DOWN.format(1)]
    assert linear["path"] == "importance"
    assert set(linear["models"]) == {str(p) for p in tiny_models.experts.values()}
    for entry in linear["models"].values():
        assert entry["kept_fraction"] == pytest.approx(0.3, abs=0.01)
        assert 0 < entry["relative_output_error"] < 1
    embedding = report["model.embed_tokens.weight"]
    assert (embedding["path"], embedding["kind"]) == ("tokens", "token embedding")
    assert (report["lm_head.weight"]["path"], report["lm_head.weight"]["kind"]) == (
        "importance",
        "output head",
    )
    norm = report["model.norm.weight"]  # trimmed by tau^2 x its channel energies
    assert (norm["path"], norm["kind"]) == ("norm", "norm or scale")
    for entry in norm["models"].values():
        assert entry["kept_fraction"] == pytest.approx(0.3, abs=0.05)
        assert 0 < entry["relative_output_error"] < 1
