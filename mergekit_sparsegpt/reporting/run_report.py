"""What a merge reports when it is done: the per-tensor JSON report and the summary on stderr."""

from __future__ import annotations

import json
from collections import Counter

from mergekit_sparsegpt.methods.context import MergeContext
from mergekit_sparsegpt.methods.registry import plugin_method
from mergekit_sparsegpt.trim.metrics import REPORT_FILE


def write_report(context: MergeContext, path: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump({"tensors": context.report}, handle, indent=1, sort_keys=True)


def usage_summary(method_name: str, context: MergeContext) -> str:
    method = plugin_method(method_name)
    lines = [f"{method_name}: how each tensor was merged"]
    for path, label in method.summary_paths:
        tensors = context.usage[(path, "tensors")]
        parameters = context.usage[(path, "parameters")]
        lines.append(f"  {label}: {tensors} tensors, {parameters:,} parameters")
    lines += _rules_by_kind(context, dict(method.summary_paths))
    solves = [t["solve"]["path"] for t in context.report.values() if "solve" in t]
    if solves:
        counts = ", ".join(f"{path} {solves.count(path)}" for path in method.solve_paths)
        lines.append(f"  how the RegMean systems were solved: {counts}")
    entries = [m for t in context.report.values() for m in t["models"].values()]
    if entries:
        ours = sum(e["relative_output_error"] for e in entries) / len(entries)
        magnitude = sum(e["magnitude_relative_output_error"] for e in entries) / len(entries)
        alike = ", both L1-rescaled" if any(e["rescaled"] for e in entries) else ""
        diagonal = all(e.get("error_estimate") == "diagonal" for e in entries)
        estimate = "estimated from diag H" if diagonal else "estimated from H"
        lines.append(
            f"  relative output error of the trimmed task vectors (mean, {estimate}): "
            f"{ours:.4f}, magnitude trimming at the same density: {magnitude:.4f}{alike}"
        )
        lines.append(f"  per-tensor details: {REPORT_FILE} in the output directory")
    return "\n".join(lines)


def _rules_by_kind(context: MergeContext, labels: dict[str, str]) -> list[str]:
    """One line per tensor kind (decoder linear, output head, token embedding, norm, bias):
    how many of its tensors took each rule, and why a kind fell back where the report says."""
    by_kind: dict[str, Counter] = {}
    reasons: dict[str, set[str]] = {}
    for record in context.report.values():
        kind = record.get("kind", "tensor")
        rule = labels.get(record["path"], record["path"])
        by_kind.setdefault(kind, Counter())[rule] += 1
        if "reason" in record:
            reasons.setdefault(kind, set()).add(record["reason"])
    lines = ["  by tensor kind:"] if by_kind else []
    for kind, rules in sorted(by_kind.items()):
        counted = ", ".join(f"{rule} {count}" for rule, count in sorted(rules.items()))
        why = f" ({'; '.join(sorted(reasons[kind]))})" if kind in reasons else ""
        lines.append(f"    {kind}: {counted}{why}")
    return lines
