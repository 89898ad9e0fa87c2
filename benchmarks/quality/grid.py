"""The merge grid: which variants run at which densities, and running them with mergekit-yaml.

Add a variant with one line in :data:`VARIANTS`. A variant whose parameter the installed
package does not know yet (mergekit-sparsegpt rejects unknown keys with "Unknown parameter")
is reported as skipped and the grid carries on.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.quality.report import trim_by_tensor_type
from mergekit_sparsegpt.demo.build import Family
from mergekit_sparsegpt.demo.merges import MergeFailed, write_config
from mergekit_sparsegpt.methods.registry import is_plugin_method
from mergekit_sparsegpt.trim.metrics import REPORT_FILE

DENSITIES = (0.05, 0.1, 0.2, 0.3, 0.5)
SEEDS = (0, 1, 2)  # --random-seed values for the methods that drop entries at random
IMPORTANCES = ("wanda", "obs", "sparsegpt", "design_note")
# Name filters of the tensors without a Hessian in a Llama: both layer norms and the final norm
# match "norm".
NONGRAM_KINDS = ("embed_tokens", "lm_head", "norm")
# The rules before issue 16: the token embedding, lm_head and the norms by the method's stock
# rule. Every issue-16 row pins norm_rule unless it names one, so rows measured before the norms
# had statistics keep their meaning.
STOCK_NORMS = {"norm_rule": "stock"}
STOCK_REST = {"embedding_rule": "stock", "lm_head_statistics": False, **STOCK_NORMS}
DARE_HEAD = {"lm_head_statistics": True}  # not sparsegpt_dare's default


@dataclass(frozen=True)
class Variant:
    """One row of the table: a merge method and the parameters that set it apart."""

    method: str
    params: Mapping[str, Any] = field(default_factory=dict)  # top-level `parameters:`
    seeds: tuple[int, ...] = (0,)
    uses_density: bool = True
    weight: float | None = None  # per-model weight; None: 1/N
    plotted: bool = True  # False: a diagnostic row, in the tables only

    @property
    def calibrated(self) -> bool:
        return is_plugin_method(self.method)


# As a user would run them: weights 1/N (summing to 1) and every method's own defaults. So ties
# and sparsegpt_ties (normalize: true) take the mean over the experts that agree on an entry's
# sign, which cancels the weights, while task_arithmetic, dare_ties, dare_linear and
# sparsegpt_dare (normalize: false) scale each task vector by 1/N. (dare_ties with normalize:
# true would divide by the number of experts that kept an entry after rescaling it by
# 1/density: at density 0.1 a lone survivor lands at 10x its size, which wrecks the model.)
VARIANTS: dict[str, Variant] = {
    "task_arithmetic": Variant("task_arithmetic", uses_density=False),
    # Full-strength sum: how much the task vectors interfere when nothing is scaled down.
    "task_arithmetic[w=1]": Variant("task_arithmetic", uses_density=False, weight=1.0),
    "ties": Variant("ties"),
    "dare_ties": Variant("dare_ties", seeds=SEEDS),
    "dare_linear": Variant("dare_linear", seeds=SEEDS),
    **{
        f"sparsegpt_ties[{imp}]": Variant("sparsegpt_ties", {"importance": imp})
        for imp in IMPORTANCES
    },
    **{
        f"sparsegpt_ties[{imp},base]": Variant(
            "sparsegpt_ties", {"importance": imp, "hessian_source": "base"}
        )
        for imp in IMPORTANCES
    },
    # Its fallback tensors (embeddings, lm_head, norms) drop at random, as dare_linear's do.
    "sparsegpt_dare": Variant("sparsegpt_dare", seeds=SEEDS),
    "sparsegpt_ties[wanda,row]": Variant(
        "sparsegpt_ties", {"importance": "wanda", "selection": "row"}
    ),
    "sparsegpt_ties[wanda,compensate]": Variant(
        "sparsegpt_ties", {"importance": "wanda", "compensate": True}
    ),
    "sparsegpt_ties[sparsegpt,compensate]": Variant(
        "sparsegpt_ties", {"importance": "sparsegpt", "compensate": True}
    ),
    # SparseGPT itself: its score, per-row selection, and OBS updates of the kept entries.
    "sparsegpt_ties[sparsegpt,compensate,row]": Variant(
        "sparsegpt_ties", {"importance": "sparsegpt", "compensate": True, "selection": "row"}
    ),
    # Why compensation loses from density 0.1 up (docs/compensation.md): these rows are in
    # the tables but not in the plot.
    "sparsegpt_ties[wanda,compensate,sign=compensated]": Variant(
        "sparsegpt_ties",
        {"importance": "wanda", "compensate": True, "sign_from": "compensated"},
        plotted=False,
    ),
    # Stronger damping keeps the re-fit out of the directions the task's inputs barely use.
    "sparsegpt_ties[wanda,compensate,damp=1.0]": Variant(
        "sparsegpt_ties",
        {"importance": "wanda", "compensate": True, "dampening": 1.0},
        plotted=False,
    ),
    # Re-fitting restores each trimmed vector's effect: does it win at a lower overall strength?
    "ties[lambda=0.75]": Variant("ties", {"lambda": 0.75}, plotted=False),
    "sparsegpt_ties[wanda,compensate,lambda=0.75]": Variant(
        "sparsegpt_ties", {"importance": "wanda", "compensate": True, "lambda": 0.75}, plotted=False
    ),
    # Hessian-weighted combination (RegMean). Weights 1: they cancel in the solve, and the
    # tensors without a Hessian get nongram_scale (default 0.2) x the sum of the 5 task vectors,
    # i.e. their average.
    "regmean": Variant("regmean", uses_density=False, weight=1.0),
    "regmean[alpha=0.9]": Variant("regmean", {"alpha": 0.9}, uses_density=False, weight=1.0),
    **{
        f"regmean[nongram={scale}]": Variant(
            "regmean", {"nongram_scale": scale}, uses_density=False, weight=1.0, plotted=False
        )
        for scale in (0.1, 0.4)
    },
    **{
        f"regmean[lambda={scale}]": Variant(
            "regmean", {"lambda": scale}, uses_density=False, weight=1.0, plotted=False
        )
        for scale in (0.8, 1.2)
    },
    # A coefficient per kind of tensor without a Hessian (issue 4, item 5), one kind at a time
    # off the default 0.2, through mergekit's own per-tensor filters (substring of the name).
    **{
        f"regmean[{kind}={scale}]": Variant(
            "regmean",
            {"nongram_scale": [{"filter": kind, "value": scale}, {"value": 0.2}]},
            uses_density=False,
            weight=1.0,
            plotted=False,
        )
        for kind in NONGRAM_KINDS
        for scale in (0.1, 0.4)
    },
    "regmean[alpha=0.5]": Variant(
        "regmean", {"alpha": 0.5}, uses_density=False, weight=1.0, plotted=False
    ),
    "regmean[base]": Variant(
        "regmean", {"hessian_source": "base"}, uses_density=False, weight=1.0, plotted=False
    ),
    "sparsegpt_regmean[wanda]": Variant(
        "sparsegpt_regmean", {"importance": "wanda", "compensate": False}, weight=1.0
    ),
    # RegMean on re-fitted task vectors (issue 4's "RegMean on top of compensated vectors").
    "sparsegpt_regmean[wanda,compensate]": Variant(
        "sparsegpt_regmean", {"importance": "wanda", "compensate": True}, weight=1.0
    ),
    # RegMean++: every task's Hessians on the inputs of the model merged so far.
    "regmean[merged]": Variant(
        "regmean", {"hessian_source": "merged"}, uses_density=False, weight=1.0
    ),
    "regmean[merged,nongram=0.4]": Variant(
        "regmean",
        {"hessian_source": "merged", "nongram_scale": 0.4},
        uses_density=False,
        weight=1.0,
        plotted=False,
    ),
    # lm_head at 0.4 was the one per-kind coefficient higher in all three families (finetuned).
    "regmean[merged,lm_head=0.4]": Variant(
        "regmean",
        {
            "hessian_source": "merged",
            "nongram_scale": [{"filter": "lm_head", "value": 0.4}, {"value": 0.2}],
        },
        uses_density=False,
        weight=1.0,
        plotted=False,
    ),
    "sparsegpt_regmean[wanda,compensate,merged]": Variant(
        "sparsegpt_regmean",
        {"importance": "wanda", "compensate": True, "hessian_source": "merged"},
        weight=1.0,
    ),
    # DARE's L1 rescale on top of re-fitted vectors, and without it.
    "sparsegpt_dare[compensate]": Variant(
        "sparsegpt_dare", {"compensate": True}, seeds=SEEDS, plotted=False
    ),
    "sparsegpt_dare[compensate,rescale=false]": Variant(
        "sparsegpt_dare", {"compensate": True, "rescale": False}, seeds=SEEDS, plotted=False
    ),
    # Issue 16: the tensors outside the decoder linears. "stock-rest" rows pin the rules before
    # it (embeddings and lm_head by the stock rule); the plain rows take the defaults (lm_head
    # by its Hessian, the token embedding by its counts); "head" / "tokens" rows add one.
    **{
        f"regmean[{source}{suffix}]": Variant(
            "regmean", {"hessian_source": source, **extra}, uses_density=False, weight=1.0
        )
        for source in ("merged", "finetuned")
        for suffix, extra in (
            (",stock-rest", STOCK_REST),
            (",head", {"embedding_rule": "stock", **STOCK_NORMS}),
            (",tokens", {"lm_head_statistics": False, **STOCK_NORMS}),
            (",new", STOCK_NORMS),
            # The norms too: by their channel energies (the default) or their plain mean.
            (",all", {}),
            (",all,norms=mean", {"norm_rule": "mean"}),
            (",norms", {"embedding_rule": "stock", "lm_head_statistics": False}),
        )
    },
    # Diagnostics: the token smoothing, and a tied family's (--tied) rules for its one tensor.
    **{
        f"regmean[merged,{key}={value}]": Variant(
            "regmean",
            {"hessian_source": "merged", parameter: value, **STOCK_NORMS},
            uses_density=False,
            weight=1.0,
            plotted=False,
        )
        for key, parameter, values in (
            ("smoothing", "token_smoothing", (0.1, 2.0)),
            ("tied", "tied_embeddings", ("blend", "head", "tokens")),
        )
        for value in values
    },
    **{
        f"sparsegpt_regmean[wanda,compensate,merged{suffix}]": Variant(
            "sparsegpt_regmean",
            {"importance": "wanda", "compensate": True, "hessian_source": "merged", **extra},
            weight=1.0,
        )
        for suffix, extra in (
            (",stock-rest", STOCK_REST),
            (",new", STOCK_NORMS),
            (",all", {}),
        )
    },
    **{
        f"sparsegpt_ties[wanda,base{suffix}]": Variant(
            "sparsegpt_ties", {"importance": "wanda", "hessian_source": "base", **extra}
        )
        for suffix, extra in (
            (",stock-rest", {**STOCK_REST, "combine": "mean"}),
            (",head", {"embedding_rule": "stock", "combine": "mean", **STOCK_NORMS}),
            (",tokens", {"lm_head_statistics": False, "combine": "mean", **STOCK_NORMS}),
            (",new", {"combine": "mean", **STOCK_NORMS}),
            (",energy,stock-rest", {**STOCK_REST, "combine": "energy"}),
            (",energy", {"combine": "energy", **STOCK_NORMS}),
            (",all", {}),
            (",all,norms=mean", {"norm_rule": "mean"}),
        )
    },
    # sparsegpt_dare with the issue-16 rules, each row over the seeds; every row pins the rules
    # it does not vary (the defaults since: combine energy, lm_head by the stock rule).
    **{
        f"sparsegpt_dare[{suffix}]": Variant("sparsegpt_dare", extra, seeds=SEEDS, plotted=False)
        for suffix, extra in (
            ("stock-rest", {**STOCK_REST, "combine": "mean"}),
            ("new", {**DARE_HEAD, "combine": "mean", **STOCK_NORMS}),
            ("new,norms=mean", {**DARE_HEAD, "combine": "mean", "norm_rule": "mean"}),
            ("new,norms=energy", {**DARE_HEAD, "combine": "mean", "norm_rule": "energy"}),
            ("new,combine=energy", {**DARE_HEAD, "combine": "energy", **STOCK_NORMS}),
            ("stock-rest,combine=energy", {**STOCK_REST, "combine": "energy"}),
            (
                "head,combine=energy",
                {**DARE_HEAD, "embedding_rule": "stock", "combine": "energy", **STOCK_NORMS},
            ),
            (
                "tokens,combine=energy",
                {"lm_head_statistics": False, "combine": "energy", **STOCK_NORMS},
            ),
        )
    },
}
# The row the "plain averaging keeps every expert's gain" check reads.
AVERAGING = "task_arithmetic"


@dataclass(frozen=True)
class Job:
    variant: str
    density: float | None
    seed: int

    @property
    def slug(self) -> str:
        density = "dense" if self.density is None else f"d{self.density:g}"
        return re.sub(r"[^A-Za-z0-9_.=-]+", "_", f"{self.variant}__{density}__s{self.seed}")


@dataclass(frozen=True)
class Calibration:
    samples: int
    seq_len: int
    cache_dir: Path


def plan(variants: Mapping[str, Variant], densities: Sequence[float]) -> list[Job]:
    jobs = []
    for name, v in variants.items():
        for density in densities if v.uses_density else (None,):
            jobs.extend(Job(name, density, seed) for seed in v.seeds)
    return jobs


def merge_config(
    variant: Variant, density: float | None, family: Family, calibration: Calibration
) -> dict[str, Any]:
    n = len(family.experts)
    weight = 1.0 / n if variant.weight is None else variant.weight
    models = []
    for name, path in family.experts.items():
        params: dict[str, Any] = {"weight": weight}
        if density is not None:
            params["density"] = density
        if variant.calibrated:
            params["calibration"] = str(family.calibration[name])
        models.append({"model": str(path), "parameters": params})
    config: dict[str, Any] = {
        "merge_method": variant.method,
        "base_model": str(family.base),
        "models": models,
        "dtype": "float32",  # the models are float32; keep the merge exact
        "tokenizer_source": "base",
    }
    params = dict(variant.params)
    if variant.calibrated:
        # Pinned, so a row means the same whatever the installed default: rows without "base"
        # in their name calibrate through each expert.
        params.setdefault("hessian_source", "finetuned")
        params.update(
            calibration_samples=calibration.samples,
            calibration_seq_len=calibration.seq_len,
            # One cache for the whole grid: each task's Hessians are computed once per source.
            cache_dir=str(calibration.cache_dir),
        )
    if params:
        config["parameters"] = params
    return config


def mergekit_yaml(config: Path, out: Path, seed: int, timeout_s: float = 600) -> None:
    """The stock CLI, as a user runs it; demo.merges.run_mergekit has no --random-seed."""
    cmd = [sys.executable, "-m", "mergekit.scripts.run_yaml", str(config), str(out)]
    cmd += ["--random-seed", str(seed)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        raise MergeFailed(f"{' '.join(cmd)} exited {proc.returncode}:\n{tail}")


def is_unknown_parameter(error: BaseException) -> bool:
    return isinstance(error, MergeFailed) and "Unknown parameter" in str(error)


Evaluator = Callable[[Path], dict[str, float]]


@dataclass
class GridRun:
    """Runs jobs, each one merge plus its evaluations, keeping results on disk."""

    family: Family
    calibration: Calibration
    evaluate: Evaluator  # held-out data: the scores reported
    out: Path
    keep_merges: bool = False
    validate: Evaluator | None = None  # validation data: the scores hyperparameters are chosen on
    skipped: dict[str, str] = field(default_factory=dict)  # variant -> reason
    failed: dict[str, str] = field(default_factory=dict)  # job slug -> error

    def result_path(self, job: Job) -> Path:
        return self.out / "results" / f"{job.slug}.json"

    def load(self, job: Job) -> dict | None:
        path = self.result_path(job)
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def run(self, job: Job) -> dict | None:
        """Result of one job: from disk when present, else merged and evaluated now."""
        if (done := self.load(job)) is not None:
            return done
        if job.variant in self.skipped:
            return None
        variant = VARIANTS[job.variant]
        for sub in ("configs", "merges"):
            (self.out / sub).mkdir(parents=True, exist_ok=True)
        config = write_config(
            merge_config(variant, job.density, self.family, self.calibration),
            self.out / "configs" / f"{job.slug}.yaml",
        )
        merged = self.out / "merges" / job.slug
        shutil.rmtree(merged, ignore_errors=True)  # a half-written merge from an interruption
        start = time.perf_counter()
        try:
            mergekit_yaml(config, merged, job.seed)
        except (MergeFailed, subprocess.TimeoutExpired) as err:
            if is_unknown_parameter(err):
                self.skipped[job.variant] = _unknown_parameter_line(str(err))
                print(f"skip {job.variant}: {self.skipped[job.variant]}", flush=True)
            else:
                self.failed[job.slug] = str(err)
                print(f"merge {job.slug} FAILED", flush=True)
            return None
        merge_s = time.perf_counter() - start
        trim_report = merged / REPORT_FILE
        trim = (
            trim_by_tensor_type(json.loads(trim_report.read_text(encoding="utf-8")))
            if trim_report.is_file()  # only our methods write one
            else {}
        )
        scores = self.evaluate(merged)
        validation = self.validate(merged) if self.validate is not None else None
        eval_s = time.perf_counter() - start - merge_s
        if not self.keep_merges:
            shutil.rmtree(merged, ignore_errors=True)
        result = {
            "variant": job.variant,
            "method": variant.method,
            "params": dict(variant.params),
            "density": job.density,
            "seed": job.seed,
            "scores": scores,
            **({"validation_scores": validation} if validation is not None else {}),
            **({"trim_by_type": trim} if trim else {}),
            "merge_s": merge_s,
            "eval_s": eval_s,
        }
        _write_json_atomic(self.result_path(job), result)
        print(f"{job.slug:<48} merge {merge_s:4.1f}s  eval {eval_s:4.1f}s", flush=True)
        return result

    def run_all(self, jobs: Sequence[Job], workers: int) -> dict[Job, dict]:
        """Run jobs; the first calibrated job per Hessian source runs alone to fill the cache."""
        first: dict[str, Job] = {}
        for job in jobs:
            variant = VARIANTS[job.variant]
            if variant.calibrated and self.load(job) is None:
                first.setdefault(str(variant.params.get("hessian_source", "finetuned")), job)
        results = {job: self.run(job) for job in first.values()}
        rest = [job for job in jobs if job not in results]
        with ThreadPoolExecutor(max_workers=workers) as pool:
            # Threads suffice: each job waits on a mergekit subprocess, and torch releases the
            # GIL while scoring.
            results.update(zip(rest, pool.map(self.run, rest), strict=True))
        return {job: r for job, r in results.items() if r is not None}


def _unknown_parameter_line(error: str) -> str:
    lines = [line for line in error.splitlines() if "Unknown parameter" in line]
    line = lines[-1] if lines else error
    return line[line.index("Unknown parameter") :].split(" Known parameters")[0]


def _write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    tmp.replace(path)
