"""Relative model directories shaped like hub ids ('base', 'fam/base') merge as local files."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from merge_configs import sparsegpt_config
from mergekit.common import ModelReference
from mergekit.config import MergeConfiguration

from mergekit_sparsegpt.prepass.local_paths import read_as_repo_id, spelled_as_local


def _layout(tiny_models, root: Path) -> None:
    (root / "fam").mkdir()
    (root / "fam" / "base").symlink_to(tiny_models.base)
    (root / "expert_code").symlink_to(tiny_models.experts["code"])
    (root / "fam" / "expert_arithmetic").symlink_to(tiny_models.experts["arithmetic"])


def _relative_config(tiny_models) -> dict:
    config = sparsegpt_config(tiny_models)
    config["base_model"] = "fam/base"
    config["models"][0]["model"] = "fam/expert_arithmetic"
    config["models"][1]["model"] = "expert_code"
    config["tokenizer_source"] = "base"
    return config


def test_read_as_repo_id_matches_mergekits_card_rule(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for directory in ("a", "org/name", "x/y/z", ".hidden"):
        (tmp_path / directory).mkdir(parents=True)
    assert read_as_repo_id("a") and read_as_repo_id("org/name")
    # mergekit.card.is_hf treats these as local without asking the hub.
    assert not read_as_repo_id("x/y/z")
    assert not read_as_repo_id(str(tmp_path / "a"))
    assert not read_as_repo_id("./a") and not read_as_repo_id("./org/name")
    # A name that is not on disk is a hub id the user meant: left alone.
    assert not read_as_repo_id("meta-llama/Llama-2-7b-hf")


def test_spelled_as_local_rewrites_every_reference_once(tiny_models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _layout(tiny_models, tmp_path)
    config = _relative_config(tiny_models)
    config["models"].append({"model": "expert_code+fam/base", "parameters": {"weight": 0.5}})
    config["models"].append({"model": "org/remote", "parameters": {"weight": 0.5}})
    said: list[str] = []
    result = spelled_as_local(MergeConfiguration.model_validate(config), said.append)
    models = [str(entry.model) for entry in result.models]
    assert models == [
        "./fam/expert_arithmetic",
        "./expert_code",
        "./expert_code+./fam/base",
        "org/remote",
    ]
    assert result.base_model == ModelReference.model_validate("./fam/base")
    assert result.models[0].parameters == config["models"][0]["parameters"]
    assert result.tokenizer_source == "base" and result.dtype == "float32"
    assert len(said) == 3, said  # one line per path, not per reference
    assert any("'fam/base'" in line and "'./fam/base'" in line for line in said)
    # Nothing to rewrite: the very same config comes back.
    absolute = MergeConfiguration.model_validate(sparsegpt_config(tiny_models))
    assert spelled_as_local(absolute, said.append) is absolute


def test_stock_cli_merges_relative_hub_shaped_paths_offline(tiny_models, tmp_path):
    _layout(tiny_models, tmp_path)
    (tmp_path / "merge.yml").write_text(yaml.safe_dump(_relative_config(tiny_models)))
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "MERGEKIT_SPARSEGPT_CACHE": str(tmp_path / "cache"),
    }
    env.pop("MERGEKIT_SPARSEGPT_DISABLE_AUTOLOAD", None)

    def run(*command: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", *command],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )

    calibrate = run("mergekit_sparsegpt.integration.cli", "calibrate", "merge.yml")
    assert calibrate.returncode == 0, calibrate.stderr[-3000:]
    assert "'./fam/base'" in calibrate.stderr
    result = run("mergekit.scripts.run_yaml", "merge.yml", "out")
    assert result.returncode == 0, result.stderr[-3000:]
    # The merge spells the models as calibrate did, so it finds calibrate's statistics.
    assert "Hessians of" not in result.stderr and "from cache" in result.stderr
    assert "Model path 'fam/base' is a local directory" in result.stderr
    assert "'./fam/base'" in result.stderr
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Data-aware merge" in card
    assert (tmp_path / "out" / "mergekit_config.yml").read_text() == (
        tmp_path / "merge.yml"
    ).read_text()


def test_stock_mergekit_itself_fails_on_such_a_path_offline(tmp_path, monkeypatch):
    """Why the rewrite exists: mergekit's card asks the hub about an existing 'org/name' path.
    If a later mergekit stops doing so, this fails and the rewrite can go."""
    from huggingface_hub.errors import OfflineModeIsEnabled
    from mergekit import card

    path = "fam/base"
    monkeypatch.chdir(tmp_path)
    (tmp_path / path).mkdir(parents=True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(OfflineModeIsEnabled):
        card.is_hf(path)
    assert card.is_hf("./" + path) is False
