"""Issue 17: the whole ``mergekit-sparsegpt calibrate`` process against a whole plain-forward
process, start-up included, on a model whose vocabulary does not dominate the forward pass.

The model is the mode's shallowest Llama with a vocabulary of 512 (``--size medium``: width
1024, 4 blocks) and two experts, each with a calibration text of its own and half the
``calibration`` part's windows (medium: 32 x 256 tokens per task). Every repeat runs, each in a
fresh subprocess started through ``launcher.py`` with the same torch threads:

* the reference: ``plain_forward.py`` (torch and transformers only) loads the base and runs it
  over both tasks' windows, which this process computed the way the plugin does and saved; the
  cache entries' keys must name the same tokens;
* ``mergekit-sparsegpt calibrate`` of the two experts' ``sparsegpt_ties`` config (its defaults:
  each task's text through the base, diag H) with an empty cache, and again with the cache full
  (imports, planning and tokenizing: no forward pass);
* start-up alone: an empty interpreter, the reference's imports, those and mergekit's (with the
  plugin's start-up hook off), and everything ``calibrate`` imports before it reads a weight.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig

from benchmarks.perf import formulas
from benchmarks.perf.calibration import check_same_tokens, plugin_windows
from benchmarks.perf.configs import (
    CALIBRATE_IMPORTS,
    DENSITY,
    READY_MESSAGE,
    calibrate_command,
    calibration_settings,
    check_served,
    merge_config,
    prepass_default,
)
from benchmarks.perf.measure import (
    MeasuredRun,
    benchmark_env,
    fresh_directory,
    median,
    python_command,
    run_measured,
)
from benchmarks.perf.models import Checkpoints, Sizes, expert_domains, prepare
from benchmarks.perf.report import PartResult, ratio, seconds
from mergekit_sparsegpt._autoload import DISABLE_ENV_VAR
from mergekit_sparsegpt.demo.merges import write_config

PART = "process"
TITLE = "Whole processes: mergekit-sparsegpt calibrate vs a plain transformers forward"
TARGET_PROCESS_OVER_FORWARD = 1.4
VOCAB = 512  # the issue's: the output head is a small part of the forward pass
TASKS = 2
PLAIN_FORWARD = Path(__file__).resolve().with_name("plain_forward.py")
REFERENCE_IMPORTS = (
    "import torch, transformers, transformers.models.llama.modeling_llama; "
    "from transformers import AutoModelForCausalLM"
)
MERGEKIT_IMPORTS = f"{REFERENCE_IMPORTS}; import mergekit, mergekit.merge, mergekit.config"
INTERPRETER, TORCH, MERGEKIT, PLUGIN = (
    "interpreter",
    "torch + transformers",
    "+ mergekit",
    "+ the plugin (calibrate's imports)",
)
# Start-up alone, each a process of its own: label -> (code, whether the plugin's hook runs).
STARTUPS = {
    INTERPRETER: ("pass", True),
    TORCH: (REFERENCE_IMPORTS, True),
    MERGEKIT: (MERGEKIT_IMPORTS, False),
    PLUGIN: (CALIBRATE_IMPORTS, True),
}


@dataclass
class ProcessTimings:
    """Wall seconds of each repeat's processes, and the reference's own breakdown."""

    reference: list[float] = field(default_factory=list)
    calibrate: list[float] = field(default_factory=list)
    warm: list[float] = field(default_factory=list)
    startup: dict[str, list[float]] = field(default_factory=lambda: {name: [] for name in STARTUPS})
    reference_parts: list[dict[str, Any]] = field(default_factory=list)

    def median_startups(self) -> dict[str, float]:
        return {name: median(seconds) for name, seconds in self.startup.items()}

    def median_reference_part(self, name: str) -> float:
        return median([parts[name] for parts in self.reference_parts])


def process_sizes(sizes: Sizes) -> Sizes:
    """The mode's shallowest model with the issue's small vocabulary; each task gets half the
    calibration part's windows."""
    return dataclasses.replace(
        sizes,
        name=f"{sizes.name}_vocab{VOCAB}",
        vocab=VOCAB,
        depths=(sizes.shallowest,),
        merge_calibration_samples=max(1, sizes.calibration_samples // TASKS),
    )


def run(out: Path, sizes: Sizes, repeats: int, threads: int, work: Path) -> PartResult:
    sizes = process_sizes(sizes)
    checkpoints = prepare(out, sizes, sizes.depths, experts=TASKS)
    base = checkpoints.base(sizes.shallowest)
    work = fresh_directory(work / PART)
    texts = [checkpoints.expert_calibration_text(name) for name in expert_domains(TASKS)]
    windows = [
        plugin_windows(base, text, sizes.merge_calibration_samples, sizes.calibration_seq_len)
        for text in texts
    ]
    tokens_file = work / "tokens.pt"
    torch.save(torch.cat(windows), tokens_file)
    cache_dir = work / "cache"
    config = write_config(calibrate_config(checkpoints, cache_dir), work / "config.yml")
    env = benchmark_env(threads)
    batch_size = prepass_default("calibration_batch_size")
    timings = ProcessTimings()
    for _ in range(repeats):
        for name, (code, hook) in STARTUPS.items():
            startup_env = env if hook else {**env, DISABLE_ENV_VAR: "1"}
            timings.startup[name].append(
                run_measured(python_command("-c", code), startup_env).wall_s
            )
        reference = run_measured(
            python_command(str(PLAIN_FORWARD), str(base), str(tokens_file), str(batch_size)), env
        )
        timings.reference.append(reference.wall_s)
        timings.reference_parts.append(reference_parts(reference, windows))
        fresh_directory(cache_dir)
        timings.calibrate.append(calibrate_fresh(config, env, cache_dir, windows).wall_s)
        timings.warm.append(calibrate_warm(config, env).wall_s)
    shape = formulas.LlamaShape.from_config(AutoConfig.from_pretrained(base))
    return summarize(timings, shape, windows, batch_size, threads)


def calibrate_config(checkpoints: Checkpoints, cache_dir: Path) -> dict[str, Any]:
    """``sparsegpt_ties`` of the experts, each calibrated on its own text, every other setting
    at the plugin's default."""
    sizes = checkpoints.sizes
    depth = sizes.shallowest
    experts = {
        checkpoints.expert(name, depth): {
            "weight": 1 / TASKS,
            "density": DENSITY,
            "calibration": str(checkpoints.expert_calibration_text(name)),
        }
        for name in expert_domains(TASKS)
    }
    settings = calibration_settings(
        sizes.merge_calibration_samples, sizes.calibration_seq_len, cache_dir
    )
    return merge_config("sparsegpt_ties", checkpoints.base(depth), experts, settings)


def reference_parts(reference: MeasuredRun, windows: list[torch.Tensor]) -> dict[str, Any]:
    """The reference's own report; raises if it ran other tokens or imported mergekit."""
    parts = json.loads(reference.stdout.strip().splitlines()[-1])
    if parts["tokens"] != sum(task.numel() for task in windows):
        raise RuntimeError(f"the plain forward ran {parts['tokens']} tokens, not the pre-pass's")
    if parts["mergekit_imported"]:
        raise RuntimeError("the plain forward process imported mergekit: it is no reference")
    return parts


def calibrate_fresh(
    config: Path, env: dict[str, str], cache_dir: Path, windows: list[torch.Tensor]
) -> MeasuredRun:
    """``calibrate`` with an empty cache: it must write one entry per task, on the reference's
    tokens."""
    measured = run_measured(calibrate_command(config), env)
    if READY_MESSAGE not in measured.stderr:
        raise RuntimeError(f"calibrate of {config} did not finish:\n{measured.stderr[-2000:]}")
    check_same_tokens(cache_dir, windows)
    return measured


def calibrate_warm(config: Path, env: dict[str, str]) -> MeasuredRun:
    """``calibrate`` again: the cache must serve every task, and nothing may be computed."""
    measured = run_measured(calibrate_command(config), env)
    check_served(measured.stderr, TASKS, f"the warm calibrate of {config}")
    return measured


def summarize(
    timings: ProcessTimings,
    shape: formulas.LlamaShape,
    windows: list[torch.Tensor],
    batch_size: int,
    threads: int,
) -> PartResult:
    result = PartResult(PART, TITLE)
    reference, calibrate = median(timings.reference), median(timings.calibrate)
    startup = timings.median_startups()
    reference_imports, calibrate_imports = startup[TORCH], startup[PLUGIN]
    plain = f"plain forward process {seconds(reference)}"
    result.add(
        "calibrate process (empty cache)",
        seconds(calibrate),
        plain,
        ratio(calibrate, reference),
        at_most=TARGET_PROCESS_OVER_FORWARD,
    )
    result.add(
        "calibrate process less its imports",
        seconds(calibrate - calibrate_imports),
        f"plain forward less its imports {seconds(reference - reference_imports)}",
        ratio(calibrate - calibrate_imports, reference - reference_imports),
    )
    warm = median(timings.warm)
    result.add(
        "calibrate process (cache full: no forward)",
        seconds(warm),
        f"calibrate, empty cache {seconds(calibrate)}",
        ratio(warm, calibrate),
    )
    _add_startup_rows(result, startup, reference, calibrate)
    for part in ("import_s", "load_s", "forward_s"):
        value = timings.median_reference_part(part)
        label = part.removesuffix("_s")
        result.add(
            f"plain forward process: {label}", seconds(value), plain, ratio(value, reference)
        )
    tokens, seq_len = sum(task.numel() for task in windows), windows[0].shape[1]
    forward_flops = formulas.forward_flops(shape, tokens, seq_len)
    head_flops = 2 * tokens * shape.vocab * shape.hidden
    result.add(
        "output head's share of the forward",
        f"{head_flops:.3g} FLOP",
        f"forward {forward_flops:.3g} FLOP",
        ratio(head_flops, forward_flops),
    )
    result.data = {
        "shape": vars(shape),
        "tasks": TASKS,
        "tokens": tokens,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "threads": threads,
        "seconds": dataclasses.asdict(timings),
    }
    result.notes = _notes(shape, windows, batch_size, threads)
    return result


def _add_startup_rows(
    result: PartResult, startup: dict[str, float], reference: float, calibrate: float
) -> None:
    """Start-up (``startup``: median seconds per imports-only process); the first two rows as
    shares of the plain process, the last two, what mergekit and the plugin add to the
    reference's imports, as shares of the calibrate process."""
    plain = f"plain forward process {seconds(reference)}"
    whole = f"calibrate process {seconds(calibrate)}"
    for label, value, reference_label, reference_s in (
        ("start-up: empty interpreter", startup[INTERPRETER], plain, reference),
        ("start-up: import torch + transformers", startup[TORCH], plain, reference),
        (
            "start-up: mergekit's import on top",
            startup[MERGEKIT] - startup[TORCH],
            whole,
            calibrate,
        ),
        (
            "start-up: the plugin's import on top",
            startup[PLUGIN] - startup[MERGEKIT],
            whole,
            calibrate,
        ),
    ):
        result.add(label, seconds(value), reference_label, ratio(value, reference_s))


def _notes(
    shape: formulas.LlamaShape, windows: list[torch.Tensor], batch_size: int, threads: int
) -> list[str]:
    samples, seq_len = windows[0].shape
    return [
        f"{shape.layers}-layer Llama, hidden {shape.hidden}, vocabulary {shape.vocab}; "
        f"{len(windows)} tasks of {samples} x {seq_len} tokens, batch {batch_size}, "
        f"{threads} torch thread(s), float32; medians of the repeats; every row is a fresh "
        "process's wall time, interpreter start-up included",
        "plain forward process = python plain_forward.py: import torch and transformers, "
        "from_pretrained of the base, model(input_ids, use_cache=False) under inference_mode "
        "over both tasks' windows (read from a saved tensor, not tokenized); it must not "
        "import mergekit (checked)",
        "calibrate = mergekit-sparsegpt calibrate of a two-expert sparsegpt_ties config at its "
        "defaults (each task's text through the base, diag H): imports, planning, tokenizing, "
        "weights read block by block, the statistics, the cache written; the entries' token "
        "fingerprints equal the reference's windows (checked); the cache-full run must find "
        "both entries and compute nothing (checked)",
        "start-up rows: processes that only import; 'on top' rows are differences of two "
        "such processes (mergekit's with the plugin's start-up hook off)",
    ]
