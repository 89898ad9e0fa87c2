"""Aggregate per-merge results into the method x density table, its CSVs and the plot."""

from __future__ import annotations

import csv
import re
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.quality.scoring import normalized_gains
from mergekit_sparsegpt.methods.registry import is_plugin_method


@dataclass(frozen=True)
class Cell:
    """All runs (seeds) of one variant at one density."""

    variant: str
    density: float | None
    scores: list[float]  # normalized score per seed
    prose: list[float]  # base-domain (retention) loss per seed
    gains: dict[str, float]  # mean normalized gain per expert domain
    accuracy: dict[str, float]  # mean exact-match accuracy per exact-answer task
    validation: list[float]  # normalized score on the validation split per seed; [] if none

    @property
    def mean(self) -> float:
        return statistics.fmean(self.scores)

    @property
    def spread(self) -> float:
        return statistics.stdev(self.scores) if len(self.scores) > 1 else 0.0


def run_rows(
    results: Sequence[dict],
    base: Mapping[str, float],
    experts: Mapping[str, Mapping],
    validation: Mapping[str, Mapping[str, float]] | None = None,
) -> list[dict]:
    """One flat row per merge run, with its normalized gains and score.

    ``validation`` holds the base's (key ``"base"``) and each expert's validation-split scores;
    runs evaluated on that split then also get a ``validation_score``.
    """
    rows = []
    for r in results:
        gains = normalized_gains(r["scores"], base, experts)
        checked = {}
        if validation is not None and "validation_scores" in r:
            reference = {name: validation[name] for name in experts}
            val_gains = normalized_gains(r["validation_scores"], validation["base"], reference)
            checked["validation_score"] = statistics.fmean(val_gains.values())
        rows.append(
            {
                "variant": r["variant"],
                "method": r["method"],
                "density": r["density"],
                "seed": r["seed"],
                "score": statistics.fmean(gains.values()),
                **checked,
                **{f"gain_{d}": g for d, g in gains.items()},
                **{f"loss_{k}": v for k, v in r["scores"].items() if not k.endswith("_acc")},
                **{k: v for k, v in r["scores"].items() if k.endswith("_acc")},
                "merge_s": r["merge_s"],
                "eval_s": r["eval_s"],
            }
        )
    return rows


def cells(rows: Sequence[dict], prose: str) -> dict[tuple[str, float | None], Cell]:
    grouped: dict[tuple[str, float | None], list[dict]] = {}
    for row in rows:
        grouped.setdefault((row["variant"], row["density"]), []).append(row)
    out = {}
    for (variant, density), group in grouped.items():

        def mean(key: str, group: list[dict] = group) -> float:
            return statistics.fmean(r[key] for r in group)

        out[(variant, density)] = Cell(
            variant,
            density,
            [r["score"] for r in group],
            [r[f"loss_{prose}"] for r in group],
            {k[5:]: mean(k) for k in group[0] if k.startswith("gain_")},
            {k[:-4]: mean(k) for k in group[0] if k.endswith("_acc")},
            [r["validation_score"] for r in group if "validation_score" in r],
        )
    return out


def chosen_on_validation(
    table: Mapping[tuple[str, float | None], Cell], method_of: Mapping[str, str]
) -> list[dict]:
    """Per merge method: its setting (variant x density) with the best validation score.

    Every variant of a method is one candidate setting of its hyperparameters; the held-out
    score of the chosen setting is the honest number, and the best held-out score (chosen by
    peeking at the held-out data) shows what the choice on validation data gave away.
    """
    by_method: dict[str, list[Cell]] = {}
    for (variant, _), cell in table.items():
        if cell.validation and len(cell.validation) == len(cell.scores):
            by_method.setdefault(method_of[variant], []).append(cell)
    rows = []
    for method, candidates in by_method.items():
        chosen = max(candidates, key=lambda c: statistics.fmean(c.validation))
        peeked = max(candidates, key=lambda c: c.mean)
        rows.append(
            {
                "method": method,
                "candidates": len(candidates),
                "chosen": chosen.variant,
                "density": chosen.density,
                "validation_score": statistics.fmean(chosen.validation),
                "heldout_score": chosen.mean,
                "best_heldout": peeked.mean,
                "best_heldout_setting": f"{peeked.variant} d={peeked.density}",
            }
        )
    return sorted(rows, key=lambda row: -row["heldout_score"])


def format_chosen(rows: Sequence[dict]) -> str:
    head = (
        f"{'method':<20}{'settings':>9}  {'chosen on validation':<50}{'valid.':>8}"
        f"{'held-out':>10}{'best held-out':>15}"
    )
    lines = [
        "each method at its setting (variant x density) with the best validation score; "
        "held-out score of that setting, and the best held-out score of any of its settings",
        head,
        "-" * len(head),
    ]
    for r in rows:
        setting = r["chosen"] + ("" if r["density"] is None else f" d={r['density']:g}")
        lines.append(
            f"{r['method']:<20}{r['candidates']:>9}  {setting:<50}{r['validation_score']:>8.3f}"
            f"{r['heldout_score']:>10.3f}{r['best_heldout']:>15.3f}"
        )
    return "\n".join(lines)


def _fmt(cell: Cell | None, value: str) -> str:
    if cell is None:
        return "-"
    if value == "score":
        if len(cell.scores) > 1:
            return f"{cell.mean:.3f}±{cell.spread:.3f}"
        return f"{cell.mean:.3f}"
    if value == "accuracy":
        return "/".join(f"{100 * a:.0f}" for a in cell.accuracy.values())
    return f"{statistics.fmean(cell.prose):.3f}"


def format_table(
    table: Mapping[tuple[str, float | None], Cell],
    variants: Sequence[str],
    densities: Sequence[float],
    value: str,
) -> str:
    """Rows = variants, columns = densities (plus one for density-free methods)."""
    columns: list[float | None] = [None, *densities]
    width = max(len(v) for v in [*variants, "method"]) + 2
    head = f"{'method':<{width}}" + "".join(
        f"{'no trim' if d is None else f'd={d:g}':>14}" for d in columns
    )
    lines = [head, "-" * len(head)]
    for v in variants:
        if not any((v, d) in table for d in columns):
            continue
        cells = "".join(f"{_fmt(table.get((v, d)), value):>14}" for d in columns)
        lines.append(f"{v:<{width}}{cells}")
    return "\n".join(lines)


def is_ours(variant: str) -> bool:
    return is_plugin_method(variant.split("[")[0])


def comparison(
    table: Mapping[tuple[str, float | None], Cell], densities: Sequence[float]
) -> list[str]:
    """Per density: our best variant against ties and dare_ties, said plainly."""
    lines = []
    for d in densities:
        ours = [c for (v, dd), c in table.items() if dd == d and is_ours(v)]
        ties, dare = table.get(("ties", d)), table.get(("dare_ties", d))
        if not ours or ties is None:
            continue
        best = max(ours, key=lambda c: c.mean)
        line = f"d={d:<5g} best ours {best.variant} {best.mean:.3f} vs ties {ties.mean:.3f}"
        line += f" ({best.mean - ties.mean:+.3f})"
        if dare is not None:
            line += f", vs dare_ties {dare.mean:.3f}±{dare.spread:.3f}"
            line += f" ({best.mean - dare.mean:+.3f})"
        worse = [c.variant for c in ours if c.mean < ties.mean]
        if worse:
            line += f"; WORSE than ties: {', '.join(worse)}"
        lines.append(line)
    return lines


# Fields of sparsegpt_report.json averaged per tensor type (over layers and experts).
TRIM_FIELDS = (
    "input_energy_cv",
    "magnitude_overlap",
    "relative_output_error",
    "magnitude_relative_output_error",
    "norm_ratio",
)


def tensor_type(name: str) -> str:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``self_attn.q_proj``."""
    found = re.search(r"\.\d+\.(.+?)(?:\.weight)?$", name)
    return found.group(1) if found else name


def trim_by_tensor_type(merge_report: Mapping) -> dict[str, dict[str, float]]:
    """Mean of each trim field per tensor type, over the importance-trimmed tensors."""
    values: dict[str, dict[str, list[float]]] = {}
    for name, tensor in merge_report["tensors"].items():
        if tensor["path"] != "importance":
            continue
        fields = values.setdefault(tensor_type(name), {})
        for entry in tensor["models"].values():
            for field in TRIM_FIELDS:
                if field in entry:
                    fields.setdefault(field, []).append(entry[field])
    return {
        kind: {field: statistics.fmean(v) for field, v in fields.items()}
        for kind, fields in sorted(values.items())
    }


def trim_rows(results: Sequence[dict]) -> list[dict]:
    """One row per (variant, density, tensor type) for the runs that kept their trim report."""
    rows = []
    for r in results:
        if r["seed"] != min(x["seed"] for x in results if x["variant"] == r["variant"]):
            continue  # the trim of Hessian tensors does not depend on the seed
        for kind, fields in r.get("trim_by_type", {}).items():
            rows.append(
                {"variant": r["variant"], "density": r["density"], "tensor": kind, **fields}
            )
    return sorted(rows, key=lambda row: (row["variant"], row["density"], row["tensor"]))


def format_trim_table(rows: Sequence[dict], variant: str) -> str:
    """Per tensor type and density: overlap with magnitude, output errors, norm ratio."""
    chosen = [r for r in rows if r["variant"] == variant]
    if not chosen:
        return ""
    head = (
        f"{'tensor':<18}{'density':>8}{'diag H cv':>11}{'overlap':>9}"
        f"{'err ours':>10}{'err magn.':>11}{'norm ratio':>12}"
    )
    lines = [f"{variant}: trim per tensor type (mean over layers and experts)", head]
    lines.append("-" * len(head))
    for r in chosen:
        lines.append(
            f"{r['tensor']:<18}{r['density']:>8g}{r['input_energy_cv']:>11.2f}"
            f"{r['magnitude_overlap']:>9.2f}{r['relative_output_error']:>10.3f}"
            f"{r['magnitude_relative_output_error']:>11.3f}{r['norm_ratio']:>12.2f}"
        )
    return "\n".join(lines)


def write_csv(path: Path, rows: Sequence[dict]) -> None:
    fields: list[str] = []
    for row in rows:
        fields.extend(k for k in row if k not in fields)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def table_rows(table: Mapping[tuple[str, float | None], Cell]) -> list[dict]:
    return [
        {
            "variant": c.variant,
            "density": c.density,
            "runs": len(c.scores),
            "score_mean": c.mean,
            "score_std": c.spread,
            **({"validation_mean": statistics.fmean(c.validation)} if c.validation else {}),
            "prose_loss": statistics.fmean(c.prose),
            **{f"gain_{d}": g for d, g in c.gains.items()},
            **{f"{t}_acc": a for t, a in c.accuracy.items()},
        }
        for c in table.values()
    ]


# Stock methods in black; ours coloured by importance score, with the line style telling the
# other options apart (dashed: Hessians from the base, dotted: compensate, dash-dot: per row).
STOCK_STYLES = {"ties": "-", "dare_ties": "--", "dare_linear": ":"}
IMPORTANCE_COLORS = {"wanda": "C0", "obs": "C1", "sparsegpt": "C2", "design_note": "C3"}
OPTION_STYLES: dict[frozenset[str], object] = {
    frozenset(): "-",
    frozenset({"base"}): "--",
    frozenset({"compensate"}): ":",
    frozenset({"row"}): "-.",
    frozenset({"compensate", "row"}): (0, (5, 1, 1, 1, 1, 1)),
}
OTHER_COLORS = ("C4", "C5", "C6", "C8", "C9")


def _fixed_style(variant: str) -> dict | None:
    """Stock methods and sparsegpt_ties variants have a style of their own; None otherwise."""
    if variant in STOCK_STYLES:
        return {"color": "black", "linestyle": STOCK_STYLES[variant]}
    options = variant[variant.find("[") + 1 : -1].split(",") if "[" in variant else []
    importance = options[0] if options and options[0] in IMPORTANCE_COLORS else None
    rest = frozenset(options[1:] if importance else options)
    if variant.startswith("sparsegpt_ties") and importance and rest in OPTION_STYLES:
        return {"color": IMPORTANCE_COLORS[importance], "linestyle": OPTION_STYLES[rest]}
    return None


def _styles(variants: Sequence[str]) -> dict[str, dict]:
    """Every variant's line style; the others take OTHER_COLORS in turn, dash-dot once used."""
    styles, others = {}, 0
    for variant in variants:
        fixed = _fixed_style(variant)
        if fixed is None:
            dashes = "-" if others < len(OTHER_COLORS) else "-."
            fixed = {"color": OTHER_COLORS[others % len(OTHER_COLORS)], "linestyle": dashes}
            others += 1
        styles[variant] = fixed
    return styles


def plot(
    path: Path,
    table: Mapping[tuple[str, float | None], Cell],
    variants: Sequence[str],
    densities: Sequence[float],
) -> bool:
    """Score vs density, one line per variant; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(11, 6.5))
    trimmed = [c for (_, d), c in table.items() if d is not None]
    low = min(c.mean - c.spread for c in trimmed)
    high = max(c.mean + c.spread for c in trimmed)
    pad = 0.05 * (high - low) + 0.01
    off_chart: list[str] = []
    shown = [low, high]
    trimmed_variants = [v for v in variants if any((v, d) in table for d in densities)]
    styles = _styles(trimmed_variants)
    for v in variants:
        dense = table.get((v, None))
        if dense is not None:
            # A density-free method is one horizontal line; one far below would squash the rest.
            if low - 3 * pad <= dense.mean <= high + 3 * pad:
                ax.axhline(dense.mean, color="grey", lw=1.2, linestyle="-.", label=f"{v} (no trim)")
                shown.append(dense.mean)
            else:
                off_chart.append(f"{v} = {dense.mean:.3f}")
            continue
        points = [table[(v, d)] for d in densities if (v, d) in table]
        if not points:
            continue
        xs, ys = [c.density for c in points], [c.mean for c in points]
        style = styles[v]
        ax.plot(xs, ys, marker="o", ms=3, lw=1.3, label=v, **style)
        if any(c.spread for c in points):
            spread = [c.spread for c in points]
            ax.errorbar(xs, ys, yerr=spread, fmt="none", capsize=2, color=style["color"], lw=1)
    ax.set_xscale("log")
    ax.set_xticks(list(densities), [f"{d:g}" for d in densities])
    ax.minorticks_off()
    ax.set_ylim(min(shown) - pad, max(shown) + pad)
    if off_chart:
        note = "off the chart: " + "; ".join(off_chart)
        ax.text(0.01, 0.01, note, transform=ax.transAxes, fontsize=8)
    ax.set_xlabel("density (fraction of each task vector kept)")
    ax.set_ylabel("normalized score (mean over expert domains)")
    ax.set_title("Merged tiny Llama experts: score vs density (error bars: std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
