"""Issue "Scale numbers you can trust": RegMean and the TIES methods with 2 and with 5 experts.

On the shallowest base, for each expert count: every plugin method's cache is filled by
``mergekit-sparsegpt calibrate`` (timed once: the pre-pass), then each method merges through the
stock CLI with its warm cache, ``ties`` first (the reference), in a fresh subprocess each. The
part records wall time and peak RSS of both, what the cache directory holds afterwards and what
the merged output holds, and compares the bytes with the formulas of ``projection.py``. It ends
with that module's projection to Llama-3.1-8B and a 70B shape.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from transformers import AutoConfig

from benchmarks.perf import formulas, projection
from benchmarks.perf.configs import (
    CACHE_HIT_MESSAGE,
    COMPUTED_MESSAGE,
    DENSITY,
    calibrate_command,
    calibration_settings,
    check_served,
    merge_config,
    prepass_default,
    stock_merge_command,
)
from benchmarks.perf.experts_summary import (
    METHODS,
    TRIMMING,
    WARM_METHOD,
    CountRuns,
    DiskUse,
    Formulas,
    Method,
    summarize,
)
from benchmarks.perf.measure import (
    MeasuredRun,
    benchmark_env,
    fresh_directory,
    run_measured,
)
from benchmarks.perf.merge import entry_data_bytes
from benchmarks.perf.models import Checkpoints, expert_domains
from benchmarks.perf.report import PartResult
from mergekit_sparsegpt.demo.merges import write_config

PART = "experts"
EXPERT_COUNTS = (2, 5)
REPEATS = 1  # merges per method and expert count unless --repeats is given


def calibration_samples(checkpoints: Checkpoints) -> int:
    """Half the merge part's windows per task: the part runs 5 experts and 19 subprocesses."""
    return max(1, checkpoints.sizes.merge_calibration_samples // 2)


def method_config(
    method: Method,
    checkpoints: Checkpoints,
    experts: dict[str, Path],
    cache_dir: Path,
) -> dict[str, Any]:
    """Weights 1/n for the TIES methods and 1 for RegMean's, density 0.3 where it trims."""
    weight = 1.0 if "regmean" in method.name else 1.0 / len(experts)
    models = {}
    for name, path in experts.items():
        parameters: dict[str, Any] = {"weight": weight}
        if method.name in TRIMMING:
            parameters["density"] = DENSITY
        if method.calibrated:
            parameters["calibration"] = str(checkpoints.expert_calibration_text(name))
        models[path] = parameters
    shared = None
    if method.calibrated:
        samples, seq_len = calibration_samples(checkpoints), checkpoints.sizes.calibration_seq_len
        shared = calibration_settings(samples, seq_len, cache_dir)
        if method.source is not None:
            shared["hessian_source"] = method.source
    return merge_config(method.name, checkpoints.base(checkpoints.sizes.shallowest), models, shared)


def disk_use(path: Path) -> DiskUse:
    """Every file under ``path`` (lock files and resume state included), and the data of the
    safetensors files directly in it."""
    entries = sorted(path.glob("*.safetensors"))
    return DiskUse(
        total_bytes=sum(file.stat().st_size for file in path.rglob("*") if file.is_file()),
        data_bytes=sum(entry_data_bytes(entry) for entry in entries),
        entries=len(entries),
    )


def check_warm(method: Method, measured: MeasuredRun) -> None:
    """A plugin method's merge must read its cache and compute nothing."""
    if not method.calibrated:
        return
    if CACHE_HIT_MESSAGE not in measured.stderr or COMPUTED_MESSAGE in measured.stderr:
        raise RuntimeError(f"{method.label} computed statistics in its merge: the cache was cold")


def run_count(
    checkpoints: Checkpoints,
    experts: dict[str, Path],
    repeats: int,
    env: dict[str, str],
    work: Path,
    warm: bool = False,
) -> CountRuns:
    """Pre-pass, then ``repeats`` rounds of warm merges (every method in turn, so that drift in
    the machine's load hits each alike); the caches are removed afterwards. ``warm``: also
    :func:`calibrate_warm` once."""
    runs = CountRuns(len(experts), {}, {}, {m.label: [] for m in METHODS}, {})
    configs = {}
    for method in METHODS:
        cache_dir = work / "cache" / method.label
        config = method_config(method, checkpoints, experts, cache_dir)
        configs[method.label] = write_config(
            config, fresh_directory(work / method.label) / "config.yml"
        )
        if method.calibrated:
            fresh_directory(cache_dir)
            runs.prepasses[method.label] = run_measured(
                calibrate_command(configs[method.label]), env
            )
            runs.caches[method.label] = disk_use(cache_dir)
    if warm:
        runs.warm = calibrate_warm(configs[WARM_METHOD.label], env)
    for _ in range(repeats):
        for method in METHODS:
            out = work / "out" / method.label
            shutil.rmtree(out, ignore_errors=True)
            measured = run_measured(stock_merge_command(configs[method.label], out), env)
            check_warm(method, measured)
            runs.merges[method.label].append(measured)
            runs.outputs.setdefault(method.label, disk_use(out))
            shutil.rmtree(out, ignore_errors=True)  # only its size is kept
    shutil.rmtree(work / "cache", ignore_errors=True)  # GBs at 5 experts; their sizes are kept
    return runs


def calibrate_warm(config: Path, env: dict[str, str]) -> MeasuredRun:
    """``calibrate`` once more with its entry in the cache: imports, planning and tokenizing
    without weights, the fixed part of a pre-pass's peak RSS."""
    measured = run_measured(calibrate_command(config), env)
    check_served(measured.stderr, 1, f"calibrate of {config}")
    return measured


def run(checkpoints: Checkpoints, repeats: int, threads: int, work: Path) -> PartResult:
    env = benchmark_env(threads)
    depth = checkpoints.sizes.shallowest
    names = list(expert_domains(max(EXPERT_COUNTS)))
    counts = [
        run_count(
            checkpoints,
            {name: checkpoints.expert(name, depth) for name in names[:count]},
            repeats,
            env,
            work / PART / f"{count}_experts",
            warm=count == EXPERT_COUNTS[0],
        )
        for count in EXPERT_COUNTS
    ]
    overhead = counts[0].warm
    assert overhead is not None
    shape = formulas.LlamaShape.from_config(AutoConfig.from_pretrained(checkpoints.base(depth)))
    predicted = {
        runs.experts: Formulas(
            shape,
            projection.Workload(
                experts=runs.experts,
                samples=calibration_samples(checkpoints),
                seq_len=checkpoints.sizes.calibration_seq_len,
                batch=prepass_default("calibration_batch_size"),
                weight_bytes=formulas.FLOAT32_BYTES,  # the benchmark's checkpoints and outputs
                output_bytes=formulas.FLOAT32_BYTES,
            ),
            overhead.peak_rss_bytes,
        )
        for runs in counts
    }
    return summarize(counts, predicted, checkpoints, repeats, threads)
