"""Quality benchmark (issue 3 §1): merge tiny Llama experts with every method x density.

    python -m benchmarks.quality [--out DIR] [--jobs 2] [--quick]

Run from the repository root. CPU only: 9 minutes from scratch on 2 idle cores (16 with another
job competing); a rerun with the same --out skips every model and merge already finished, and
--redo discards the stored results of the named variants. Writes into --out (the tables and the
plot cover the variants selected in that run):
sources.json, family/ (HF checkpoints + tokenizer, calibration files), configs/, results/,
reference.json, runs.csv, table.csv, table.txt, score_vs_density.png, summary.json.

Exit status: 0 when every check passed and no merge failed; 1 otherwise; 2 when the experts or
the base fail their sanity checks (no merge is run then).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from transformers import AutoTokenizer
from transformers.utils import logging as hf_logging

from benchmarks.quality import checks, grid, report, tasks
from benchmarks.quality.family import BASE_DOMAIN, FULL, QUICK, build_family
from benchmarks.quality.outliers import spread_family
from benchmarks.quality.scoring import EvalSet, evaluate, make_eval_set
from mergekit_sparsegpt.demo.build import Family, Sizes

HELDOUT_WINDOWS, HELDOUT_PROBLEMS = 32, 200
# 32 x 64 tokens fits every calibration split (the smallest, add, holds ~2,200 tokens).
CALIBRATION_SAMPLES, CALIBRATION_SEQ_LEN = 32, 64
VALIDATION_SPLIT = "validation"
HALF = 0.5
TRIM_SHOWN = "sparsegpt_ties[wanda]"  # whose per-tensor-type trim table is printed
DEFAULT_OUT = Path(__file__).resolve().parent / "out"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.quality",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"default {DEFAULT_OUT}")
    parser.add_argument("--jobs", type=int, default=2, help="parallel trainings and merges")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument(
        "--family-seed",
        type=int,
        default=0,
        help="seed of the models' initialisation and training (the data splits stay the same): "
        "rerun with other seeds into other --out directories to see the spread across families",
    )
    parser.add_argument(
        "--channel-spread",
        type=float,
        default=0.0,
        metavar="SIGMA",
        help="give every linear's input channels log-normal energy spread (log s ~ N(0, SIGMA^2)) "
        "by an exact, function-preserving rescaling of all models, as real LLMs' outlier "
        "channels (benchmarks/quality/outliers.py); 0: off",
    )
    parser.add_argument(
        "--tied",
        action="store_true",
        help="a family whose token embedding is lm_head too (tie_word_embeddings); a new --out",
    )
    parser.add_argument("--variants", help=f"comma-separated subset of: {', '.join(grid.VARIANTS)}")
    parser.add_argument("--densities", help="comma-separated, default " + str(grid.DENSITIES))
    parser.add_argument("--keep-merges", action="store_true", help="keep merged checkpoints")
    parser.add_argument(
        "--redo", help="variants whose stored results to discard first (same syntax as --variants)"
    )
    return parser.parse_args(argv)


def _variant_names(text: str) -> list[str]:
    # Commas inside [...] belong to a name, e.g. "sparsegpt_ties[wanda,base]".
    names = re.split(r",(?![^\[]*\])", text)
    unknown = [n for n in names if n not in grid.VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; known: {', '.join(grid.VARIANTS)}")
    return names


def _selection(
    variants: str | None, densities: str | None
) -> tuple[dict[str, grid.Variant], tuple[float, ...]]:
    names = _variant_names(variants) if variants else list(grid.VARIANTS)
    if grid.AVERAGING not in names:
        names.insert(0, grid.AVERAGING)  # the averaging check needs it
    chosen = tuple(float(d) for d in densities.split(",")) if densities else grid.DENSITIES
    return {n: grid.VARIANTS[n] for n in names}, chosen


def _settings(sizes: Sizes, channel_spread: float) -> dict:
    recorded = asdict(sizes)
    if not sizes.tied:  # runs made before the option had none: they stay comparable
        del recorded["tied"]
    return {
        "sizes": recorded,
        **({"channel_spread": channel_spread} if channel_spread else {}),
        "domains": list(tasks.domains()),
        "heldout": [HELDOUT_WINDOWS, HELDOUT_PROBLEMS],
        VALIDATION_SPLIT: [HELDOUT_WINDOWS, HELDOUT_PROBLEMS],
        "calibration": [CALIBRATION_SAMPLES, CALIBRATION_SEQ_LEN],
    }


def _check_settings(out: Path, settings: dict) -> None:
    """Resuming into a directory built with other settings would mix incomparable numbers."""
    path = out / "settings.json"
    if path.is_file():
        before = json.loads(path.read_text(encoding="utf-8"))
        if before != settings:
            raise SystemExit(f"{out} was made with other settings ({path}); use another --out")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=1), encoding="utf-8")


def _reference_table(rows: dict[str, dict[str, float]], domains: list[str]) -> str:
    accs = [k for k in next(iter(rows.values())) if k.endswith("_acc")]
    head = f"{'model':<16}" + "".join(f"{d:>10}" for d in domains + accs)
    lines = [head, "-" * len(head)]
    for name, s in rows.items():
        cells = "".join(f"{s[d]:>10.3f}" for d in domains)
        lines.append(f"{name:<16}{cells}" + "".join(f"{s[a]:>10.1%}" for a in accs))
    return "\n".join(lines)


@dataclass
class Reference:
    """The family, its evaluation set, and the base's and experts' own scores."""

    family: Family
    evalset: EvalSet
    base: dict[str, float]
    experts: dict[str, dict[str, float]]
    validation_set: EvalSet
    validation: dict[str, dict[str, float]]  # "base" and each expert, on the validation split
    eval_s: float  # one evaluation, for the time budget
    ok: bool  # base not awful and every expert clearly beats it


def _reference(out: Path, sizes: Sizes, jobs: int, channel_spread: float) -> Reference:
    """Build (or find) the models, score them, and print and record the sanity checks."""
    domains = tasks.domains()
    family = build_family(out / "family", sizes, jobs)
    tokenizer = AutoTokenizer.from_pretrained(str(family.tokenizer))
    evalset = make_eval_set(tokenizer, domains, HELDOUT_WINDOWS, sizes.seq_len, HELDOUT_PROBLEMS)
    if channel_spread:
        unspread = evaluate(family.base, evalset)
        family = spread_family(family, out / "family_spread", channel_spread, sizes.seed)
    start = time.perf_counter()
    base = evaluate(family.base, evalset)
    eval_s = time.perf_counter() - start
    if channel_spread:
        change = max(abs(base[k] - unspread[k]) for k in base)
        print(f"channel spread {channel_spread:g}: base scores move by at most {change:.1e}")
    experts = {n: evaluate(p, evalset) for n, p in family.experts.items()}
    validation_set = make_eval_set(
        tokenizer, domains, HELDOUT_WINDOWS, sizes.seq_len, HELDOUT_PROBLEMS, VALIDATION_SPLIT
    )
    validation = {
        name: evaluate(path, validation_set)
        for name, path in {"base": family.base, **family.experts}.items()
    }
    print(f"\n{_reference_table({'base': base, **experts}, [*evalset.windows, *evalset.qa])}\n")
    prose = domains[BASE_DOMAIN].texts("train")
    unigram = checks.unigram_loss(prose, evalset.windows[BASE_DOMAIN], tokenizer, sizes.seq_len)
    base_ok = checks.check_base(base[BASE_DOMAIN], unigram, len(tokenizer))
    experts_ok = checks.check_experts(base, experts)
    tv_stats = checks.task_vector_stats(family)
    checks.print_task_vector_stats(tv_stats)
    half = checks.scaled_expert_accuracy(family, evalset, HALF)
    cells = ", ".join(f"{t} {a:.1%} (expert {experts[t][f'{t}_acc']:.1%})" for t, a in half.items())
    print(f"exact match of base + {HALF} x tau (a merge that halves a task vector): {cells}")
    record = {"base": base, "experts": experts, "unigram_prose_loss": unigram}
    record[VALIDATION_SPLIT] = validation
    record.update({f"accuracy_at_{HALF}_tau": half, **tv_stats})
    (out / "reference.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
    return Reference(
        family, evalset, base, experts, validation_set, validation, eval_s, base_ok and experts_ok
    )


def _forget(out: Path, names: list[str]) -> None:
    """Drop stored results of these variants, e.g. after their implementation changed."""
    for path in (out / "results").glob("*.json"):
        if json.loads(path.read_text(encoding="utf-8"))["variant"] in names:
            path.unlink()


def _report(
    ref: Reference, runner: grid.GridRun, results: dict, variants: list[str], densities
) -> tuple[list[dict], bool]:
    """Print the tables and comparisons; write the CSVs, table.txt and the plot."""
    rows = report.run_rows(list(results.values()), ref.base, ref.experts, ref.validation)
    table = report.cells(rows, BASE_DOMAIN)
    method_of = {name: v.method for name, v in grid.VARIANTS.items()}
    chosen = report.chosen_on_validation(table, method_of)
    averaging = table.get((grid.AVERAGING, None))
    label = f"plain averaging ({grid.AVERAGING}, weights 1/{len(ref.experts)})"
    print()
    averaging_ok = averaging is not None and checks.check_averaging(averaging.gains, label)
    qa = list(ref.evalset.qa)
    expert_acc = "/".join(f"{100 * ref.experts[t][f'{t}_acc']:.0f}" for t in qa)
    text = "\n\n".join(
        [
            "normalized score = mean over expert domains of (base - merged) / (base - expert)"
            " held-out loss; mean±std over seeds",
            report.format_table(table, variants, densities, "score"),
            f"{BASE_DOMAIN} loss, the base's domain (retention; base {ref.base[BASE_DOMAIN]:.3f})",
            report.format_table(table, variants, densities, "prose"),
            f"exact-match accuracy in % ({'/'.join(qa)}); experts: {expert_acc}",
            report.format_table(table, variants, densities, "accuracy"),
            "\n".join(report.comparison(table, densities)),
            report.format_chosen(chosen),
        ]
    )
    print(f"\n{text}\n")
    out = runner.out
    (out / "table.txt").write_text(text + "\n", encoding="utf-8")
    report.write_csv(out / "runs.csv", rows)
    report.write_csv(out / "table.csv", report.table_rows(table))
    report.write_csv(out / "chosen_on_validation.csv", chosen)
    trims = report.trim_rows(list(results.values()))
    if trims:
        report.write_csv(out / "trim_by_tensor_type.csv", trims)
        blocks = [report.format_trim_table(trims, v) for v in variants]
        (out / "trim_by_tensor_type.txt").write_text(
            "\n\n".join(b for b in blocks if b) + "\n", encoding="utf-8"
        )
        print(report.format_trim_table(trims, TRIM_SHOWN) or "", end="\n\n")
    plotted = [v for v in variants if grid.VARIANTS[v].plotted]
    if not report.plot(out / "score_vs_density.png", table, plotted, densities):
        print("matplotlib is not installed: no score_vs_density.png (pip install matplotlib)")
    for variant, reason in runner.skipped.items():
        print(f"skipped {variant}: {reason}")
    for slug, error in runner.failed.items():
        print(f"\nmerge {slug} failed:\n{error}")
    return rows, averaging_ok


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)  # tiny models: threads only fight the parallel jobs for 2 cores
    start = time.perf_counter()
    variants, densities = _selection(args.variants, args.densities)
    sizes = replace(QUICK if args.quick else FULL, seed=args.family_seed, tied=args.tied)
    out = args.out.resolve()
    _check_settings(out, _settings(sizes, args.channel_spread))
    (out / "sources.json").write_text(json.dumps(tasks.sources(), indent=1), encoding="utf-8")
    lang = tasks.man_language()[0]
    print(
        f"output: {out}\ndomains: {', '.join(tasks.domains())} (other language: {lang or 'none'})"
    )
    if args.redo:
        _forget(out, _variant_names(args.redo))

    ref = _reference(out, sizes, args.jobs, args.channel_spread)
    build_s = time.perf_counter() - start
    if not ref.ok and not args.quick:  # --quick models are only a smoke test
        print("sanity checks failed: not merging (a ranking on these models would mean nothing)")
        return 2
    jobs = grid.plan(variants, densities)
    print(f"\n{len(jobs)} merges ({len(variants)} variants); one evaluation {ref.eval_s:.1f}s")
    calibration = grid.Calibration(CALIBRATION_SAMPLES, CALIBRATION_SEQ_LEN, out / "cache")
    runner = grid.GridRun(
        ref.family,
        calibration,
        lambda p: evaluate(p, ref.evalset),
        out,
        args.keep_merges,
        validate=lambda p: evaluate(p, ref.validation_set),
    )
    results = runner.run_all(jobs, args.jobs)
    grid_s = time.perf_counter() - start - build_s
    rows, averaging_ok = _report(ref, runner, results, list(variants), densities)

    total_s = time.perf_counter() - start
    merge_times = [r["merge_s"] for r in rows]
    summary = {
        "seconds": {"total": total_s, "models": build_s, "grid": grid_s, "one_eval": ref.eval_s},
        "mean_merge_s": statistics.fmean(merge_times) if merge_times else None,
        "runs": len(rows),
        "skipped": runner.skipped,
        "failed": list(runner.failed),
        "checks": {"models": ref.ok, "averaging": averaging_ok},
        "other_language": lang or None,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    print(f"wrote {', '.join(sorted(p.name for p in out.iterdir()))} in {out}")
    print(f"total {total_s:.0f}s (models + checks {build_s:.0f}s, merges + scoring {grid_s:.0f}s)")
    return 0 if ref.ok and averaging_ok and not runner.failed else 1


if __name__ == "__main__":
    sys.exit(main())
