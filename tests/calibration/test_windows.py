"""Tests for cutting calibration documents into token windows, and refusing what is not text."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from calibration_helpers import (
    MODEL,
    VOCAB,
    SpyTokenizer,
    ids,
    make_tokenizer,
    windows,
)
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from mergekit_sparsegpt.calibration import files as calibration_files
from mergekit_sparsegpt.calibration import windows as calibration
from mergekit_sparsegpt.calibration.source import CalibrationError, CalibrationSource
from mergekit_sparsegpt.calibration.texts import read_calibration_texts
from mergekit_sparsegpt.calibration.windows import calibration_windows


def test_windows_match_hand_computed_reference(tokenizer) -> None:
    texts = ["a b c", "d e f g", "h"]
    # stream: a b c <eos> d e f g <eos> h  ->  10 tokens; 3 samples -> stride 10 // 3 = 3
    eos = VOCAB["<eos>"]
    stream = ids("a b c") + [eos] + ids("d e f g") + [eos] + ids("h")
    expected = torch.tensor([stream[0:2], stream[3:5], stream[6:8]], dtype=torch.int64)
    result = windows(texts, tokenizer, samples=3, seq_len=2)
    assert result.dtype == torch.int64
    assert result.shape == (3, 2)
    assert torch.equal(result, expected)
    assert torch.equal(result, torch.tensor([[3, 4], [1, 6], [8, 9]]))


def test_windows_exactly_enough_tokens_are_contiguous(tokenizer) -> None:
    result = windows(["a b c d e f"], tokenizer, samples=3, seq_len=2)
    assert result.tolist() == [ids("a b"), ids("c d"), ids("e f")]


def test_windows_are_deterministic(tokenizer) -> None:
    texts = [" ".join(f"w{(i * 7 + j) % 100}" for j in range(30)) for i in range(20)]
    first = windows(texts, tokenizer, samples=5, seq_len=16)
    second = windows(texts, tokenizer, samples=5, seq_len=16)
    assert torch.equal(first, second)


def test_eos_between_documents_only(tokenizer) -> None:
    # Blank documents add no separator of their own, and none is added after the last document.
    result = windows(["a b", "", "c"], tokenizer, samples=1, seq_len=4)
    assert result.tolist() == [[VOCAB["a"], VOCAB["b"], VOCAB["<eos>"], VOCAB["c"]]]


def test_no_separator_without_eos_token() -> None:
    plain = make_tokenizer(with_eos=False)
    assert plain.eos_token_id is None
    result = windows(["a b", "c"], plain, samples=1, seq_len=3)
    assert result.tolist() == [ids("a b c")]


def test_long_document_is_tokenized_in_line_pieces_without_separators(
    tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(calibration, "CHUNK_CHARS", 16)
    # The third line is longer than a piece, so it is cut at its last space within 16 chars.
    document = "a b c\nd e f g h a b\nc d e f g h a b c d\ne\n"
    spy = SpyTokenizer(tokenizer)
    result = windows([document], spy, samples=1, seq_len=len(document.split()))
    assert result.tolist() == [ids(document)]
    assert spy.pieces == ["a b c\n", "d e f g h a b\n", "c d e f g h a b", " c d\ne\n"]


def test_tokenizing_stops_at_eight_times_the_need(tokenizer) -> None:
    # One document of 100 distinct tokens; 2 x 2 = 4 are needed, so only 32 are kept and the
    # windows spread over those 32 (stride 16) instead of all 100 (stride 50).
    document = " ".join(f"w{i}" for i in range(100))
    result = windows([document], tokenizer, samples=2, seq_len=2)
    assert result.tolist() == [ids("w0 w1"), ids("w16 w17")]
    spy = SpyTokenizer(tokenizer)
    windows([f"w{i}" for i in range(100)], spy, samples=2, seq_len=2)
    # Document k ends the stream at 2k - 1 tokens (one word plus an <eos> before it), so the
    # 32 kept tokens are reached with document 17 and the other 83 are never tokenized.
    assert len(spy.pieces) == 17


def test_too_little_data_names_counts_and_model(tokenizer) -> None:
    with pytest.raises(CalibrationError) as info:
        windows(["a b c", "d e"], tokenizer, samples=2, seq_len=4)
    assert str(info.value) == (
        f"calibration data 'corpus.jsonl' for model '{MODEL}' gives only 6 tokens with that "
        "model's tokenizer; calibration_samples x calibration_seq_len = 2 x 4 = 8 are needed. "
        "Add text or lower calibration_samples / calibration_seq_len."
    )


@pytest.mark.parametrize(("samples", "seq_len"), [(0, 4), (2, 0), (-1, 4)])
def test_non_positive_sizes_are_rejected(tokenizer, samples: int, seq_len: int) -> None:
    with pytest.raises(CalibrationError, match="must be a positive integer") as info:
        windows(["a b c d e f g h"], tokenizer, samples=samples, seq_len=seq_len)
    assert MODEL in str(info.value)


def test_end_to_end_from_jsonl(tmp_path: Path, tokenizer) -> None:
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": "a b"}\n{"text": "c d e"}\n', encoding="utf-8")
    texts = read_calibration_texts(CalibrationSource(str(path)), MODEL)
    result = calibration_windows(texts, tokenizer, 2, 3, MODEL, str(path))
    # stream: a b <eos> c d e -> stride 3
    assert result.tolist() == [[VOCAB["a"], VOCAB["b"], VOCAB["<eos>"]], ids("c d e")]


ENGLISH = (Path(__file__).parents[2] / "docs" / "how-it-works.md").read_text(encoding="utf-8")


PYTHON = Path(calibration_files.__file__).read_text(encoding="utf-8")


def make_bpe_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer like GPT-2's, trained on the texts below (nothing to download).
    At 256 it has no merges: every byte is a token, so every space of an indentation too."""
    from tokenizers import decoders, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<eos>"],
        show_progress=False,
    )
    backend.train_from_iterator([ENGLISH, PYTHON], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")


@pytest.fixture(scope="module", params=[257, 2000], ids=["bytes", "bpe"])
def bpe_tokenizer(request: pytest.FixtureRequest) -> PreTrainedTokenizerFast:
    return make_bpe_tokenizer(request.param)


EMOJI_TEXT = "Family time \U0001f468\u200d\U0001f469\u200d\U0001f467 and a soft\u00adhyphen. " * 50


@pytest.mark.parametrize("domain", ["prose", "code", "arithmetic", "emoji", "form-feeds"])
def test_real_text_and_code_are_not_refused(bpe_tokenizer, domain: str) -> None:
    from mergekit_sparsegpt.demo.corpus import domain_texts

    # The demo corpora: Python's own documentation, standard-library sources, and sums.
    texts = {"emoji": [EMOJI_TEXT], "form-feeds": ["\f\n".join([PYTHON] * 2)]}.get(domain)
    texts = texts or domain_texts(domain, "calibration")
    result = calibration_windows(texts, bpe_tokenizer, 8, 64, MODEL, "corpus.txt")
    assert result.shape == (8, 64)


NOT_TEXT_FIX = (
    "This does not look like text: check that the file is a finished download (a crashed or "
    "preallocated download is full of NUL bytes) and that calibration_field names the field "
    "that holds the text."
)


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("\0" * 20_000, r"100% of its characters are control or invisible format characters "),
        ("\u200b\u200c\u200d\ufeff" * 5_000, r"100% of its characters are control or invis"),
        (ENGLISH[:4000] + "\0" * 6000, r"\d\d% of its characters are control or invisible "),
        ("the " * 5_000, r"token id \d+ \('Ġthe'\) is 100% of the 512 tokens read with that "),
        ("a" * 20_000, r"token id \d+ \('a+'\) is 100% of the 512 tokens read with that model"),
    ],
    ids=["nul", "zero-width", "mostly-nul", "one-word", "one-letter"],
)
def test_text_that_is_not_text_is_refused(bpe_tokenizer, text: str, found: str) -> None:
    if "Ġthe" in found and len(bpe_tokenizer) < 300:
        pytest.skip("a tokenizer without merges splits a word into its letters")
    with pytest.raises(CalibrationError, match=found) as info:
        calibration_windows([text], bpe_tokenizer, 2, 32, MODEL, "corpus.txt")
    assert str(info.value).startswith(f"calibration data 'corpus.txt' for model '{MODEL}': ")
    assert str(info.value).endswith(NOT_TEXT_FIX)


def test_file_of_nul_bytes_is_refused_before_its_length_is_judged(
    tmp_path: Path, tokenizer
) -> None:
    # A word-level tokenizer makes each 64 KiB piece of NULs one unknown token: 16 tokens, fewer
    # than needed, yet the message must say what is wrong rather than ask for more text.
    path = tmp_path / "download.txt"
    path.write_bytes(b"\0" * (1024 * 1024))
    texts = read_calibration_texts(CalibrationSource(str(path)), MODEL)
    with pytest.raises(CalibrationError) as info:
        calibration_windows(texts, tokenizer, 8, 32, MODEL, str(path))
    assert str(info.value) == (
        f"calibration data '{path}' for model '{MODEL}': 100% of its characters are control or "
        "invisible format characters (1,048,576 of the 1,048,576 read, not counting spaces and "
        f"line breaks; the first is U+0000). {NOT_TEXT_FIX}"
    )


def test_one_token_repeated_is_refused_with_its_share(tokenizer) -> None:
    texts = ["a " * 140 + "b c d e f g h " * 5]
    with pytest.raises(CalibrationError) as info:
        windows(texts, tokenizer, samples=4, seq_len=8)
    assert str(info.value) == (
        f"calibration data 'corpus.jsonl' for model '{MODEL}': token id 3 ('a') is 80% of the "
        f"175 tokens read with that model's tokenizer. {NOT_TEXT_FIX}"
    )
    # Three quarters is still text; and a short stream is not judged at all.
    assert windows(["a " * 75 + "b c d e f " * 5], tokenizer, 2, 8).shape == (2, 8)
    assert windows(["a " * 60], tokenizer, 2, 8).shape == (2, 8)
