"""Issue "Memory that does not grow with depth": the pre-pass's peak memory at each depth.

Each repeat runs ``mergekit-sparsegpt calibrate`` (as
``python -m mergekit_sparsegpt.integration.cli``) on a one-model ``sparsegpt_ties`` config with
an empty cache directory, in a fresh subprocess, and records its peak resident set and wall
time. A subprocess that only imports torch,
transformers, mergekit and the plugin gives the interpreter's fixed overhead, from which the
predicted bound is

    fixed overhead + one decoder block + one copy of the calibration activations
    + one block's Hessians + the widest Hessian group's factorisation + one batch's temporaries

all float32, from the config's sizes. One more ``calibrate`` on a warm cache (no weights read,
no forward pass) shows what planning and tokenizing add to the imports.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoConfig

from benchmarks.perf import formulas
from benchmarks.perf.configs import (
    CALIBRATE_IMPORTS,
    READY_MESSAGE,
    calibrate_command,
    calibration_settings,
    check_served,
    prepass_default,
    single_task_prepass_config,
)
from benchmarks.perf.measure import (
    MeasuredRun,
    benchmark_env,
    fresh_directory,
    median,
    python_command,
    run_measured,
)
from benchmarks.perf.models import Checkpoints
from benchmarks.perf.report import PartResult, ratio, seconds, size
from mergekit_sparsegpt.demo.merges import write_config
from mergekit_sparsegpt.trim.importance import DEFAULT_IMPORTANCE

PART = "depth"
TITLE = "Memory that does not grow with depth: pre-pass peak RSS per depth"
TARGET_GROWTH = 1.15  # deepest / shallowest peak
TARGET_MODEL_FRACTION = 0.40  # peak / float32 model size


@dataclass(frozen=True)
class DepthRuns:
    """The repeats at one depth."""

    depth: int
    runs: list[MeasuredRun]
    model_bytes: int

    @property
    def peak_bytes(self) -> float:
        return median([run.peak_rss_bytes for run in self.runs])

    @property
    def wall_s(self) -> float:
        return median([run.wall_s for run in self.runs])

    def sampled_peak(self, field: str) -> float:
        return median([run.sampled_peak_bytes.get(field, 0) for run in self.runs])


def run(
    checkpoints: Checkpoints,
    repeats: int,
    threads: int,
    work: Path,
    importance: str | None = None,
) -> PartResult:
    """``importance``: the configs' (default: the plugin's, whose pre-pass accumulates diag H
    alone; ``obs`` accumulates whole Hessians)."""
    env = benchmark_env(threads)
    overhead = run_measured(python_command("-c", CALIBRATE_IMPORTS), env)
    depths = [
        DepthRuns(
            depth,
            [
                calibrate_once(checkpoints, depth, work / PART / f"L{depth}", env, importance)
                for _ in range(repeats)
            ],
            formulas.model_bytes(_shape(checkpoints, depth)),
        )
        for depth in checkpoints.sizes.depths
    ]
    # The shallowest depth's last config again: its cache entry exists, so this run only
    # imports, plans and tokenizes; what separates it from the imports-only run is that work.
    warm = calibrate_warm(work / PART / f"L{depths[0].depth}", env)
    result = summarize(checkpoints, depths, overhead, warm, threads)
    result.data["importance"] = importance or DEFAULT_IMPORTANCE
    return result


def calibrate_once(
    checkpoints: Checkpoints,
    depth: int,
    work_dir: Path,
    env: dict[str, str],
    importance: str | None = None,
) -> MeasuredRun:
    """One ``calibrate`` subprocess with an empty cache; checks it wrote one entry."""
    sizes = checkpoints.sizes
    cache_dir = fresh_directory(work_dir / "cache")
    settings = calibration_settings(sizes.calibration_samples, sizes.calibration_seq_len, cache_dir)
    if importance is not None:
        settings["importance"] = importance
    config = single_task_prepass_config(
        checkpoints.base(depth),
        checkpoints.task_alias(depth),
        checkpoints.calibration_text,
        settings,
    )
    config_path = write_config(config, work_dir / "config.yml")
    measured = run_measured(calibrate_command(config_path), env)
    entries = list(cache_dir.glob("*.safetensors"))
    if READY_MESSAGE not in measured.stderr or len(entries) != 1:
        raise RuntimeError(f"calibrate at depth {depth} wrote {len(entries)} cache entries")
    return measured


def calibrate_warm(work_dir: Path, env: dict[str, str]) -> MeasuredRun:
    """``calibrate`` of ``work_dir``'s config once more; it must be served by the cache."""
    measured = run_measured(calibrate_command(work_dir / "config.yml"), env)
    check_served(measured.stderr, 1, f"calibrate of {work_dir / 'config.yml'}")
    return measured


def _shape(checkpoints: Checkpoints, depth: int) -> formulas.LlamaShape:
    return formulas.LlamaShape.from_config(AutoConfig.from_pretrained(checkpoints.base(depth)))


def predicted_bound(
    shape: formulas.LlamaShape, samples: int, seq_len: int, overhead_bytes: int, batch: int
) -> dict[str, int]:
    """The terms of the bound the issue states, plus the two working sets it leaves out (the
    widest Hessian group's factorisation and one batch's temporaries), and their sum."""
    terms = {
        "fixed_overhead": overhead_bytes,
        "decoder_block": formulas.block_bytes(shape),
        "activations": formulas.activation_bytes(shape, samples, seq_len),
        "block_hessians": formulas.block_hessian_bytes(shape),
        "factorisation": formulas.factorisation_bytes(shape),
        "batch_temporaries": formulas.batch_temporary_bytes(shape, batch, seq_len),
    }
    return {**terms, "total": sum(terms.values())}


def summarize(
    checkpoints: Checkpoints,
    depths: list[DepthRuns],
    overhead: MeasuredRun,
    warm: MeasuredRun,
    threads: int,
) -> PartResult:
    sizes = checkpoints.sizes
    shallowest, deepest = depths[0], depths[-1]
    bound = predicted_bound(
        _shape(checkpoints, deepest.depth),
        sizes.calibration_samples,
        sizes.calibration_seq_len,
        overhead.peak_rss_bytes,
        prepass_default("calibration_batch_size"),
    )
    result = PartResult(PART, TITLE)
    for runs in depths:
        _add_depth_rows(result, runs, shallowest, bound["total"], deepest=runs is deepest)
    result.add(
        "fixed overhead (imports only)",
        size(overhead.peak_rss_bytes),
        f"L{deepest.depth} peak",
        ratio(overhead.peak_rss_bytes, deepest.peak_bytes),
    )
    result.add(
        f"calibrate, warm cache (no forward), L{shallowest.depth}",
        size(warm.peak_rss_bytes),
        f"imports only {size(overhead.peak_rss_bytes)}",
        ratio(warm.peak_rss_bytes, overhead.peak_rss_bytes),
    )
    imports_file_backed = overhead.peak_file_backed_bytes
    result.add(
        f"file-backed RSS, L{deepest.depth}",
        size(deepest.sampled_peak("RssFile")),
        f"imports only {size(imports_file_backed)}",
        ratio(deepest.sampled_peak("RssFile"), imports_file_backed),
    )
    result.data = {
        "threads": threads,
        "calibration_samples": sizes.calibration_samples,
        "calibration_seq_len": sizes.calibration_seq_len,
        "predicted_bound_bytes": bound,
        "fixed_overhead": _run_data(overhead),
        "warm_cache_calibrate": _run_data(warm),
        "depths": {runs.depth: _depth_data(runs) for runs in depths},
    }
    result.notes = _notes(sizes.calibration_samples, sizes.calibration_seq_len, bound)
    return result


def _add_depth_rows(
    result: PartResult, runs: DepthRuns, shallowest: DepthRuns, bound_bytes: int, deepest: bool
) -> None:
    name = f"L{runs.depth}"
    peak = runs.peak_bytes
    result.add(
        f"peak RSS, {name}",
        size(peak),
        f"fp32 model {size(runs.model_bytes)}",
        ratio(peak, runs.model_bytes),
        # The issue sets this target for its deepest (1.4 B) model; a shallow model's fixed
        # costs are a larger share of its size by design.
        below=TARGET_MODEL_FRACTION if deepest else None,
    )
    result.add(
        f"peak RSS, {name}",
        size(peak),
        f"predicted bound {size(bound_bytes)}",
        ratio(peak, bound_bytes),
        at_most=1.0,
    )
    if runs is shallowest:
        return
    result.add(
        f"peak RSS, {name}",
        size(peak),
        f"L{shallowest.depth} {size(shallowest.peak_bytes)}",
        ratio(peak, shallowest.peak_bytes),
        at_most=TARGET_GROWTH,
    )
    result.add(
        f"wall time, {name}",
        seconds(runs.wall_s),
        f"L{shallowest.depth} {seconds(shallowest.wall_s)}",
        ratio(runs.wall_s, shallowest.wall_s),
    )


def _run_data(run: MeasuredRun) -> dict[str, Any]:
    return {
        "wall_s": run.wall_s,
        "peak_rss_bytes": run.peak_rss_bytes,
        "sampled_peak_bytes": run.sampled_peak_bytes,
    }


def _depth_data(runs: DepthRuns) -> dict[str, Any]:
    return {
        "model_bytes": runs.model_bytes,
        "median_peak_rss_bytes": runs.peak_bytes,
        "median_wall_s": runs.wall_s,
        "runs": [_run_data(run) for run in runs.runs],
    }


def _notes(samples: int, seq_len: int, bound: dict[str, int]) -> list[str]:
    terms = ", ".join(f"{name} {size(value)}" for name, value in bound.items() if name != "total")
    return [
        "each depth: `python -m mergekit_sparsegpt.integration.cli calibrate CONFIG "
        f"--lazy-unpickle` in a fresh subprocess, empty cache, {samples} x {seq_len} "
        "calibration tokens; medians of the repeats; peak RSS = the child's ru_maxrss "
        "(file-backed pages included)",
        f"predicted bound = {terms}; it counts one copy of the activations, and the plugin's "
        f"default batch of {prepass_default('calibration_batch_size')}",
        "file-backed RSS is sampled from /proc every 20 ms: shared libraries (libtorch) and "
        "the memory-mapped safetensors shard being read; what exceeds the imports-only run's "
        "is shard pages, which the kernel can drop under memory pressure",
    ]
