"""The ``experts`` part's methods, what it measures per expert count, and its table: each
measurement as a ratio to stock ``ties`` at the same expert count or to its formula
(``projection.py``), then the projection to Llama-3.1-8B and a 70B shape."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from benchmarks.perf import formulas, projection
from benchmarks.perf.measure import MeasuredRun, median
from benchmarks.perf.models import Checkpoints
from benchmarks.perf.report import PartResult, ratio, seconds, size

TITLE = "RegMean at scale: 2 vs 5 experts, pre-pass, warm merge, peak RSS and disk"
TARGET_OVER_TIES = {"sparsegpt_ties": 1.15}  # the merge part's; RegMean's: the 1.0
FORMULA_TOLERANCE = 0.02  # measured bytes / formula within 1 +- this
FLAT_TOLERANCE = 1.05  # RegMean's cache at 5 experts / at 2: flat


@dataclass(frozen=True)
class Method:
    """A row label, the merge method, and the ``hessian_source`` it sets (None: its default)."""

    label: str
    name: str
    source: str | None = None
    recipe: projection.Recipe | None = None  # its formulas; None: no pre-pass (stock ties)

    @property
    def calibrated(self) -> bool:
        return self.recipe is not None

    @property
    def regmean(self) -> bool:
        return self.recipe is not None and self.recipe.solves_in_prepass


_RECIPES = {recipe.label: recipe for recipe in projection.RECIPES}
REFERENCE = Method("ties", "ties")
METHODS = (
    REFERENCE,
    Method("sparsegpt_ties", "sparsegpt_ties", None, _RECIPES["sparsegpt_ties"]),
    Method("regmean[merged]", "regmean", "merged", _RECIPES["regmean (merged)"]),
    Method("regmean[finetuned]", "regmean", "finetuned", _RECIPES["regmean (finetuned)"]),
    Method("sparsegpt_regmean", "sparsegpt_regmean", None, _RECIPES["sparsegpt_regmean"]),
)
CALIBRATED = tuple(method for method in METHODS if method.calibrated)
WARM_METHOD = METHODS[2]  # regmean[merged]: its warm calibrate is the pre-pass's fixed part
TRIMMING = frozenset({"ties", "sparsegpt_ties", "sparsegpt_regmean"})


@dataclass(frozen=True)
class DiskUse:
    """Bytes of a directory: all its files, and the tensor data of its safetensors files."""

    total_bytes: int
    data_bytes: int
    entries: int


@dataclass
class CountRuns:
    """Everything measured at one expert count (keys: method labels)."""

    experts: int
    prepasses: dict[str, MeasuredRun]
    caches: dict[str, DiskUse]
    merges: dict[str, list[MeasuredRun]]
    outputs: dict[str, DiskUse]
    warm: MeasuredRun | None = None  # calibrate with a warm cache, once (experts.run)

    def merge_wall(self, label: str) -> float:
        return median([run.wall_s for run in self.merges[label]])

    def merge_peak(self, label: str) -> float:
        return median([run.peak_rss_bytes for run in self.merges[label]])


@dataclass(frozen=True)
class Formulas:
    """What ``projection.py`` predicts for the measured shape at one expert count."""

    shape: formulas.LlamaShape
    work: projection.Workload
    overhead_bytes: int  # ``calibrate`` with a warm cache: imports, planning, tokenizing

    def cache_bytes(self, method: Method) -> int:
        assert method.recipe is not None
        return projection.cache_bytes(method.recipe, self.shape, self.work)

    def host_bound(self, method: Method) -> int:
        """The pre-pass's peak RSS: its fixed part, then ``projection``'s host RAM, the block
        stage with one batch's temporaries (on the CPU they are host memory)."""
        assert method.recipe is not None
        batch = formulas.batch_temporary_bytes(self.shape, self.work.batch, self.work.seq_len)
        return self.overhead_bytes + projection.prepass_host_bytes(
            method.recipe, self.shape, self.work, extra=batch
        )

    def output_bytes(self) -> int:
        return formulas.model_params(self.shape) * self.work.output_bytes


def _label(method: Method, runs: CountRuns) -> str:
    return f"{method.label}, {runs.experts} experts"


def _add_time_rows(result: PartResult, counts: list[CountRuns]) -> None:
    for method in CALIBRATED:
        for runs in counts:
            ties = runs.merge_wall(REFERENCE.label)
            result.add(
                f"pre-pass wall, {_label(method, runs)}",
                seconds(runs.prepasses[method.label].wall_s),
                f"ties merge {seconds(ties)}",
                ratio(runs.prepasses[method.label].wall_s, ties),
            )
    for method in METHODS:
        target = 1.0 if method.regmean else TARGET_OVER_TIES.get(method.label)
        for runs in counts:
            ties = runs.merge_wall(REFERENCE.label)
            result.add(
                f"merge wall (warm cache), {_label(method, runs)}",
                seconds(runs.merge_wall(method.label)),
                f"ties {seconds(ties)}",
                ratio(runs.merge_wall(method.label), ties),
                at_most=target,
            )


def _add_memory_rows(
    result: PartResult, counts: list[CountRuns], predicted: dict[int, Formulas]
) -> None:
    for method in METHODS:
        for runs in counts:
            ties = runs.merge_peak(REFERENCE.label)
            result.add(
                f"merge peak RSS, {_label(method, runs)}",
                size(runs.merge_peak(method.label)),
                f"ties {size(ties)}",
                ratio(runs.merge_peak(method.label), ties),
            )
    for method in CALIBRATED:
        for runs in counts:
            peak = runs.prepasses[method.label].peak_rss_bytes
            ties = runs.merge_peak(REFERENCE.label)
            result.add(
                f"pre-pass peak RSS, {_label(method, runs)}",
                size(peak),
                f"ties merge {size(ties)}",
                ratio(peak, ties),
            )
            bound = predicted[runs.experts].host_bound(method)
            result.add(
                f"pre-pass peak RSS vs formula, {_label(method, runs)}",
                size(peak),
                f"formula {size(bound)}",
                ratio(peak, bound),
                at_most=1.0,
            )


def _add_disk_rows(
    result: PartResult, counts: list[CountRuns], predicted: dict[int, Formulas]
) -> None:
    for method in CALIBRATED:
        for runs in counts:
            formula = predicted[runs.experts].cache_bytes(method)
            cache = runs.caches[method.label]
            result.add(
                f"cache data, {_label(method, runs)}",
                size(cache.data_bytes),
                f"formula {size(formula)}",
                ratio(cache.data_bytes, formula),
                near=FORMULA_TOLERANCE,
            )
            result.add(
                f"cache directory, {_label(method, runs)}",
                size(cache.total_bytes),
                f"formula {size(formula)}",
                ratio(cache.total_bytes, formula),
            )
    for method in METHODS:
        for runs in counts:
            formula = predicted[runs.experts].output_bytes()
            output = runs.outputs[method.label]
            result.add(
                f"output data, {_label(method, runs)}",
                size(output.data_bytes),
                f"formula {size(formula)}",
                ratio(output.data_bytes, formula),
                near=FORMULA_TOLERANCE,
            )


def _add_growth_rows(result: PartResult, counts: list[CountRuns]) -> None:
    """The largest expert count against the smallest: what grows with the experts."""
    few, many = counts[0], counts[-1]
    growth = f"{many.experts} vs {few.experts} experts"
    for method in CALIBRATED:
        label = method.label
        result.add(
            f"cache directory, {label}, {growth}",
            size(many.caches[label].total_bytes),
            f"{few.experts} experts {size(few.caches[label].total_bytes)}",
            ratio(many.caches[label].total_bytes, few.caches[label].total_bytes),
            at_most=FLAT_TOLERANCE if method.regmean else None,
        )
        before, after = few.prepasses[label], many.prepasses[label]
        result.add(
            f"pre-pass wall, {label}, {growth}",
            seconds(after.wall_s),
            f"{few.experts} experts {seconds(before.wall_s)}",
            ratio(after.wall_s, before.wall_s),
        )
        result.add(
            f"pre-pass peak RSS, {label}, {growth}",
            size(after.peak_rss_bytes),
            f"{few.experts} experts {size(before.peak_rss_bytes)}",
            ratio(after.peak_rss_bytes, before.peak_rss_bytes),
        )


def _add_projection_rows(result: PartResult) -> None:
    accelerator = projection.H100
    for p in projection.projections():
        prefix = f"{p.model}, {p.recipe}:"
        model = f"bf16 model {size(p.model_bytes)}"
        result.add(f"{prefix} disk", size(p.disk_bytes), model, ratio(p.disk_bytes, p.model_bytes))
        result.add(
            f"{prefix} disk, keep_statistics",
            size(p.disk_kept_bytes),
            model,
            ratio(p.disk_kept_bytes, p.model_bytes),
        )
        result.add(
            f"{prefix} host RAM", size(p.host_bytes), model, ratio(p.host_bytes, p.model_bytes)
        )
        result.add(
            f"{prefix} GPU memory",
            size(p.gpu_bytes),
            f"{accelerator.name} {size(accelerator.memory_bytes)}",
            ratio(p.gpu_bytes, accelerator.memory_bytes),
            at_most=1.0,
        )
        result.add(
            f"{prefix} minutes ({p.flops:.2e} FLOPs)",
            f"{p.minutes:.1f} min",
            f"plain forward {p.forward_minutes:.1f} min",
            ratio(p.minutes, p.forward_minutes),
        )


def _run_data(run: MeasuredRun) -> dict[str, Any]:
    return {"wall_s": run.wall_s, "peak_rss_bytes": run.peak_rss_bytes}


def _count_data(runs: CountRuns, predicted: Formulas) -> dict[str, Any]:
    return {
        "prepass": {label: _run_data(run) for label, run in runs.prepasses.items()},
        "merges": {label: [_run_data(r) for r in rs] for label, rs in runs.merges.items()},
        "cache": {label: vars(use) for label, use in runs.caches.items()},
        "output": {label: vars(use) for label, use in runs.outputs.items()},
        "predicted_cache_bytes": {m.label: predicted.cache_bytes(m) for m in CALIBRATED},
        "predicted_host_bytes": {m.label: predicted.host_bound(m) for m in CALIBRATED},
        "predicted_block_stage_terms": {
            m.label: projection.prepass_host_terms(m.recipe, predicted.shape, predicted.work)  # type: ignore[arg-type]
            for m in CALIBRATED
        },
        "predicted_embedding_stage_bytes": {
            m.label: projection.embedding_stage_bytes(m.recipe, predicted.shape, predicted.work)  # type: ignore[arg-type]
            for m in CALIBRATED
        },
        "predicted_output_bytes": predicted.output_bytes(),
    }


def summarize(
    counts: list[CountRuns],
    predicted: dict[int, Formulas],
    checkpoints: Checkpoints,
    repeats: int,
    threads: int,
) -> PartResult:
    result = PartResult("experts", TITLE)
    _add_time_rows(result, counts)
    _add_memory_rows(result, counts, predicted)
    _add_disk_rows(result, counts, predicted)
    _add_growth_rows(result, counts)
    _add_projection_rows(result)
    work = predicted[counts[0].experts].work
    result.data = {
        "threads": threads,
        "repeats": repeats,
        "calibration_samples": work.samples,
        "calibration_seq_len": work.seq_len,
        "methods": {m.label: {"method": m.name, "hessian_source": m.source} for m in METHODS},
        "counts": {str(r.experts): _count_data(r, predicted[r.experts]) for r in counts},
        "warm_calibrate": _run_data(counts[0].warm) if counts[0].warm else None,
        "projection": [vars(p) for p in projection.projections()],
        "projection_assumptions": projection.assumptions(),
    }
    result.notes = _notes(checkpoints, work, repeats)
    return result


def _notes(checkpoints: Checkpoints, work: projection.Workload, repeats: int) -> list[str]:
    sizes = checkpoints.sizes
    return [
        f"base: {sizes.shallowest} layers, hidden {sizes.hidden}, float32; experts = base + "
        f"N(0, ({sizes.task_vector_scale} x std)^2) per tensor, each its own seed, calibration "
        "text prose and code in turn; density 0.3 where the method trims, weights 1/n (TIES "
        "methods) or 1 (RegMean's), every other setting at its default (sparsegpt_regmean: "
        "hessian_source merged, compensate true)",
        f"pre-pass: {work.samples} x {work.seq_len} tokens per task (half the merge part's, to "
        f"keep the part short), timed once; merges: {repeats} run(s) per method and count, "
        "medians, interpreter start-up included; every plugin merge read its cache and "
        "computed nothing (checked)",
        "formulas: benchmarks/perf/projection.py. Cache data = tensor bytes of the cache's "
        "entries; cache directory = every file left in it. Pre-pass RSS formula = peak of "
        f"{WARM_METHOD.label}'s calibrate with a warm cache (imports, planning, tokenizing) + "
        "blocks being read + every held task's activations + their Grams of one block + the "
        "solve's float64 sums (TIES: the factorisation) + one batch's temporaries",
        f"projection: {projection.assumptions()}; RegMean++ forwards each block "
        f"{projection.MERGED_SOURCE_PASSES} times per task",
    ]
