"""The performance benchmark's whole-process part: its checks, its sizes, and a quick run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from benchmarks.perf import process
from benchmarks.perf.calibration import check_same_tokens
from benchmarks.perf.configs import CACHE_HIT_MESSAGE, COMPUTED_MESSAGE, check_served
from benchmarks.perf.measure import MeasuredRun
from benchmarks.perf.models import MEDIUM
from benchmarks.perf.report import MISS, PASS
from mergekit_sparsegpt.statistics import keys


def _windows(seed: int) -> torch.Tensor:
    return torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(seed))


def _entry(cache_dir: Path, name: str, windows: torch.Tensor) -> None:
    key = json.dumps({"tokens": keys.tokens_fingerprint(windows)})
    save_file({"x": torch.zeros(1)}, str(cache_dir / f"{name}.safetensors"), {"key": key})


def test_cache_entries_must_name_the_reference_tokens(tmp_path: Path) -> None:
    first, second, other = _windows(0), _windows(1), _windows(2)
    _entry(tmp_path, "a", first)
    _entry(tmp_path, "b", second)
    check_same_tokens(tmp_path, [second, first])  # in any order
    with pytest.raises(RuntimeError, match="other tokens"):
        check_same_tokens(tmp_path, [first, other])
    with pytest.raises(RuntimeError, match="expected 1 cache entries"):
        check_same_tokens(tmp_path, [first])


def test_a_warm_run_must_be_served_every_entry_and_compute_nothing() -> None:
    hit = f"Hessian statistics for a {CACHE_HIT_MESSAGE} /c/1.safetensors\n"
    check_served(hit * 2, 2, "calibrate")
    with pytest.raises(RuntimeError, match="calibrate found 1 of 2 entries"):
        check_served(hit, 2, "calibrate")
    with pytest.raises(RuntimeError, match="not warm"):
        check_served(hit * 2 + f"Hessian statistics for b {COMPUTED_MESSAGE} /c/2\n", 2, "x")


def _reference_run(report: dict) -> MeasuredRun:
    return MeasuredRun(1.0, 0, {}, "loading...\n" + json.dumps(report) + "\n", "")


def test_the_reference_must_run_the_same_tokens_without_mergekit() -> None:
    windows = [_windows(0), _windows(1)]
    report = {"import_s": 1.0, "load_s": 0.5, "forward_s": 2.0, "tokens": 32}
    parts = process.reference_parts(_reference_run({**report, "mergekit_imported": False}), windows)
    assert parts["forward_s"] == 2.0
    with pytest.raises(RuntimeError, match="imported mergekit"):
        process.reference_parts(_reference_run({**report, "mergekit_imported": True}), windows)
    with pytest.raises(RuntimeError, match="ran 16 tokens"):
        short = {**report, "tokens": 16, "mergekit_imported": False}
        process.reference_parts(_reference_run(short), windows)


def test_the_issue_model_is_the_medium_shape_with_a_small_vocabulary() -> None:
    sizes = process.process_sizes(MEDIUM)
    assert (sizes.hidden, sizes.depths, sizes.vocab) == (1024, (4,), 512)
    assert (sizes.merge_calibration_samples, sizes.calibration_seq_len) == (32, 256)
    assert sizes.name != MEDIUM.name  # its own models directory


def test_quick_process_part_runs(tmp_path: Path) -> None:
    from benchmarks.perf.__main__ import main

    assert main(["--quick", "--only", "process", "--out", str(tmp_path)]) == 0
    written = json.loads((tmp_path / "process.json").read_text(encoding="utf-8"))
    rows = {row["metric"]: row for row in written["rows"]}
    whole = rows["calibrate process (empty cache)"]
    assert whole["target"] == f"<= {process.TARGET_PROCESS_OVER_FORWARD:g}"
    assert whole["verdict"] in (PASS, MISS)
    assert whole["ratio"] > 0
    seconds = written["data"]["seconds"]
    assert len(seconds["calibrate"]) == len(seconds["warm"]) == len(seconds["reference"]) == 1
    assert set(seconds["startup"]) == set(process.STARTUPS)
    (reference,) = seconds["reference_parts"]
    assert reference["mergekit_imported"] is False
    assert reference["tokens"] == written["data"]["tokens"] == 2 * 4 * 32
