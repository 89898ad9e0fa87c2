"""Issue "Merge phase" and the RegMean cost: merges through the stock CLI with a warm cache.

On the shallowest base with two experts, the statistics cache of each plugin method is filled
first by ``mergekit-sparsegpt calibrate`` (timed once, as the pre-pass). Then every repeat runs
``python -m mergekit.scripts.run_yaml CONFIG OUT --lazy-unpickle --random-seed 0`` for each
method in turn, in a fresh subprocess: ``ties`` (the reference), ``sparsegpt_ties``,
``regmean`` and ``sparsegpt_regmean``. Each method has a cache directory of its own, so an entry
holding more matrices cannot serve a method that needs fewer and blur the sizes.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoConfig

from benchmarks.perf import formulas, projection
from benchmarks.perf.configs import (
    CACHE_HIT_MESSAGE,
    DENSITY,
    calibrate_command,
    calibration_settings,
    merge_config,
    stock_merge_command,
)
from benchmarks.perf.measure import (
    MeasuredRun,
    benchmark_env,
    directory_bytes,
    fresh_directory,
    median,
    run_measured,
)
from benchmarks.perf.models import Checkpoints
from benchmarks.perf.report import PartResult, ratio, seconds, size
from mergekit_sparsegpt.demo.merges import write_config
from mergekit_sparsegpt.methods.registry import is_plugin_method, plugin_method

PART = "merge"
TITLE = "Merge phase: stock ties vs the plugin's methods with a warm cache"
REFERENCE = "ties"
# "regmean[merged]": regmean with hessian_source: merged (RegMean++), whose pre-pass merges too.
METHODS = (REFERENCE, "sparsegpt_ties", "regmean", "sparsegpt_regmean", "regmean[merged]")
MERGED_SUFFIX = "[merged]"
TRIMMING_METHODS = frozenset({"ties", "sparsegpt_ties", "sparsegpt_regmean"})
TARGET_OVER_TIES = {"sparsegpt_ties": 1.15}
SAFETENSORS_HEADER_LENGTH_BYTES = 8


@dataclass(frozen=True)
class CacheContents:
    """What a pre-pass left in its cache directory."""

    entries: int
    total_bytes: int
    data_bytes: int  # tensor data without the safetensors headers

    @property
    def bytes_per_entry(self) -> float:
        return self.total_bytes / self.entries

    @property
    def data_bytes_per_entry(self) -> float:
        return self.data_bytes / self.entries


def method_name(label: str) -> str:
    """The merge method of a row label ("regmean[merged]" -> "regmean")."""
    return label.removesuffix(MERGED_SUFFIX)


def solves_in_prepass(method: str) -> bool:
    """RegMean's methods cache one entry per merge (the solved linears), not one per task."""
    return method_name(method) in projection.REGMEAN_METHODS


def expected_entries(method: str, tasks: int) -> int:
    return 1 if solves_in_prepass(method) else tasks


def keeps_matrices(method: str) -> tuple[bool, bool]:
    """(whole Hessians, whole Cholesky factors) a method's cache entries hold at its defaults."""
    spec = plugin_method(method_name(method))
    defaults = {parameter.name: parameter.default for parameter in spec.spec.parameters}
    return spec.keeps_hessians, bool(defaults.get("compensate", False))


def method_config(
    method: str, checkpoints: Checkpoints, experts: dict[str, Path], cache_dir: Path
) -> dict[str, Any]:
    """Weights 1/2 for the TIES methods and 1 for RegMean's, density 0.3 where it trims."""
    weight = 1.0 if "regmean" in method else 1.0 / len(experts)
    calibrated = is_plugin_method(method_name(method))
    models = {}
    for domain, path in experts.items():
        parameters: dict[str, Any] = {"weight": weight}
        if method in TRIMMING_METHODS:
            parameters["density"] = DENSITY
        if calibrated:
            parameters["calibration"] = str(checkpoints.expert_calibration_text(domain))
        models[path] = parameters
    sizes = checkpoints.sizes
    shared = (
        calibration_settings(sizes.merge_calibration_samples, sizes.calibration_seq_len, cache_dir)
        if calibrated
        else None
    )
    if shared is not None and method.endswith(MERGED_SUFFIX):
        shared["hessian_source"] = "merged"
    return merge_config(method_name(method), checkpoints.base(sizes.shallowest), models, shared)


def run(
    checkpoints: Checkpoints,
    experts: dict[str, Path],
    repeats: int,
    threads: int,
    work: Path,
) -> PartResult:
    env = benchmark_env(threads)
    part_dir = work / PART
    configs, prepasses, caches = {}, {}, {}
    for method in METHODS:
        cache_dir = part_dir / "cache" / method
        config = method_config(method, checkpoints, experts, cache_dir)
        configs[method] = write_config(config, fresh_directory(part_dir / method) / "config.yml")
        if is_plugin_method(method_name(method)):
            fresh_directory(cache_dir)
            prepasses[method] = calibrate(configs[method], env)
            caches[method] = cache_contents(cache_dir, expected_entries(method, len(experts)))
    merges: dict[str, list[MeasuredRun]] = {method: [] for method in METHODS}
    for _ in range(repeats):
        for method in METHODS:  # interleaved, so that drift in machine load hits every method
            merges[method].append(
                merge_once(method, configs[method], part_dir / "out", env, len(experts))
            )
    shape = formulas.LlamaShape.from_config(
        AutoConfig.from_pretrained(checkpoints.base(checkpoints.sizes.shallowest))
    )
    return summarize(merges, prepasses, caches, shape, checkpoints, threads)


def calibrate(config: Path, env: dict[str, str]) -> MeasuredRun:
    """Fill the method's cache with ``mergekit-sparsegpt calibrate``, measured."""
    return run_measured(calibrate_command(config), env)


def merge_once(
    method: str, config: Path, out_root: Path, env: dict[str, str], tasks: int
) -> MeasuredRun:
    """One stock-CLI merge; a plugin method must have found every task in the cache."""
    out = out_root / method
    shutil.rmtree(out, ignore_errors=True)
    measured = run_measured(stock_merge_command(config, out), env)
    shutil.rmtree(out, ignore_errors=True)  # checkpoints are large; only the timing is kept
    hits, entries = measured.stderr.count(CACHE_HIT_MESSAGE), expected_entries(method, tasks)
    if is_plugin_method(method_name(method)) and hits != entries:
        raise RuntimeError(f"{method} found {hits} of {entries} entries in the cache: not warm")
    return measured


def cache_contents(cache_dir: Path, expected_entries: int) -> CacheContents:
    entries = sorted(cache_dir.glob("*.safetensors"))
    if len(entries) != expected_entries:
        raise RuntimeError(f"{cache_dir} holds {len(entries)} entries, not {expected_entries}")
    return CacheContents(
        entries=len(entries),
        total_bytes=directory_bytes(cache_dir, "*.safetensors"),
        data_bytes=sum(entry_data_bytes(entry) for entry in entries),
    )


def entry_data_bytes(path: Path) -> int:
    """A safetensors file's tensor data: its size less the length prefix and JSON header."""
    with open(path, "rb") as handle:
        header = int.from_bytes(handle.read(SAFETENSORS_HEADER_LENGTH_BYTES), "little")
    return path.stat().st_size - SAFETENSORS_HEADER_LENGTH_BYTES - header


def predicted_cache_bytes(method: str, shape: formulas.LlamaShape) -> int:
    """Tensor data of one cache entry: RegMean's, the float32 merged linears of the merge."""
    if solves_in_prepass(method):
        return projection.merged_linears_bytes(shape, formulas.FLOAT32_BYTES)
    hessians, factors = keeps_matrices(method)
    return formulas.cache_bytes_per_task(shape, hessians=hessians, factors=factors)


def kept_cache_bytes(method: str, shape: formulas.LlamaShape) -> int:
    """One task's entry with ``keep_statistics: true`` (RegMean's; the factor is derived from
    H, not stored), or the method's own per-task entry."""
    if solves_in_prepass(method):
        return projection.kept_statistics_bytes(shape, experts=1)
    return predicted_cache_bytes(method, shape)


def summarize(
    merges: dict[str, list[MeasuredRun]],
    prepasses: dict[str, MeasuredRun],
    caches: dict[str, CacheContents],
    shape: formulas.LlamaShape,
    checkpoints: Checkpoints,
    threads: int,
) -> PartResult:
    walls = {method: median([run.wall_s for run in runs]) for method, runs in merges.items()}
    peaks = {
        method: median([run.peak_rss_bytes for run in runs]) for method, runs in merges.items()
    }
    result = PartResult(PART, TITLE)
    _add_merge_rows(result, walls, peaks)
    for method, prepass in prepasses.items():
        result.add(
            f"pre-pass (calibrate), {method}",
            seconds(prepass.wall_s),
            f"{REFERENCE} merge {seconds(walls[REFERENCE])}",
            ratio(prepass.wall_s, walls[REFERENCE]),
        )
    _add_cache_rows(result, caches, shape)
    _add_7b_rows(result)
    result.data = {
        "threads": threads,
        "calibration_samples": checkpoints.sizes.merge_calibration_samples,
        "calibration_seq_len": checkpoints.sizes.calibration_seq_len,
        "median_merge_wall_s": walls,
        "median_merge_peak_rss_bytes": peaks,
        "merge_wall_s": {m: [run.wall_s for run in runs] for m, runs in merges.items()},
        "prepass_wall_s": {m: run.wall_s for m, run in prepasses.items()},
        "prepass_peak_rss_bytes": {m: run.peak_rss_bytes for m, run in prepasses.items()},
        "cache": {m: vars(contents) for m, contents in caches.items()},
        "cache_predicted_data_bytes_per_entry": {
            m: predicted_cache_bytes(m, shape) for m in caches
        },
        "llama2_7b_cache_bytes_per_task": _7b_sizes(),
    }
    result.notes = _notes(checkpoints)
    return result


def _add_merge_rows(result: PartResult, walls: dict[str, float], peaks: dict[str, float]) -> None:
    for method in METHODS:
        result.add(
            f"merge wall, {method}",
            seconds(walls[method]),
            f"{REFERENCE} {seconds(walls[REFERENCE])}",
            ratio(walls[method], walls[REFERENCE]),
            at_most=TARGET_OVER_TIES.get(method),
        )
    for method in METHODS:
        result.add(
            f"merge peak RSS, {method}",
            size(peaks[method]),
            f"{REFERENCE} {size(peaks[REFERENCE])}",
            ratio(peaks[method], peaks[REFERENCE]),
        )


def _add_cache_rows(
    result: PartResult, caches: dict[str, CacheContents], shape: formulas.LlamaShape
) -> None:
    smallest = caches["sparsegpt_ties"]
    for method, contents in caches.items():
        result.add(
            f"cache per entry, {method}",
            size(contents.bytes_per_entry),
            f"sparsegpt_ties {size(smallest.bytes_per_entry)}",
            ratio(contents.bytes_per_entry, smallest.bytes_per_entry),
        )
    for method, contents in caches.items():
        predicted = predicted_cache_bytes(method, shape)
        result.add(
            f"cache data per entry, {method}",
            size(contents.data_bytes_per_entry),
            f"formula {size(predicted)}",
            ratio(contents.data_bytes_per_entry, predicted),
            at_most=1.0,
        )


def _7b_sizes() -> dict[str, int]:
    shape = formulas.LLAMA2_7B
    return {
        method: kept_cache_bytes(method, shape)
        for method in ("sparsegpt_ties", "regmean", "sparsegpt_regmean")
    }


def _add_7b_rows(result: PartResult) -> None:
    sizes = _7b_sizes()
    model = formulas.model_bytes(formulas.LLAMA2_7B)
    for method, predicted in sizes.items():
        result.add(
            f"Llama-2-7B cache per task, {method}, keep_statistics (formula)",
            size(predicted),
            f"fp32 model {size(model)}",
            ratio(predicted, model),
        )
    for method in ("regmean", "sparsegpt_regmean"):
        result.add(
            f"Llama-2-7B cache per task, {method}, keep_statistics (formula)",
            size(sizes[method]),
            f"sparsegpt_ties {size(sizes['sparsegpt_ties'])}",
            ratio(sizes[method], sizes["sparsegpt_ties"]),
        )


def _notes(checkpoints: Checkpoints) -> list[str]:
    sizes = checkpoints.sizes
    return [
        f"base: {sizes.shallowest} layers, hidden {sizes.hidden}; 2 experts = base + "
        f"N(0, ({sizes.task_vector_scale} x std)^2) per tensor; density {DENSITY} for ties, "
        "sparsegpt_ties and sparsegpt_regmean; weights 1/2 (TIES methods) or 1 (RegMean's); "
        "every other setting at its default (sparsegpt_regmean: compensate true)",
        f"pre-pass: {sizes.merge_calibration_samples} x {sizes.calibration_seq_len} tokens per "
        "task, timed once; merge times are medians over the repeats and include interpreter "
        "start-up and, for the plugin's methods, tokenizing the calibration text and reading "
        "the cache (checked: every task was a cache hit)",
        "cache per entry = entry file size (header included); cache data = tensor bytes only. "
        "RegMean's methods: one entry per merge, the float32 merged linears. TIES methods: one "
        "per task; formula per Hessian group (q/k/v, o, gate/up, down; d = its input width): 3 "
        "float32 vectors of d, plus d^2 for the Cholesky factor (compensate). Llama-2-7B rows: "
        "per task with keep_statistics: true (RegMean's whole H, its factor derived, not stored)",
    ]
