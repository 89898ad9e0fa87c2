"""Rows of results, each a measured value next to the reference it is divided by, and writing
them as a text table and JSON."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PASS, MISS = "PASS", "MISS"
_COLUMNS = ("metric", "value", "reference", "ratio", "target", "verdict")


@dataclass(frozen=True)
class Row:
    """One line of the table: ``value`` / ``reference`` = ``ratio``, checked against ``target``."""

    metric: str
    value: str
    reference: str
    ratio: float
    target: str = ""
    verdict: str = ""


@dataclass
class PartResult:
    """What one part of the benchmark measured: the table rows and the raw numbers."""

    part: str
    title: str
    rows: list[Row] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(
        self,
        metric: str,
        value: str,
        reference: str,
        ratio: float,
        at_most: float | None = None,
        below: float | None = None,
        near: float | None = None,
    ) -> None:
        """A row; ``at_most`` / ``below`` / ``near`` (1 within that tolerance) give its target
        and verdict."""
        target, verdict = "", ""
        if at_most is not None:
            target, verdict = f"<= {at_most:g}", PASS if ratio <= at_most else MISS
        elif below is not None:
            target, verdict = f"< {below:g}", PASS if ratio < below else MISS
        elif near is not None:
            target, verdict = f"1 +- {near:g}", PASS if abs(ratio - 1) <= near else MISS
        self.rows.append(Row(metric, value, reference, ratio, target, verdict))


def seconds(value: float) -> str:
    return f"{value:.3f} s" if value < 100 else f"{value:.0f} s"


def size(value: float) -> str:
    """Bytes in the largest binary unit that keeps at least one digit before the point."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f} B"


def ratio(value: float, reference: float) -> float:
    return value / reference if reference else math.nan


def format_ratio(value: float) -> str:
    """Three decimals, or three significant digits where that would print 0.000."""
    return f"{value:.3f}" if value == 0 or abs(value) >= 0.01 else f"{value:.2e}"


def format_part(result: PartResult) -> str:
    """The part as an aligned text table, its notes underneath."""
    cells = [list(_COLUMNS)] + [
        [r.metric, r.value, r.reference, format_ratio(r.ratio), r.target, r.verdict]
        for r in result.rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(_COLUMNS))]
    lines = [f"== {result.part}: {result.title} =="]
    for index, row in enumerate(cells):
        lines.append(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    lines.extend(f"note: {note}" for note in result.notes)
    return "\n".join(lines)


def write_part(result: PartResult, out: Path) -> None:
    """``<part>.json`` (rows, raw numbers, notes) and ``<part>.txt`` (the table) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "part": result.part,
        "title": result.title,
        "rows": [asdict(row) for row in result.rows],
        "data": result.data,
        "notes": result.notes,
    }
    (out / f"{result.part}.json").write_text(
        json.dumps(payload, indent=1, default=str) + "\n", encoding="utf-8"
    )
    (out / f"{result.part}.txt").write_text(format_part(result) + "\n", encoding="utf-8")
