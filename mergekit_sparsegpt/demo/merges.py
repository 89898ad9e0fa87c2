"""The merges the demo compares, as mergekit YAML configs run through the stock CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from mergekit_sparsegpt.demo.build import Family

DENSITY = 0.3
WEIGHT = 1.0


class MergeFailed(RuntimeError):
    """mergekit-yaml exited non-zero; the message holds the tail of its output."""


def merge_configs(
    family: Family, calibration_samples: int, calibration_seq_len: int
) -> list[tuple[str, dict[str, Any]]]:
    """(name, config) of every merge, the stock reference first; add a method by appending here.

    Each method keeps its own defaults; every data-aware merge gets one calibration budget.
    """
    budget = {
        "calibration_samples": calibration_samples,
        "calibration_seq_len": calibration_seq_len,
    }
    configs = [("ties", _config("ties", family, density=True, calibration=False))]
    for method, density in (
        ("sparsegpt_ties", True),
        ("regmean", False),
        ("sparsegpt_regmean", True),
    ):
        config = _config(method, family, density=density, calibration=True)
        config["parameters"] = dict(budget)
        configs.append((method, config))
    return configs


def _config(method: str, family: Family, density: bool, calibration: bool) -> dict[str, Any]:
    models = []
    for name, path in family.experts.items():
        params: dict[str, Any] = {"density": DENSITY} if density else {}
        params["weight"] = WEIGHT
        if calibration:
            params["calibration"] = str(family.calibration[name])
        models.append({"model": str(path), "parameters": params})
    return {
        "merge_method": method,
        "base_model": str(family.base),
        "models": models,
        "dtype": "float32",  # the tiny models are trained in float32; keep the merge exact
        "tokenizer_source": "base",
    }


def write_config(config: dict[str, Any], path: Path) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def run_mergekit(
    config_path: Path, out_path: Path, timeout_s: float = 600, threads: int | None = None
) -> Path:
    """Run the stock ``mergekit-yaml`` CLI in a subprocess, offline; return ``out_path``.

    ``threads`` caps torch's threads in it, for merges run side by side.
    """
    cmd = [sys.executable, "-m", "mergekit.scripts.run_yaml", str(config_path), str(out_path)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        if "Unimplemented merge method" in tail:
            tail += "\n(hint: is mergekit-sparsegpt installed, e.g. `pip install -e .`, so its"
            tail += " start-up hook registers the sparsegpt_* methods in mergekit?)"
        raise MergeFailed(f"{' '.join(cmd)} exited {proc.returncode}:\n{tail}")
    return out_path
