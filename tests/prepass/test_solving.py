"""RegMean's default storage: the solved linears, one entry per merge, against the per-task
storage (``keep_statistics: true``, the reference), for every Hessian source and method."""

import json
import shutil
from pathlib import Path

import mergekit.merge
import pytest
import torch
from merge_configs import regmean_config
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mergekit_sparsegpt.capture import lockstep
from mergekit_sparsegpt.integration.registration import install
from mergekit_sparsegpt.prepass import merged_source, solving
from mergekit_sparsegpt.trim.metrics import REPORT_FILE

install()

LINEAR_SUFFIXES = ("_proj.weight",)  # a tiny Llama's decoder linears
# Solved by the pre-pass besides them: the head (its Hessian), the embedding (token counts) and
# the norms (channel energies).
TOKEN_TENSORS = ("lm_head.weight", "model.embed_tokens.weight", "model.norm.weight")


def _run(config: dict, out: Path, quiet: bool = True) -> None:
    mergekit.merge.run_merge(
        MergeConfiguration.model_validate(config), str(out), MergeOptions(quiet=quiet)
    )


def _entries(cache: Path) -> list[Path]:
    return sorted(cache.glob("*.safetensors"))


def _is_solved(name: str) -> bool:
    in_blocks = LINEAR_SUFFIXES + ("layernorm.weight",)
    return (".layers." in name and name.endswith(in_blocks)) or name in TOKEN_TENSORS


def _config(tiny_models, method: str, source: str, cache: Path, **shared) -> dict:
    return regmean_config(
        tiny_models, method, hessian_source=source, cache_dir=str(cache), **shared
    )


CASES = [
    ("regmean", "finetuned"),
    ("regmean", "base"),
    ("regmean", "merged"),
    ("sparsegpt_regmean", "finetuned"),
    ("sparsegpt_regmean", "merged"),
]


@pytest.mark.parametrize(("method", "source"), CASES)
def test_solved_linears_give_the_per_task_merge(tiny_models, tmp_path, method, source):
    _run(
        _config(tiny_models, method, source, tmp_path / "kept", keep_statistics=True),
        tmp_path / "a",
    )
    _run(_config(tiny_models, method, source, tmp_path / "solved"), tmp_path / "b")
    kept = load_file(tmp_path / "a" / "model.safetensors")
    solved = load_file(tmp_path / "b" / "model.safetensors")
    assert set(solved) == set(kept)
    for name, value in kept.items():
        torch.testing.assert_close(solved[name], value, rtol=1e-5, atol=1e-6, msg=name)
    # The report says the same about every tensor (solve paths, trim details).
    report_a = json.loads((tmp_path / "a" / REPORT_FILE).read_text())["tensors"]
    report_b = json.loads((tmp_path / "b" / REPORT_FILE).read_text())["tensors"]
    assert report_b == report_a

    # One entry: exactly the merged linears, norms, head and embedding, in the merge's dtype.
    (entry,) = _entries(tmp_path / "solved")
    with safe_open(entry, framework="pt") as handle:
        stored = {name: handle.get_tensor(name) for name in handle.keys()}
    assert set(stored) == {name for name in kept if _is_solved(name)}
    for name, value in stored.items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, solved[name], rtol=0, atol=0, msg=name)


def _third_expert(tiny_models, root: Path) -> Path:
    """A copy of the code expert with other weights: a third model of the same family."""
    path = root / "third"
    shutil.copytree(tiny_models.experts["code"], path)
    weights = load_file(path / "model.safetensors")
    generator = torch.Generator().manual_seed(3)
    moved = {n: t + 1e-2 * torch.randn(t.shape, generator=generator) for n, t in weights.items()}
    save_file(moved, path / "model.safetensors", metadata={"format": "pt"})
    return path


def test_storage_does_not_grow_with_the_number_of_experts(tiny_models, tmp_path):
    sizes = {}
    for experts in (2, 3):
        config = _config(tiny_models, "regmean", "finetuned", tmp_path / f"cache{experts}")
        if experts == 3:
            extra = dict(config["models"][0], model=str(_third_expert(tiny_models, tmp_path)))
            config["models"].append(extra)
        _run(config, tmp_path / f"out{experts}")
        (entry,) = _entries(tmp_path / f"cache{experts}")
        sizes[experts] = entry.stat().st_size
    merged = load_file(tmp_path / "out2" / "model.safetensors")
    solved_bytes = sum(t.numel() * t.element_size() for n, t in merged.items() if _is_solved(n))
    assert solved_bytes <= sizes[2] <= solved_bytes + 64 * 1024  # the header and its records
    assert abs(sizes[3] - sizes[2]) <= 1024  # the records name one more model


def test_entry_is_in_the_output_dtype(tiny_models, tmp_path):
    config = _config(tiny_models, "regmean", "base", tmp_path / "cache")
    config["out_dtype"] = "bfloat16"
    _run(config, tmp_path / "out")
    (entry,) = _entries(tmp_path / "cache")
    with safe_open(entry, framework="pt") as handle:
        dtypes = {handle.get_slice(name).get_dtype() for name in handle.keys()}
    assert dtypes == {"BF16"}
    merged = load_file(tmp_path / "out" / "model.safetensors")
    assert merged["model.layers.0.mlp.down_proj.weight"].dtype == torch.bfloat16


def test_warm_rerun_solves_nothing_and_other_weights_recompute(tiny_models, tmp_path, monkeypatch):
    calls = []
    original = lockstep.capture_lockstep_hessians

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(solving, "capture_lockstep_hessians", counting)
    config = _config(tiny_models, "regmean", "finetuned", tmp_path / "cache")
    _run(config, tmp_path / "first")
    _run(config, tmp_path / "second")
    assert len(calls) == 1
    first = load_file(tmp_path / "first" / "model.safetensors")
    second = load_file(tmp_path / "second" / "model.safetensors")
    for name, value in first.items():
        assert torch.equal(second[name], value), name
    config["models"][0]["parameters"]["weight"] = 0.5  # the solve depends on every weight
    _run(config, tmp_path / "third")
    assert len(calls) == 2
    assert len(_entries(tmp_path / "cache")) == 2


def test_damaged_entry_is_recomputed_with_a_warning(tiny_models, tmp_path, caplog):
    config = _config(tiny_models, "regmean", "base", tmp_path / "cache")
    _run(config, tmp_path / "first")
    (entry,) = _entries(tmp_path / "cache")
    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])
    _run(config, tmp_path / "second")
    assert "Ignoring statistics cache" in caplog.text
    first = load_file(tmp_path / "first" / "model.safetensors")
    second = load_file(tmp_path / "second" / "model.safetensors")
    for name, value in first.items():
        assert torch.equal(second[name], value), name


def test_slices_with_layer_offsets_keep_every_tasks_statistics(tiny_models, tmp_path, capsys):
    sources = [
        {"model": str(tiny_models.experts[name]), "layer_range": [0, 1], "parameters": params}
        for name, params in (
            ("code", {"weight": 1.0, "calibration": str(tiny_models.calibration["code"])}),
            (
                "arithmetic",
                {"weight": 1.0, "calibration": str(tiny_models.calibration["arithmetic"])},
            ),
        )
    ]
    sources[1]["layer_range"] = [1, 2]  # layer 0 of the merge comes from its layer 1
    base = {"model": str(tiny_models.base), "layer_range": [0, 1]}
    config = {
        "merge_method": "regmean",
        "base_model": str(tiny_models.base),
        "slices": [{"sources": [*sources, base]}],
        "parameters": {
            "calibration_samples": 8,
            "calibration_seq_len": 32,
            "hessian_source": "finetuned",
            "cache_dir": str(tmp_path / "cache"),
        },
        "dtype": "float32",
    }
    _run(config, tmp_path / "out", quiet=False)
    assert "not the solved linears" in capsys.readouterr().err
    assert len(_entries(tmp_path / "cache")) == 2  # one per task


def test_merged_source_still_builds_its_merge_once(tiny_models, tmp_path, monkeypatch):
    calls = []
    original = merged_source.capture_merged_hessians

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(merged_source, "capture_merged_hessians", counting)
    config = _config(tiny_models, "regmean", "merged", tmp_path / "cache")
    _run(config, tmp_path / "first")
    _run(config, tmp_path / "second")
    assert len(calls) == 1
    assert len(_entries(tmp_path / "cache")) == 1


def test_every_tasks_cached_statistics_serve_instead_of_solving_again(
    tiny_models, tmp_path, monkeypatch, capsys
):
    """As after `calibrate` under torchrun (which keeps every task's statistics): the merge
    reads them instead of running the solving pass."""
    calls = []
    original = solving.capture_lockstep_hessians
    monkeypatch.setattr(
        solving,
        "capture_lockstep_hessians",
        lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs),
    )
    kept = _config(tiny_models, "regmean", "finetuned", tmp_path / "cache", keep_statistics=True)
    _run(kept, tmp_path / "kept")
    _run(
        _config(tiny_models, "regmean", "finetuned", tmp_path / "cache"),
        tmp_path / "default",
        quiet=False,
    )
    assert calls == []
    assert "Every task's statistics are in the cache: merging from them" in capsys.readouterr().err
    first = load_file(tmp_path / "kept" / "model.safetensors")
    second = load_file(tmp_path / "default" / "model.safetensors")
    assert all(torch.equal(second[name], value) for name, value in first.items())


@pytest.mark.parametrize("source", ["finetuned", "merged"])
def test_the_host_memory_of_the_activations_is_said(tiny_models, tmp_path, capsys, source):
    config = _config(tiny_models, "regmean", source, tmp_path / "cache")
    _run(config, tmp_path / "out", quiet=False)
    err = capsys.readouterr().err
    # 2 tasks x 8 windows x 32 tokens x hidden, float32
    hidden = json.loads((Path(tiny_models.base) / "config.json").read_text())["hidden_size"]
    size = 2 * 8 * 32 * hidden * 4
    assert (
        f"activations are held on the host: {size / 2**30:.2f} GiB ({size:,} bytes, 2 tasks)" in err
    )
