"""Tests for turning a calibration source into documents: missing paths and sources without text."""

from __future__ import annotations

from pathlib import Path

import datasets
import datasets.config
import pytest
from calibration_helpers import (
    MODEL,
    error_of,
)


@pytest.mark.parametrize("name", ["data/missing.jsonl", "missing.txt", "./nowhere", "/no/such/dir"])
def test_missing_path_says_file_not_found_without_dataset_lookup(
    name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)

    def no_lookup(*args, **kwargs):
        raise AssertionError("a path-like source must not be looked up as a dataset")

    monkeypatch.setattr(datasets, "load_dataset", no_lookup)
    message = error_of(name)
    assert "file not found" in message and MODEL in message and name in message


@pytest.mark.parametrize(
    ("name", "content"),
    [("empty.txt", ""), ("blank.txt", " \n\n\t\n"), ("blank.jsonl", '\n{"text": "  "}\n')],
)
def test_source_without_text(tmp_path: Path, name: str, content: str) -> None:
    (tmp_path / name).write_text(content, encoding="utf-8")
    message = error_of(tmp_path / name)
    assert "contains no text" in message and MODEL in message and name in message
