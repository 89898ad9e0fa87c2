"""The stock `mergekit-yaml` CLI, in a subprocess, with the installed plugin."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from merge_configs import regmean_config, sparsegpt_config
from transformers import AutoModelForCausalLM

MERGEKIT_YAML = shutil.which("mergekit-yaml")
SPARSEGPT = shutil.which("mergekit-sparsegpt")
pytestmark = pytest.mark.skipif(
    not (MERGEKIT_YAML and SPARSEGPT) and not os.environ.get("CI"),
    reason="needs the package installed (pip install -e .)",
)


def _write_config(tiny_models, path: Path, method: str, density: float) -> Path:
    path.write_text(yaml.safe_dump(sparsegpt_config(tiny_models, method, density)))
    return path


def _run(*args: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MERGEKIT_SPARSEGPT_CACHE": str(cache)}
    env.pop("MERGEKIT_SPARSEGPT_DISABLE_AUTOLOAD", None)
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)


def _assert_loads_with_finite_logits(path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(path)
    logits = model(input_ids=torch.tensor([[1, 5, 9, 2]])).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("method", ["sparsegpt_ties", "sparsegpt_dare"])
def test_stock_cli_merges_and_second_run_reuses_cache(tiny_models, tmp_path, method):
    cache = tmp_path / "cache"
    config = _write_config(tiny_models, tmp_path / "a.yml", method, 0.3)
    first = _run(MERGEKIT_YAML, str(config), str(tmp_path / "out1"), cache=cache)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "Hessians of" in first.stderr
    # 14 decoder linears and lm_head; sparsegpt_dare merges lm_head by its stock rule.
    linears = 15 if method == "sparsegpt_ties" else 14
    assert f"Hessian importance: {linears} tensors" in first.stderr
    assert ("lm_head_statistics: false" in first.stderr) == (method == "sparsegpt_dare")
    assert "token-count importance: 1 tensors" in first.stderr
    # The summary by kind: the norms' default rule (sparsegpt_dare keeps its stock rule).
    if method == "sparsegpt_ties":
        assert "norm or scale: plain mean of the norm scales (norm_rule: mean) 5" in first.stderr
    else:
        assert "norm or scale: stock dare_linear 5 (norm_rule: stock)" in first.stderr
    assert f"stock {'ties' if method == 'sparsegpt_ties' else 'dare_linear'}" in first.stderr
    # sparsegpt_dare rescales its trimmed vectors: the magnitude trim it is compared with too.
    alike = "magnitude trimming at the same density: 0."
    assert alike in first.stderr
    assert (", both L1-rescaled" in first.stderr) == (method == "sparsegpt_dare")
    _assert_loads_with_finite_logits(tmp_path / "out1")
    assert len(list(cache.glob("*.safetensors"))) == 2

    config = _write_config(tiny_models, tmp_path / "b.yml", method, 0.6)
    second = _run(MERGEKIT_YAML, str(config), str(tmp_path / "out2"), cache=cache)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Hessians of" not in second.stderr
    assert second.stderr.count("from cache") == 2
    _assert_loads_with_finite_logits(tmp_path / "out2")


@pytest.mark.parametrize("method", ["regmean", "sparsegpt_regmean"])
def test_stock_cli_runs_regmean_and_second_run_reuses_cache(tiny_models, tmp_path, method):
    """regmean by default (the solved linears: one entry, reused by the same merge);
    sparsegpt_regmean with keep_statistics (every task's entry, reused with another alpha)."""
    kept = method == "sparsegpt_regmean"
    cache = tmp_path / "cache"
    config = tmp_path / "a.yml"
    config.write_text(yaml.safe_dump(regmean_config(tiny_models, method, keep_statistics=kept)))
    first = _run(MERGEKIT_YAML, str(config), str(tmp_path / "out1"), cache=cache)
    assert first.returncode == 0, first.stderr[-3000:]
    assert ("Hessians of" if kept else "Solved linears written to cache") in first.stderr
    assert "RegMean solve: 15 tensors" in first.stderr  # 14 decoder linears and lm_head
    assert "RegMean on token counts: 1 tensors" in first.stderr
    assert "task arithmetic x nongram_scale:" in first.stderr
    assert "how the RegMean systems were solved: cholesky" in first.stderr
    _assert_loads_with_finite_logits(tmp_path / "out1")
    assert len(list(cache.glob("*.safetensors"))) == (2 if kept else 1)

    shared = {"alpha": 0.5} if kept else {}
    again = regmean_config(tiny_models, method, keep_statistics=kept, **shared)
    config.write_text(yaml.safe_dump(again))
    second = _run(MERGEKIT_YAML, str(config), str(tmp_path / "out2"), cache=cache)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Hessians of" not in second.stderr and "written to cache" not in second.stderr
    assert second.stderr.count("from cache") == (2 if kept else 1)
    assert "RegMean solve: 15 tensors" in second.stderr
    _assert_loads_with_finite_logits(tmp_path / "out2")


def test_calibrate_fills_the_cache_for_a_later_merge(tiny_models, tmp_path):
    cache = tmp_path / "cache"
    config = _write_config(tiny_models, tmp_path / "a.yml", "sparsegpt_ties", 0.3)
    calibrate = _run(SPARSEGPT, "calibrate", str(config), cache=cache)
    assert calibrate.returncode == 0, calibrate.stderr[-3000:]
    assert len(list(cache.glob("*.safetensors"))) == 2
    assert not (tmp_path / "out").exists()
    merge = _run(MERGEKIT_YAML, str(config), str(tmp_path / "out"), cache=cache)
    assert merge.returncode == 0, merge.stderr[-3000:]
    assert "Hessians of" not in merge.stderr


def test_bad_input_fails_before_writing_output(tiny_models, tmp_path):
    cache = tmp_path / "cache"
    config = _write_config(tiny_models, tmp_path / "a.yml", "sparsegpt_ties", 0.3)
    text = config.read_text().replace(str(tiny_models.calibration["code"]), "missing.txt")
    config.write_text(text)
    result = _run(SPARSEGPT, "merge", str(config), str(tmp_path / "out"), cache=cache)
    assert result.returncode == 2
    assert "missing.txt" in result.stderr and "file not found" in result.stderr
    assert not (tmp_path / "out").exists()


def test_example_configs_are_valid(tiny_models, tmp_path):
    """Every shipped example names only known parameters and merges the demo layout."""
    examples = sorted((Path(__file__).parents[2] / "example_configs").glob("*.yml"))
    assert examples
    demo = tmp_path / "demo_out"
    demo.mkdir()
    for name, source in [
        ("base", tiny_models.base),
        ("expert_code", tiny_models.experts["code"]),
        ("expert_arithmetic", tiny_models.experts["arithmetic"]),
        ("calibration_code.txt", tiny_models.calibration["code"]),
        ("calibration_arithmetic.jsonl", tiny_models.calibration["arithmetic"]),
    ]:
        (demo / name).symlink_to(source)
    for example in examples:
        config = yaml.safe_load(example.read_text())
        config["parameters"].update(calibration_samples=8, calibration_seq_len=32)
        path = tmp_path / example.name
        path.write_text(yaml.safe_dump(config))
        result = subprocess.run(
            [sys.executable, "-m", "mergekit.scripts.run_yaml", str(path), f"out_{example.stem}"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            env={**os.environ, "MERGEKIT_SPARSEGPT_CACHE": str(tmp_path / "cache")},
            timeout=600,
        )
        assert result.returncode == 0, f"{example.name}: {result.stderr[-3000:]}"
