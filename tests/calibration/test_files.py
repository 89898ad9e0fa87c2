"""Tests for reading calibration paths: text, JSON and JSONL files, and paths that are not files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from calibration_helpers import (
    MODEL,
    error_of,
    read,
    windows,
)

from mergekit_sparsegpt.calibration.source import CalibrationError, CalibrationSource
from mergekit_sparsegpt.calibration.texts import read_calibration_texts


def test_txt_file_is_one_document(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text("first line\nsecond line\n\nthird paragraph\n", encoding="utf-8")
    assert read(path) == ["first line\nsecond line\n\nthird paragraph\n"]


def test_jsonl_takes_field_and_skips_blank_lines_and_nulls(tmp_path: Path) -> None:
    path = tmp_path / "corpus.jsonl"
    lines = [
        '{"text": "one", "id": 1}',
        "",
        '{"text": "two"}',
        "   ",
        '{"text": null}',
        '{"text": "three"}',
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert read(path) == ["one", "two", "three"]


def test_jsonl_keeps_line_separator_inside_strings_and_drops_bom(tmp_path: Path) -> None:
    path = tmp_path / "corpus.jsonl"
    # U+2028 may appear raw inside a JSON string; it must not split the record.
    path.write_bytes('\ufeff{"text": "left\u2028right"}\r\n{"text": "next"}\r\n'.encode())
    assert read(path) == ["left\u2028right", "next"]


def test_non_utf8_file_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"caf\xe9 latin-1 text\n")
    message = error_of(path)
    assert "not valid UTF-8" in message and "Re-save the file as UTF-8" in message


def test_jsonl_custom_field(tmp_path: Path) -> None:
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"body": "x y", "text": 3}\n{"body": "z"}\n', encoding="utf-8")
    assert read(path, text_field="body") == ["x y", "z"]


@pytest.mark.parametrize(
    "payload",
    [
        [{"text": "alpha"}, {"text": "beta", "meta": 1}],
        ["alpha", "beta"],
        {"data": [{"text": "alpha"}, {"text": "beta"}]},
        {"rows": ["alpha", "beta"]},
    ],
    ids=["objects", "strings", "wrapped-objects", "wrapped-strings"],
)
def test_json_forms(tmp_path: Path, payload: object) -> None:
    path = tmp_path / "corpus.json"
    path.write_text(json.dumps(payload), encoding="utf-8")
    assert read(path) == ["alpha", "beta"]


def test_json_with_several_keys_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "corpus.json"
    path.write_text(json.dumps({"data": ["a"], "other": ["b"]}), encoding="utf-8")
    message = error_of(path)
    assert "single list value" in message
    assert "'data'" in message and "'other'" in message


def test_bad_jsonl_line_names_line_number(tmp_path: Path) -> None:
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": oops}\n', encoding="utf-8")
    message = error_of(path)
    assert f"{path} line 3 is not valid JSON" in message and MODEL in message


def test_jsonl_line_without_field_names_line_and_fields(tmp_path: Path) -> None:
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": "ok"}\n{"body": "no text field"}\n', encoding="utf-8")
    message = error_of(path)
    assert f"{path} line 2 has no field 'text'" in message and "'body'" in message


def test_jsonl_line_that_is_not_an_object(tmp_path: Path) -> None:
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": "ok"}\n["a list"]\n', encoding="utf-8")
    assert "line 2 is a JSON list" in error_of(path)


def test_unknown_extension_lists_supported_forms(tmp_path: Path) -> None:
    path = tmp_path / "corpus.csv"
    path.write_text("text\nhello\n", encoding="utf-8")
    message = error_of(path)
    assert "unsupported file type '.csv'" in message
    for form in (".txt", ".jsonl", ".json", ".parquet", "save_to_disk"):
        assert form in message


def test_jsonl_is_read_only_as_far_as_the_windows_need(tmp_path: Path, tokenizer) -> None:
    path = tmp_path / "corpus.jsonl"
    good = '{"text": "a b"}\n'
    path.write_text(good * 9_999 + "{oops\n" + good * 10, encoding="utf-8")
    texts = read_calibration_texts(CalibrationSource(str(path)), MODEL)
    result = windows(texts, tokenizer, samples=2, seq_len=2)
    assert torch.equal(result, windows(["a b"] * 20, tokenizer, samples=2, seq_len=2))
    texts = read_calibration_texts(CalibrationSource(str(path)), MODEL)
    with pytest.raises(CalibrationError) as info:
        windows(texts, tokenizer, samples=1, seq_len=40_000)
    assert str(info.value) == (
        f"calibration data '{path}' for model '{MODEL}': {path} line 10000 is not valid JSON "
        "(Expecting property name enclosed in double quotes at column 2). Fix or remove that "
        "line: a .jsonl file holds one JSON object per line."
    )


def _big_file(path: Path, size: int) -> int:
    """A .txt or .jsonl file of about ``size`` bytes of vocabulary words; returns its size."""
    words = " ".join(f"w{i}" for i in range(100))
    line = json.dumps({"text": words}) + "\n" if path.suffix == ".jsonl" else words + "\n"
    path.write_text(line * (size // len(line)), encoding="utf-8")
    return path.stat().st_size


@pytest.mark.parametrize("name", ["big.txt", "big.jsonl"])
def test_memory_is_bounded_by_the_tokens_needed_not_the_file(
    tmp_path: Path, tokenizer, name: str
) -> None:
    import tracemalloc

    path = tmp_path / name
    size = _big_file(path, 32 * 1024 * 1024)
    small = tmp_path / f"small{path.suffix}"
    _big_file(small, 64 * 1024)
    # Warm up: imports and first-call caches are not the reader's memory.
    windows(read_calibration_texts(CalibrationSource(str(small)), MODEL), tokenizer, 4, 64)
    tracemalloc.start()
    try:
        texts = read_calibration_texts(CalibrationSource(str(path)), MODEL)
        result = windows(texts, tokenizer, samples=4, seq_len=64)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.shape == (4, 64)
    # The whole-file reader held the file's text (and its bytes) at once: peak > size.
    assert peak < size / 4, f"peak {peak:,} bytes for a {size:,}-byte file"


def _special_file_message(path: Path, what: str) -> str:
    return (
        f"calibration data '{path}' for model '{MODEL}': {path} is {what}, not a regular file: "
        "reading it could block or never end. Save the calibration text to a regular file and "
        "give that file's path."
    )


def test_fifo_is_refused_without_opening_it(tmp_path: Path) -> None:
    import threading

    fifo = tmp_path / "data.txt"
    os.mkfifo(fifo)
    outcome: list[BaseException | None] = []

    def attempt() -> None:
        try:
            read(fifo)
        except BaseException as err:  # handed to the test thread
            outcome.append(err)
        else:
            outcome.append(None)

    reader = threading.Thread(target=attempt, daemon=True)
    reader.start()
    reader.join(timeout=10)
    if reader.is_alive():
        # Opening the FIFO blocked: give it a writer and close it, so the reader sees the end.
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(timeout=10)
        pytest.fail("reading a FIFO calibration file blocked in open()")
    assert isinstance(outcome[0], CalibrationError)
    assert str(outcome[0]) == _special_file_message(fifo, "a FIFO (named pipe)")


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/null"])
def test_symlink_to_a_device_is_refused(tmp_path: Path, device: str) -> None:
    link = tmp_path / "data.txt"
    link.symlink_to(device)
    assert error_of(link) == _special_file_message(
        link, f"a symbolic link to {device}, a character device"
    )
