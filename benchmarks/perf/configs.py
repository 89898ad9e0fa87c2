"""Merge configurations the parts run, as plain dicts (mergekit's YAML schema), and the
commands that run them."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from benchmarks.perf.measure import python_command
from mergekit_sparsegpt.methods.parameters import PREPASS_PARAMETERS

# What the plugin prints (unless --quiet) for each task its statistics cache served.
CACHE_HIT_MESSAGE = "from cache"
# ... for each cache entry it computed and wrote: a warm merge prints none.
COMPUTED_MESSAGE = "written to cache"
# ... once `calibrate` has every entry its config needs.
READY_MESSAGE = "Calibration statistics ready"
# What `mergekit-sparsegpt calibrate` imports before it reads any weight.
CALIBRATE_IMPORTS = (
    "import torch, transformers, mergekit, mergekit.merge, mergekit_sparsegpt, "
    "mergekit_sparsegpt.prepass.run, transformers.models.llama.modeling_llama"
)
DENSITY = 0.3  # of the trimming methods in the merge part and the single-model pre-passes


def check_served(stderr: str, entries: int, what: str) -> None:
    """A warm run's output (``stderr``): the cache served all ``entries`` and nothing was
    computed; raises naming ``what`` otherwise."""
    hits = stderr.count(CACHE_HIT_MESSAGE)
    if hits != entries or COMPUTED_MESSAGE in stderr:
        raise RuntimeError(f"{what} found {hits} of {entries} entries in the cache: not warm")


def prepass_default(name: str) -> Any:
    """The plugin's default for a pre-pass setting, read from its own parameter spec."""
    return next(spec.default for spec in PREPASS_PARAMETERS if spec.name == name)


def merge_config(
    method: str,
    base: Path,
    models: Mapping[Path, Mapping[str, Any]],
    shared: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A float32 ``merge_method`` config of ``models`` (path -> per-model parameters) on
    ``base``; ``shared`` becomes the top-level ``parameters:``."""
    config: dict[str, Any] = {
        "merge_method": method,
        "base_model": str(base),
        "models": [
            {"model": str(path), "parameters": dict(parameters)}
            for path, parameters in models.items()
        ],
        "dtype": "float32",  # the checkpoints are float32: no conversion in the timings
    }
    if shared:
        config["parameters"] = dict(shared)
    return config


def calibration_settings(samples: int, seq_len: int, cache_dir: Path) -> dict[str, Any]:
    """Top-level parameters of a plugin merge; the batch size stays at the plugin's default."""
    return {
        "calibration_samples": samples,
        "calibration_seq_len": seq_len,
        "cache_dir": str(cache_dir),
    }


def single_task_prepass_config(
    base: Path, task_model: Path, calibration: Path, settings: Mapping[str, Any]
) -> dict[str, Any]:
    """``sparsegpt_ties`` of one model on ``base``: exactly one calibration task, run through
    the base (the default ``hessian_source``)."""
    parameters = {"weight": 1.0, "density": DENSITY, "calibration": str(calibration)}
    return merge_config("sparsegpt_ties", base, {task_model: parameters}, settings)


def calibrate_command(config: Path) -> list[str]:
    """``mergekit-sparsegpt calibrate``: the pre-pass alone, filling the statistics cache."""
    return python_command(
        "-m", "mergekit_sparsegpt.integration.cli", "calibrate", str(config), "--lazy-unpickle"
    )


def stock_merge_command(config: Path, out: Path) -> list[str]:
    """mergekit's own ``mergekit-yaml``; the plugin's methods reach it through the start-up
    hook, as they do for a user."""
    return python_command(
        "-m",
        "mergekit.scripts.run_yaml",
        str(config),
        str(out),
        "--lazy-unpickle",
        "--random-seed",
        "0",
    )
