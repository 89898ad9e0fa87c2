"""Rules against rules, each chosen on validation: the tables of issue 16.

    python -m benchmarks.quality.rule_groups OUT_SEED0 OUT_SEED1 ... [--json FILE]

A group is a set of grid rows (every density of each); per family, the row and density with the
best validation score is chosen and its held-out score and prose loss are reported. Each pair
compares a group with its reference in the same family (scores of different families are not
comparable), with the issue's target where it has one.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

STOCK_REST = "stock-rest"
GROUPS: dict[str, tuple[str, ...]] = {
    "ties": ("ties",),
    "regmean today": ("regmean[merged,stock-rest]",),
    "regmean + lm_head": ("regmean[merged,head]",),
    "regmean + embedding": ("regmean[merged,tokens]",),
    "regmean new": ("regmean[merged,new]",),
    "regmean[finetuned] today": ("regmean[finetuned,stock-rest]",),
    "regmean[finetuned] new": ("regmean[finetuned,new]",),
    "regmean[merged] new, smoothing 0.1": ("regmean[merged,smoothing=0.1]",),
    "regmean[merged] new, smoothing 2": ("regmean[merged,smoothing=2.0]",),
    "sparsegpt_regmean today": ("sparsegpt_regmean[wanda,compensate,merged,stock-rest]",),
    "sparsegpt_regmean new": ("sparsegpt_regmean[wanda,compensate,merged,new]",),
    "sparsegpt_ties today": ("sparsegpt_ties[wanda,base,stock-rest]",),
    "sparsegpt_ties + lm_head": ("sparsegpt_ties[wanda,base,head]",),
    "sparsegpt_ties + embedding": ("sparsegpt_ties[wanda,base,tokens]",),
    "sparsegpt_ties + both": ("sparsegpt_ties[wanda,base,new]",),
    "sparsegpt_ties + energy": ("sparsegpt_ties[wanda,base,energy,stock-rest]",),
    "sparsegpt_ties + all": ("sparsegpt_ties[wanda,base,energy]",),
    # The norms (every row above keeps their stock rule): by channel energy or plain mean.
    "regmean + norms": ("regmean[merged,norms]",),
    "regmean new + norms": ("regmean[merged,all]",),
    "regmean new + norms by mean": ("regmean[merged,all,norms=mean]",),
    "sparsegpt_regmean new + norms": ("sparsegpt_regmean[wanda,compensate,merged,all]",),
    "sparsegpt_ties + all + norms": ("sparsegpt_ties[wanda,base,all]",),
    "sparsegpt_ties + all + norms by mean": ("sparsegpt_ties[wanda,base,all,norms=mean]",),
    # sparsegpt_dare (each row over three seeds): before issue 16, its default (lm_head and
    # embedding data-aware, norms stock), and its norms by mean or by channel energy.
    "dare_linear": ("dare_linear",),
    "sparsegpt_dare today": ("sparsegpt_dare[stock-rest]",),
    "sparsegpt_dare new": ("sparsegpt_dare[new]",),
    "sparsegpt_dare new + norms by mean": ("sparsegpt_dare[new,norms=mean]",),
    "sparsegpt_dare new + norms by energy": ("sparsegpt_dare[new,norms=energy]",),
    "sparsegpt_dare new + combine by energy": ("sparsegpt_dare[new,combine=energy]",),
    "sparsegpt_dare today + combine by energy": ("sparsegpt_dare[stock-rest,combine=energy]",),
    "sparsegpt_dare lm_head + combine by energy": ("sparsegpt_dare[head,combine=energy]",),
    # The default since: the embedding by counts, lm_head stock, combined by energy.
    "sparsegpt_dare embedding + combine by energy": ("sparsegpt_dare[tokens,combine=energy]",),
    "sparsegpt_dare, any rule": tuple(
        f"sparsegpt_dare[{suffix}]"
        for suffix in (
            "stock-rest",
            "new",
            "new,combine=energy",
            "stock-rest,combine=energy",
            "head,combine=energy",
            "tokens,combine=energy",
        )
    ),
    # A tied family (--tied): the rules for the one tensor that is embedding and head.
    "regmean, tied: blend": ("regmean[merged,tied=blend]",),
    "regmean, tied: head": ("regmean[merged,tied=head]",),
    "regmean, tied: tokens": ("regmean[merged,tied=tokens]",),
    # Which rule validation picks when it may pick any of them.
    "sparsegpt_ties, any rule": tuple(
        f"sparsegpt_ties[wanda,base{suffix}]"
        for suffix in (
            ",stock-rest",
            ",head",
            ",tokens",
            ",new",
            ",energy,stock-rest",
            ",energy",
            ",all",
            ",all,norms=mean",
        )
    ),
    "regmean, any rule": (
        "regmean[merged,stock-rest]",
        "regmean[merged,head]",
        "regmean[merged,tokens]",
        "regmean[merged,new]",
        "regmean[merged,all]",
        "regmean[merged,all,norms=mean]",
    ),
}
# (group, reference, target difference or None)
PAIRS: tuple[tuple[str, str, float | None], ...] = (
    ("regmean new", "regmean today", 0.05),
    ("regmean + lm_head", "regmean today", None),
    ("regmean + embedding", "regmean today", None),
    ("regmean[finetuned] new", "regmean[finetuned] today", None),
    ("regmean[merged] new, smoothing 0.1", "regmean new", None),
    ("regmean[merged] new, smoothing 2", "regmean new", None),
    ("sparsegpt_regmean new", "sparsegpt_regmean today", None),
    ("sparsegpt_ties today", "ties", None),
    ("sparsegpt_ties + lm_head", "ties", None),
    ("sparsegpt_ties + embedding", "ties", None),
    ("sparsegpt_ties + both", "ties", None),
    ("sparsegpt_ties + energy", "ties", 0.03),
    ("sparsegpt_ties + all", "ties", 0.03),
    ("sparsegpt_ties + all", "sparsegpt_ties today", None),
    ("regmean + norms", "regmean today", None),
    ("regmean new + norms", "regmean new", None),
    ("regmean new + norms by mean", "regmean new", None),
    ("regmean new + norms", "regmean today", 0.05),
    ("sparsegpt_regmean new + norms", "sparsegpt_regmean new", None),
    ("sparsegpt_ties + all + norms", "sparsegpt_ties + all", None),
    ("sparsegpt_ties + all + norms by mean", "sparsegpt_ties + all", None),
    ("sparsegpt_ties + all + norms", "ties", 0.03),
    ("sparsegpt_ties + all + norms by mean", "ties", 0.03),
    ("regmean, tied: blend", "regmean today", None),
    ("regmean, tied: head", "regmean today", None),
    ("regmean, tied: tokens", "regmean today", None),
    ("sparsegpt_dare today", "dare_linear", None),
    ("sparsegpt_dare new", "dare_linear", None),
    ("sparsegpt_dare new", "sparsegpt_dare today", None),
    ("sparsegpt_dare new + norms by mean", "sparsegpt_dare new", None),
    ("sparsegpt_dare new + norms by energy", "sparsegpt_dare new", None),
    ("sparsegpt_dare new + combine by energy", "sparsegpt_dare new", None),
    ("sparsegpt_dare embedding + combine by energy", "sparsegpt_dare new", None),
    ("sparsegpt_dare embedding + combine by energy", "dare_linear", None),
    ("sparsegpt_dare, any rule", "dare_linear", None),
    ("sparsegpt_ties, any rule", "ties", 0.03),
    ("regmean, any rule", "regmean today", 0.05),
)


@dataclass(frozen=True)
class Chosen:
    setting: str
    heldout: float
    prose: float
    gains: dict[str, float]  # per expert domain: its share of the expert's loss gain


def read_runs(out: Path) -> list[dict[str, str]]:
    with (out / "runs.csv").open(encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def chosen(runs: list[dict[str, str]], variants: tuple[str, ...]) -> Chosen | None:
    """The row x density with the best validation score (mean over seeds)."""
    settings: dict[tuple[str, str], list[dict[str, str]]] = {}
    for run in runs:
        if run["variant"] in variants and run["score"]:
            settings.setdefault((run["variant"], run["density"]), []).append(run)
    if not settings:
        return None

    def mean(rows: list[dict[str, str]], field: str) -> float:
        return statistics.fmean(float(r[field]) for r in rows)

    (variant, density), rows = max(
        settings.items(), key=lambda item: mean(item[1], "validation_score")
    )
    domains = [field for field in rows[0] if field.startswith("gain_") and rows[0][field]]
    return Chosen(
        f"{variant} d={density or '-'}",
        mean(rows, "score"),
        mean(rows, "loss_prose"),
        {field.removeprefix("gain_"): mean(rows, field) for field in domains},
    )


def compare(outs: list[Path]) -> tuple[str, dict]:
    families = [
        {name: chosen(read_runs(out), rows) for name, rows in GROUPS.items()} for out in outs
    ]
    lines = ["each group at its setting chosen on validation: held-out score / prose loss"]
    for name in GROUPS:
        cells = [f[name] for f in families]
        text = "  ".join(
            "-" if c is None else f"{c.heldout:.3f} / {c.prose:.3f} ({c.setting})" for c in cells
        )
        lines.append(f"  {name:<38} {text}")
    lines += ["", "group minus reference, per family (held-out score; prose loss)"]
    record = {"families": [str(o) for o in outs], "pairs": []}
    for group, reference, target in PAIRS:
        pairs = [(f[group], f[reference]) for f in families if f[group] and f[reference]]
        if not pairs:
            continue
        scores = [ours.heldout - ref.heldout for ours, ref in pairs]
        prose = [ours.prose - ref.prose for ours, ref in pairs]
        verdict = ""
        if target is not None:
            verdict = "  PASS" if min(scores) >= target else f"  MISS (target +{target:.2f} each)"
        per_family = ", ".join(f"{s:+.3f}; {p:+.3f}" for s, p in zip(scores, prose, strict=True))
        lines.append(
            f"  {group} - {reference}: mean {statistics.fmean(scores):+.3f} [{per_family}]{verdict}"
        )
        domains = {
            domain: [ours.gains[domain] - ref.gains[domain] for ours, ref in pairs]
            for domain in pairs[0][0].gains
        }
        lines.append(
            "      per domain, mean: "
            + ", ".join(f"{d} {statistics.fmean(v):+.3f}" for d, v in domains.items())
        )
        record["pairs"].append(
            {
                "group": group,
                "reference": reference,
                "scores": scores,
                "prose": prose,
                "domains": domains,
            }
        )
    record["chosen"] = [
        {name: None if c is None else vars(c) for name, c in f.items()} for f in families
    ]
    return "\n".join(lines), record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outs", type=Path, nargs="+")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    arguments = parser.parse_args()
    text, record = compare(arguments.outs)
    print(text)
    if arguments.json:
        arguments.json.write_text(json.dumps(record, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
