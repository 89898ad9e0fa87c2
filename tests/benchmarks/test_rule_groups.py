"""The issue-16 comparison: each group chosen on validation, compared in its family."""

import csv
from pathlib import Path

import pytest

from benchmarks.quality import rule_groups

FIELDS = ("variant", "density", "seed", "score", "validation_score", "loss_prose", "gain_code")


def _family(path: Path, rows: list[tuple]) -> Path:
    path.mkdir()
    with (path / "runs.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(FIELDS)
        writer.writerows(rows)
    return path


def test_choice_is_on_validation_and_differences_are_within_a_family(tmp_path):
    first = _family(
        tmp_path / "f0",
        [
            ("ties", "0.1", 0, 0.50, 0.40, 3.0, 0.5),
            ("ties", "0.3", 0, 0.40, 0.45, 3.1, 0.4),  # best on validation, worse held out
            ("regmean[merged,stock-rest]", "", 0, 0.60, 0.60, 3.2, 0.6),
            ("regmean[finetuned,stock-rest]", "", 0, 0.55, 0.50, 3.2, 0.5),
            ("regmean[merged,new]", "", 0, 0.70, 0.70, 3.3, 0.8),
        ],
    )
    second = _family(
        tmp_path / "f1",
        [
            ("ties", "0.1", 0, 0.20, 0.20, 3.0, 0.2),
            ("regmean[merged,stock-rest]", "", 0, 0.30, 0.30, 3.0, 0.3),
            ("regmean[merged,new]", "", 0, 0.32, 0.31, 2.9, 0.3),
        ],
    )
    runs = rule_groups.read_runs(first)
    pick = rule_groups.chosen(runs, ("ties",))
    assert (pick.setting, pick.heldout, pick.prose) == ("ties d=0.3", 0.40, 3.1)
    text, record = rule_groups.compare([first, second])
    (pair,) = [p for p in record["pairs"] if p["group"] == "regmean new"]
    assert pair["scores"] == pytest.approx([0.10, 0.02])
    assert pair["prose"] == pytest.approx([0.1, -0.1])
    assert pair["domains"]["code"] == pytest.approx([0.2, 0.0])
    assert "regmean new - regmean today: mean +0.060" in text
    assert "MISS (target +0.05 each)" in text  # the second family gains only 0.02


def test_every_group_names_rows_of_the_grid_and_every_pair_names_groups():
    from benchmarks.quality.grid import VARIANTS

    named = {variant for variants in rule_groups.GROUPS.values() for variant in variants}
    assert named - set(VARIANTS) == set()
    compared = {name for group, reference, _ in rule_groups.PAIRS for name in (group, reference)}
    assert compared - set(rule_groups.GROUPS) == set()
