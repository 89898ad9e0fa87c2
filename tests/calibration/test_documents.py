"""Tests for calibration documents: text files read in decoded blocks, pieces for the tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from calibration_helpers import (
    MODEL,
    SpyTokenizer,
    ids,
    windows,
)

from mergekit_sparsegpt.calibration import documents
from mergekit_sparsegpt.calibration import windows as calibration
from mergekit_sparsegpt.calibration.source import CalibrationError, CalibrationSource
from mergekit_sparsegpt.calibration.texts import read_calibration_texts
from mergekit_sparsegpt.calibration.windows import calibration_windows


def test_line_chunks_cut_words_only_without_whitespace() -> None:
    assert list(documents.line_chunks("abcdefghij", 4)) == ["abcd", "efgh", "ij"]
    assert list(documents.line_chunks("ab cd ef", 4)) == ["ab", " cd", " ef"]
    assert list(documents.line_chunks("", 4)) == []


BOM = "\ufeff"


def _awkward_text() -> str:
    """Text that lands every kind of cut on block edges: CRLF and lone CR line ends, lines longer
    than a piece with and without spaces, multi-byte characters, blank lines, no final newline."""
    words = " ".join(f"w{i}" for i in range(100))
    return (
        f"a b c\r\nd e f\rg h\n\n{words}\r\n"
        + "x" * 50
        + "\nsemi\u00e9 caf\u00e9 \u6f22\u5b57 \U0001f600 w1\r\n"
        + "\r\n".join(f"w{i} " * (i % 7) + "w9" * (i % 5) for i in range(60))
        + "\n\r\n"
        + words
    )


@pytest.mark.parametrize("chunk", [5, 16, 37, 1000])
def test_txt_stream_gives_the_windows_of_the_whole_text(
    tmp_path: Path, tokenizer, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    monkeypatch.setattr(calibration, "CHUNK_CHARS", chunk)
    monkeypatch.setattr(documents, "READ_BYTES", chunk)
    path = tmp_path / "corpus.txt"
    path.write_bytes((BOM + _awkward_text()).encode("utf-8"))
    # The reference: the old reader, the whole file as one string (BOM dropped, newlines "\n").
    whole_text = path.read_text(encoding="utf-8-sig")
    length = len(calibration._token_stream([whole_text], tokenizer, limit=10**9)[0])
    reference_spy, spy = SpyTokenizer(tokenizer), SpyTokenizer(tokenizer)
    reference = calibration_windows([whole_text], reference_spy, 1, length, MODEL, "c.txt")
    texts = read_calibration_texts(CalibrationSource(str(path)), MODEL)
    assert not any(isinstance(document, str) for document in texts)  # read from disk lazily
    result = calibration_windows(texts, spy, 1, length, MODEL, "c.txt")
    assert torch.equal(result, reference)
    assert spy.pieces == reference_spy.pieces
    assert len(spy.pieces) > 1 or chunk == 1000


@pytest.mark.parametrize("block", range(1, 12))
def test_decoded_blocks_read_as_read_text_does(tmp_path: Path, block: int) -> None:
    path = tmp_path / "t.txt"
    for content in (
        (BOM + _awkward_text()).encode(),
        b"\r\r\n\r" + "\u00e9\u6f22\r\n".encode() * 5,
        codecs_bom_prefix := b"\xef\xbb",
        b"\xef\xbb\xbf",
        b"",
    ):
        path.write_bytes(content)
        blocks = list(documents.decoded_blocks(path, block, "s", MODEL))
        assert "".join(blocks) == path.read_text(encoding="utf-8-sig"), content
        assert all(blocks)
    assert codecs_bom_prefix  # a file that is part of a byte-order mark reads as empty


@pytest.mark.parametrize(
    "content",
    [
        b"caf\xe9 latin-1",
        b"\xef\xbb\xbf" + b"w1 " * 40 + b"\xe9 tail",
        b"w1 " * 40 + b"\xe2\x82",  # cut short at the end: "bytes in position a-b"
        b"\xef\xbb\xbf" + "\u6f22".encode() * 30 + b"\xe6\xbc\x41",
        b"w1\n" * 30 + b"\xf0\x9f\x98",
    ],
)
@pytest.mark.parametrize("block", [1, 2, 3, 7, 64])
def test_invalid_utf8_is_reported_where_the_whole_file_read_reports_it(
    tmp_path: Path, content: bytes, block: int
) -> None:
    path = tmp_path / "t.txt"
    path.write_bytes(content)
    with pytest.raises(UnicodeDecodeError) as whole_read:
        path.read_text(encoding="utf-8-sig")
    with pytest.raises(CalibrationError) as info:
        list(documents.decoded_blocks(path, block, "t.txt", MODEL))
    assert str(info.value) == (
        f"calibration data 't.txt' for model '{MODEL}': {path} is not valid UTF-8 "
        f"({whole_read.value}). Re-save the file as UTF-8."
    )


def test_txt_is_read_only_as_far_as_the_windows_need(
    tmp_path: Path, tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(documents, "READ_BYTES", 64)
    path = tmp_path / "corpus.txt"
    # Invalid UTF-8 far past what the windows need is never read, so never reported.
    path.write_bytes(b"w1 w2 w3 w4\n" * 20_000 + b"caf\xe9\n" + b"w5\n" * 100)
    texts = read_calibration_texts(CalibrationSource(str(path)), MODEL)
    assert windows(texts, tokenizer, samples=2, seq_len=4).tolist() == [ids("w1 w2 w3 w4")] * 2
    # Windows that need the whole file reach it, and report it as the whole-file read did.
    texts = read_calibration_texts(CalibrationSource(str(path)), MODEL)
    with pytest.raises(CalibrationError, match=r"position 240003: invalid continuation byte"):
        windows(texts, tokenizer, samples=1, seq_len=90_000)
