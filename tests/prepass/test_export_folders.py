"""Export statistics folders, merge from them with an empty cache, and refuse folders that do
not fit the merge, on tiny Llama models built by conftest."""

import copy
import json
import shutil
from pathlib import Path

import mergekit.merge
import pytest
import torch
from merge_configs import regmean_config, sparsegpt_config
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions
from safetensors.torch import load_file, save_file

from mergekit_sparsegpt.integration.registration import install
from mergekit_sparsegpt.prepass import task_statistics, tasks
from mergekit_sparsegpt.prepass.export_folders import export_statistics
from mergekit_sparsegpt.statistics.export import MANIFEST_FILE, read_manifest

install()

DOWN = "model.layers.0.mlp.down_proj.weight"
QUIET = MergeOptions(quiet=True)
MERGES = {
    "sparsegpt_ties, finetuned": lambda models: sparsegpt_config(
        models, importance="obs", hessian_source="finetuned"
    ),
    "sparsegpt_ties, base": lambda models: sparsegpt_config(
        models, importance="obs", hessian_source="base"
    ),
    "regmean, finetuned": lambda models: regmean_config(models, keep_statistics=True),
    # The folder keeps H only: compensation's factor is derived from it.
    "sparsegpt_ties, compensate": lambda models: sparsegpt_config(
        models, importance="sparsegpt", compensate=True, hessian_source="finetuned"
    ),
}


def _with_cache(config: dict, cache: Path) -> dict:
    config = copy.deepcopy(config)
    config["parameters"]["cache_dir"] = str(cache)
    return config


def _merge(config: dict, out: Path) -> None:
    mergekit.merge.run_merge(MergeConfiguration.model_validate(config), str(out), QUIET)


def _export(config: dict, directory: Path) -> dict[str, Path]:
    """The folders written, by the model they were written for (as the config spells it)."""
    folders = export_statistics(MergeConfiguration.model_validate(config), QUIET, directory)
    return {read_manifest(folder).model: folder for folder in folders}


def _from_folders(config: dict, folders: dict[str, Path], cache: Path) -> dict:
    config = _with_cache(config, cache)
    for entry in config["models"]:
        del entry["parameters"]["calibration"]
        entry["parameters"]["statistics"] = str(folders[entry["model"]])
    return config


def _no_work(monkeypatch) -> None:
    """Fail on any calibration work: reading a model's text or running a forward pass."""

    def refused(*args, **kwargs):
        raise AssertionError("calibration work ran")

    monkeypatch.setattr(task_statistics, "compute_statistics", refused)
    monkeypatch.setattr(tasks, "task_windows", refused)


@pytest.fixture(scope="module")
def exported(tiny_models, tmp_path_factory) -> dict[str, tuple[dict, dict[str, Path], Path]]:
    """Per merge: its config, its exported folders, and the merge calibrated directly."""
    root = tmp_path_factory.mktemp("exported")
    result = {}
    for index, (name, make) in enumerate(MERGES.items()):
        config = make(tiny_models)
        _merge(_with_cache(config, root / f"cache{index}"), root / f"direct{index}")
        folders = _export(_with_cache(config, root / f"export_cache{index}"), root / f"dir{index}")
        result[name] = (config, folders, root / f"direct{index}")
    return result


@pytest.mark.parametrize("merge", MERGES)
def test_merge_from_folders_with_an_empty_cache_is_the_calibrated_merge(
    exported, tmp_path, monkeypatch, merge
):
    config, folders, direct = exported[merge]
    _no_work(monkeypatch)
    _merge(_from_folders(config, folders, tmp_path / "cache"), tmp_path / "out")
    ours = load_file(tmp_path / "out" / "model.safetensors")
    theirs = load_file(direct / "model.safetensors")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    card = (tmp_path / "out" / "README.md").read_text()
    assert "256 (8 x 32)" in card and "statistics folder" in card


def test_a_merge_may_mix_a_folder_and_calibration(exported, tmp_path):
    config, folders, direct = exported["sparsegpt_ties, finetuned"]
    merge = _from_folders(config, folders, tmp_path / "cache")
    merge["models"][1] = {**config["models"][1]}  # calibrated, as in the direct merge
    _merge(merge, tmp_path / "out")
    ours = load_file(tmp_path / "out" / "model.safetensors")
    theirs = load_file(direct / "model.safetensors")
    assert all(torch.equal(ours[name], theirs[name]) for name in theirs)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1


def test_the_manifest_says_what_produced_the_statistics(exported, tiny_models):
    config, folders, _ = exported["sparsegpt_ties, base"]
    assert sorted(path.name for path in folders.values()) == sorted(
        Path(path).name for path in tiny_models.experts.values()
    )
    for entry in config["models"]:
        record = json.loads((folders[entry["model"]] / MANIFEST_FILE).read_text())
        assert record["forward_model"] == str(tiny_models.base)
        assert set(record["weights"]) == {"model", "forward_model"}
        assert record["calibration"]["source"] == entry["parameters"]["calibration"]
        assert (record["calibration"]["windows"], record["calibration"]["seq_len"]) == (8, 32)
        assert record["settings"]["hessian_source"] == "base"
        assert record["settings"]["dampening"] == 0.01
        assert len(record["tokenizer"]) == 64


def test_models_of_one_name_get_numbered_folders(tiny_models, tmp_path):
    config = sparsegpt_config(tiny_models, hessian_source="finetuned")
    for index, entry in enumerate(config["models"]):
        link = tmp_path / f"family{index}" / "expert"
        link.parent.mkdir()
        link.symlink_to(entry["model"])
        entry["model"] = str(link)
    folders = _export(_with_cache(config, tmp_path / "cache"), tmp_path / "dir")
    assert sorted(path.name for path in folders.values()) == ["expert", "expert-2"]
    assert sorted(p.name for p in (tmp_path / "dir").iterdir()) == ["expert", "expert-2"]


def _changed_copy(expert: str, tmp_path: Path) -> Path:
    changed = tmp_path / Path(expert).name  # the same name, other weights
    shutil.copytree(expert, changed)
    weights = load_file(changed / "model.safetensors")
    weights[DOWN] = weights[DOWN] * 1.01
    save_file(weights, changed / "model.safetensors", metadata={"format": "pt"})
    return changed


def _refused(config: dict, out: Path, monkeypatch, *messages: str) -> None:
    _no_work(monkeypatch)
    with pytest.raises(ValueError) as raised:
        _merge(config, out)
    for message in messages:
        assert message in str(raised.value), str(raised.value)
    assert not out.exists()


def test_a_folder_of_other_weights_is_refused_before_any_work(exported, tmp_path, monkeypatch):
    config, folders, _ = exported["sparsegpt_ties, finetuned"]
    changed = _changed_copy(config["models"][0]["model"], tmp_path)
    folder = folders[config["models"][0]["model"]]
    merge = _from_folders(config, folders, tmp_path / "cache")
    merge["models"][0]["model"] = str(changed)
    theirs = read_manifest(folder).weights["model"]
    _refused(
        merge,
        tmp_path / "out",
        monkeypatch,
        f"Model {changed}: statistics folder {folder} was computed from other weights",
        theirs,
        "give the model `calibration:` instead of `statistics:`",
    )


def test_a_folder_of_another_base_is_refused(exported, tmp_path, monkeypatch):
    config, folders, _ = exported["sparsegpt_ties, base"]
    changed = _changed_copy(config["base_model"], tmp_path)
    merge = _from_folders(config, folders, tmp_path / "cache")
    merge["base_model"] = str(changed)
    _refused(merge, tmp_path / "out", monkeypatch, f"other weights than {changed}'s")


@pytest.mark.parametrize(
    "setting, value, message",
    [
        ("dampening", 0.05, "was computed with dampening 0.01, this merge uses 0.05"),
        ("hessian_source", "base", "with hessian_source 'finetuned', this merge uses 'base'"),
    ],
)
def test_a_folder_of_other_settings_is_refused(
    exported, tmp_path, monkeypatch, setting, value, message
):
    config, folders, _ = exported["sparsegpt_ties, finetuned"]
    merge = _from_folders(config, folders, tmp_path / "cache")
    merge["parameters"][setting] = value
    _refused(merge, tmp_path / "out", monkeypatch, message, f"Set {setting}:")


def test_regmean_plus_plus_refuses_folders(exported, tmp_path, monkeypatch):
    config, folders, _ = exported["regmean, finetuned"]
    merge = _from_folders(config, folders, tmp_path / "cache")
    del merge["parameters"]["hessian_source"]  # regmean's default: merged
    del merge["parameters"]["keep_statistics"]
    _refused(merge, tmp_path / "out", monkeypatch, "has `statistics:`, but hessian_source: merged")


def test_regmean_plus_plus_is_not_exported(tiny_models, tmp_path, monkeypatch):
    config = regmean_config(tiny_models, cache_dir=str(tmp_path / "cache"))
    del config["parameters"]["hessian_source"]
    _no_work(monkeypatch)
    with pytest.raises(ValueError, match="cannot be exported.*hessian_source: finetuned or base"):
        _export(config, tmp_path / "dir")
    assert not (tmp_path / "dir").exists() and not (tmp_path / "cache").exists()


def test_both_calibration_and_statistics_is_refused(exported, tmp_path, monkeypatch):
    config, folders, _ = exported["sparsegpt_ties, finetuned"]
    merge = _from_folders(config, folders, tmp_path / "cache")
    merge["models"][0]["parameters"]["calibration"] = config["models"][0]["parameters"][
        "calibration"
    ]
    model = merge["models"][0]["model"]
    _refused(merge, tmp_path / "out", monkeypatch, f"Model {model} has both")


def test_a_missing_folder_is_one_clear_error(exported, tmp_path, monkeypatch):
    config, folders, _ = exported["sparsegpt_ties, finetuned"]
    merge = _from_folders(config, folders, tmp_path / "cache")
    merge["models"][1]["parameters"]["statistics"] = str(tmp_path / "nowhere")
    _refused(merge, tmp_path / "out", monkeypatch, f"{tmp_path / 'nowhere'} does not exist")


def test_an_export_into_a_foreign_folder_is_refused_before_any_work(
    tiny_models, tmp_path, monkeypatch
):
    config = sparsegpt_config(tiny_models, hessian_source="finetuned")
    name = Path(config["models"][0]["model"]).name
    (tmp_path / "dir" / name).mkdir(parents=True)
    _no_work(monkeypatch)
    with pytest.raises(ValueError, match="is not a statistics folder"):
        _export(_with_cache(config, tmp_path / "cache"), tmp_path / "dir")
