"""Spread across model families: each variant's score minus stock ``ties``, per family.

    python -m benchmarks.quality.families OUT_SEED0 OUT_SEED1 ... [--reference ties]

Each OUT is a finished ``python -m benchmarks.quality --family-seed N --out OUT`` run. Scores of
different families are not comparable (their bases and experts differ), so the difference to
the reference measured in the same family is what is averaged: mean ± std over families, and
how many families the variant beat the reference in. The same is done for each merge method at
the setting chosen on the validation split (``chosen_on_validation.csv``), when every OUT has one.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from pathlib import Path

Key = tuple[str, str]  # (variant, density as written in table.csv; "" for density-free rows)


def read_scores(out: Path) -> dict[Key, float]:
    with (out / "table.csv").open(encoding="utf-8") as handle:
        return {
            (r["variant"], r["density"]): float(r["score_mean"]) for r in csv.DictReader(handle)
        }


def read_chosen(out: Path) -> dict[str, tuple[str, float]] | None:
    """Method -> (its setting chosen on validation, that setting's held-out score)."""
    path = out / "chosen_on_validation.csv"
    if not path.is_file():
        return None
    with path.open(encoding="utf-8") as handle:
        return {
            r["method"]: (f"{r['chosen']} d={r['density'] or '-'}", float(r["heldout_score"]))
            for r in csv.DictReader(handle)
        }


def format_chosen_differences(families: list[dict[str, tuple[str, float]]], reference: str) -> str:
    """Per method: held-out score at its chosen setting minus the reference's, per family."""
    methods = list(dict.fromkeys(m for chosen in families for m in chosen if m != reference))
    width = max(len(m) for m in [*methods, "method"]) + 2
    lines = [
        f"each method at the setting chosen on validation, held-out score minus {reference} at "
        f"its chosen setting in the same family: mean ± std [higher / families]; the settings",
        f"{'method':<{width}}{'difference':>20}  chosen settings per family",
    ]
    for method in methods:
        pairs = [(c[method], c[reference]) for c in families if method in c and reference in c]
        values = [ours[1] - ref[1] for ours, ref in pairs]
        if not values:
            continue
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        text = f"{statistics.fmean(values):+.3f}±{spread:.3f} [{sum(v > 0 for v in values)}/"
        text += f"{len(values)}]"
        settings = "; ".join(ours[0] for ours, _ in pairs)
        lines.append(f"{method:<{width}}{text:>20}  {settings}")
    return "\n".join(lines)


def paired_differences(families: list[dict[Key, float]], reference: str) -> dict[Key, list[float]]:
    """Per (variant, density): variant minus reference, one value per family that has both."""
    differences: dict[Key, list[float]] = {}
    for scores in families:
        for (variant, density), score in scores.items():
            ref = scores.get((reference, density))
            if variant != reference and ref is not None:
                differences.setdefault((variant, density), []).append(score - ref)
    return differences


def format_differences(differences: dict[Key, list[float]], reference: str, count: int) -> str:
    densities = sorted({d for _, d in differences}, key=float)
    variants = list(dict.fromkeys(v for v, _ in differences))
    width = max(len(v) for v in [*variants, "method"]) + 2
    head = f"{'method':<{width}}" + "".join(f"{'d=' + d:>20}" for d in densities)
    lines = [
        f"score minus {reference} in the same family: mean ± std over families "
        f"[families where it is higher / families]; {count} families",
        head,
        "-" * len(head),
    ]
    for variant in variants:
        cells = []
        for density in densities:
            values = differences.get((variant, density))
            if not values:
                cells.append(f"{'-':>20}")
                continue
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            wins = sum(v > 0 for v in values)
            text = f"{statistics.fmean(values):+.3f}±{spread:.3f} [{wins}/{len(values)}]"
            cells.append(f"{text:>20}")
        lines.append(f"{variant:<{width}}" + "".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality.families")
    parser.add_argument("outs", nargs="+", type=Path, help="finished benchmark --out directories")
    parser.add_argument("--reference", default="ties")
    args = parser.parse_args(argv)
    families = [read_scores(out) for out in args.outs]
    differences = paired_differences(families, args.reference)
    print(format_differences(differences, args.reference, len(families)))
    chosen = [read_chosen(out) for out in args.outs]
    if all(c is not None for c in chosen):
        print()
        print(format_chosen_differences(chosen, args.reference))
    return 0


if __name__ == "__main__":
    sys.exit(main())
