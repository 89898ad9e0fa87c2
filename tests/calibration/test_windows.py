"""Tests for reading calibration sources and cutting them into token windows."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import datasets
import datasets.config
import huggingface_hub.constants
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from datasets.arrow_writer import ArrowWriter
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from mergekit_sparsegpt.calibration import files as calibration_files
from mergekit_sparsegpt.calibration import windows as calibration
from mergekit_sparsegpt.calibration.windows import (
    CalibrationError,
    CalibrationSource,
    Document,
    calibration_windows,
    read_calibration_texts,
)

MODEL = "org/tiny-model"

# Word-level vocabulary: ids are easy to compute by hand. "<bos>" is added by the post-processor
# only when special tokens are requested, so its absence proves add_special_tokens=False.
SPECIALS = {"[UNK]": 0, "<eos>": 1, "<bos>": 2}
WORDS = ["a", "b", "c", "d", "e", "f", "g", "h"] + [f"w{i}" for i in range(100)]
VOCAB = {**SPECIALS, **{word: index + len(SPECIALS) for index, word in enumerate(WORDS)}}


def make_tokenizer(with_eos: bool = True) -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", SPECIALS["<bos>"])]
    )
    extra = {"eos_token": "<eos>"} if with_eos else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", bos_token="<bos>", **extra
    )


def ids(text: str) -> list[int]:
    return [VOCAB[word] for word in text.split()]


class SpyTokenizer:
    """Wraps a tokenizer and records every piece of text it is asked to encode."""

    def __init__(self, inner: PreTrainedTokenizerFast) -> None:
        self.inner = inner
        self.pieces: list[str] = []
        self.eos_token_id = inner.eos_token_id

    def __call__(self, text: str, **kwargs):
        self.pieces.append(text)
        return self.inner(text, **kwargs)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


def read(path: Path | str, **kwargs) -> list[str]:
    # The documents are lazy (a .txt file is a TextFile read from disk); this reads them all,
    # as the assertions need.
    texts = read_calibration_texts(CalibrationSource(str(path), **kwargs), MODEL)
    return [whole(document) for document in texts]


def whole(document: Document) -> str:
    return document if isinstance(document, str) else "".join(document.pieces(1 << 16))


def error_of(path: Path | str, **kwargs) -> str:
    with pytest.raises(CalibrationError) as info:
        read(path, **kwargs)
    return str(info.value)


# --------------------------------------------------------------------------------------------
# File formats
# --------------------------------------------------------------------------------------------


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


def test_parquet_column(tmp_path: Path) -> None:
    path = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3], "text": ["p", None, "q"]}), path)
    assert read(path) == ["p", "q"]


def test_saved_dataset_directory(tmp_path: Path) -> None:
    datasets.Dataset.from_dict({"text": ["d1", "d2"], "n": [1, 2]}).save_to_disk(tmp_path / "ds")
    assert read(tmp_path / "ds") == ["d1", "d2"]


def test_saved_dataset_dict_takes_split(tmp_path: Path) -> None:
    splits = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"content": ["t1", "t2"]}),
            "validation": datasets.Dataset.from_dict({"content": ["v1"]}),
        }
    )
    splits.save_to_disk(tmp_path / "dd")
    assert read(tmp_path / "dd", text_field="content", split="validation") == ["v1"]
    message = error_of(tmp_path / "dd", text_field="content", split="test")
    assert "no split 'test'" in message and "'train'" in message and "'validation'" in message


def test_saved_dataset_missing_column(tmp_path: Path) -> None:
    datasets.Dataset.from_dict({"body": ["x"]}).save_to_disk(tmp_path / "ds")
    message = error_of(tmp_path / "ds")
    assert "no column 'text'" in message and "'body'" in message and MODEL in message


# --------------------------------------------------------------------------------------------
# Hugging Face dataset names (offline: the network path cannot run on the test machines)
# --------------------------------------------------------------------------------------------


def _write_fake_cached_dataset(
    cache: Path, name: str, config: str, columns: dict[str, list]
) -> Path:
    """Lay out a dataset the way `datasets` stores a prepared Hub dataset in HF_DATASETS_CACHE
    (``org/name`` lives in ``org___name``); returns the split's Arrow file."""
    short = name.split("/")[-1]
    folder = cache / name.replace("/", "___") / config / "0.0.0" / "0123456789abcdef"
    folder.mkdir(parents=True)
    table = pa.table(columns)
    arrow = folder / f"{short}-train.arrow"
    with ArrowWriter(path=str(arrow)) as writer:
        writer.write_table(table)
        rows, size = writer.finalize()
    split = datasets.SplitInfo("train", num_bytes=size, num_examples=rows, dataset_name=short)
    datasets.DatasetInfo(
        dataset_name=short,
        config_name=config,
        features=datasets.Features.from_arrow_schema(table.schema),
        splits=datasets.SplitDict({"train": split}),
    ).write_to_directory(str(folder))
    return arrow


def _offline_flags() -> tuple:
    return (
        datasets.config.HF_HUB_OFFLINE,
        datasets.config.HF_DATASETS_OFFLINE,
        huggingface_hub.constants.HF_HUB_OFFLINE,
        os.environ.get("HF_HUB_OFFLINE"),
        os.environ.get("HF_DATASETS_OFFLINE"),
    )


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty datasets cache, with HF_HUB_OFFLINE=1 as a user sets it before starting a merge.

    Both libraries read the variable when imported, so their flags are set as well.
    """
    cache = tmp_path / "hf_datasets_cache"
    cache.mkdir()
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    for variable in ("HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def _count_pulled_records(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the records every datasets.IterableDataset hands out; returns a one-item counter."""
    pulled = [0]
    original = datasets.IterableDataset.__iter__

    def counting(self):
        for record in original(self):
            pulled[0] += 1
            yield record

    monkeypatch.setattr(datasets.IterableDataset, "__iter__", counting)
    return pulled


def test_dataset_name_from_offline_cache(hub_cache: Path) -> None:
    _write_fake_cached_dataset(hub_cache, "fake_calib", "small", {"text": ["cached one", "two"]})
    before = _offline_flags()
    texts = read_calibration_texts(CalibrationSource("fake_calib"), MODEL)
    assert not isinstance(texts, list)  # streamed, not loaded whole
    assert list(texts) == ["cached one", "two"]
    assert read("fake_calib:small") == ["cached one", "two"]
    # The user's offline switches are read, never changed.
    assert _offline_flags() == before
    message = error_of("fake_calib:large")
    assert "could not be loaded as a Hugging Face dataset" in message
    assert "Available configs in the cache: ['small']" in message and MODEL in message


def test_cached_dataset_gives_the_same_windows_as_the_same_jsonl(
    hub_cache: Path, tmp_path: Path, tokenizer
) -> None:
    from mergekit_sparsegpt.statistics.cache import tokens_fingerprint

    texts = ["a b c", None, "d e f g", "  ", "h a", "b c d e"]
    _write_fake_cached_dataset(hub_cache, "someorg/corpus", "en", {"text": texts, "n": [1] * 6})
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    hub_texts = read_calibration_texts(CalibrationSource("someorg/corpus:en"), MODEL)
    file_texts = read_calibration_texts(CalibrationSource(str(jsonl)), MODEL)
    from_hub = windows(hub_texts, tokenizer, samples=3, seq_len=3)
    from_file = windows(file_texts, tokenizer, samples=3, seq_len=3)
    eos = VOCAB["<eos>"]
    stream = ids("a b c") + [eos] + ids("d e f g") + [eos] + ids("h a") + [eos] + ids("b c d e")
    stride = len(stream) // 3
    expected = [stream[k * stride : k * stride + 3] for k in range(3)]
    assert from_hub.tolist() == expected
    assert torch.equal(from_hub, from_file)
    # The statistics cache keys the token ids, so where the text came from cannot matter.
    assert tokens_fingerprint(from_hub) == tokens_fingerprint(from_file)


def test_cached_dataset_is_read_only_as_far_as_the_windows_need(
    hub_cache: Path, monkeypatch: pytest.MonkeyPatch, tokenizer
) -> None:
    documents = [f"w{i % 100}" for i in range(20_000)]
    _write_fake_cached_dataset(hub_cache, "big_corpus", "default", {"text": documents})
    pulled = _count_pulled_records(monkeypatch)
    texts = read_calibration_texts(CalibrationSource("big_corpus"), MODEL)
    assert pulled[0] == 1  # only the peek that proves the source holds text
    spy = SpyTokenizer(tokenizer)
    result = windows(texts, spy, samples=2, seq_len=2)
    # Reference: the same documents as a plain list, through the same windows.
    reference_spy = SpyTokenizer(tokenizer)
    reference = windows(list(documents), reference_spy, samples=2, seq_len=2)
    assert torch.equal(result, reference)
    assert spy.pieces == reference_spy.pieces
    # Exactly the documents tokenized were pulled (no read-ahead), a sliver of the 20,000.
    assert pulled[0] == len(reference_spy.pieces) < 100


def test_dataset_name_offline_and_not_cached_is_one_clear_error(hub_cache: Path) -> None:
    start = time.monotonic()
    with pytest.raises(CalibrationError) as info:
        read("surely_not_a_dataset_xyz:cfg")
    assert time.monotonic() - start < 5  # offline: no network retries
    message = str(info.value)
    assert message.startswith(
        f"calibration data 'surely_not_a_dataset_xyz:cfg' for model '{MODEL}': the path does "
        "not exist and it could not be loaded as a Hugging Face dataset ("
    )
    assert "Offline mode is on (HF_HUB_OFFLINE=1)" in message
    assert "unset HF_HUB_OFFLINE to read it from the Hub" in message
    assert "load_dataset('surely_not_a_dataset_xyz', 'cfg', split='train')" in message


def test_offline_error_names_the_variable_the_user_set(
    hub_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "true")
    message = error_of("someorg/not_cached")
    assert "Offline mode is on (HF_DATASETS_OFFLINE=true)" in message
    assert "unset HF_DATASETS_OFFLINE" in message


def test_online_error_does_not_blame_offline_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def not_on_the_hub(*args, **kwargs):
        calls.append((args, kwargs))
        raise datasets.exceptions.DatasetNotFoundError("Dataset 'someorg/nope' doesn't exist")

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets, "load_dataset", not_on_the_hub)
    message = error_of("someorg/nope:cfg")
    assert calls == [(("someorg/nope", "cfg"), {"streaming": True})]
    assert "DatasetNotFoundError: Dataset 'someorg/nope' doesn't exist" in message
    assert "Check the dataset name and config on the Hugging Face Hub" in message
    assert "Offline mode" not in message and MODEL in message


def test_cached_dataset_without_the_text_column_names_the_columns(hub_cache: Path) -> None:
    _write_fake_cached_dataset(hub_cache, "fake_calib", "small", {"body": ["x"], "id": [1]})
    message = error_of("fake_calib")
    assert message == (
        f"calibration data 'fake_calib' for model '{MODEL}': dataset split 'train' has no column "
        "'text' (available columns: 'body', 'id'). Set calibration_field to the column that "
        "holds the text."
    )
    assert read("fake_calib", text_field="body") == ["x"]


def test_cached_dataset_wrong_split_names_the_splits(hub_cache: Path) -> None:
    _write_fake_cached_dataset(hub_cache, "fake_calib", "small", {"text": ["x"]})
    message = error_of("fake_calib", split="validation")
    assert "dataset 'fake_calib' has no split 'validation' (available splits: 'train')" in message


def test_cached_dataset_column_of_numbers_is_not_text(hub_cache: Path) -> None:
    _write_fake_cached_dataset(hub_cache, "fake_calib", "small", {"text": [1, 2]})
    assert "column 'text' holds int values, not text" in error_of("fake_calib")


def test_cached_dataset_without_text(hub_cache: Path) -> None:
    _write_fake_cached_dataset(hub_cache, "fake_calib", "small", {"text": [None, " ", ""]})
    message = error_of("fake_calib")
    assert "contains no text" in message and MODEL in message and "'fake_calib'" in message


def test_damaged_cached_dataset_is_a_calibration_error(hub_cache: Path) -> None:
    arrow = _write_fake_cached_dataset(hub_cache, "fake_calib", "small", {"text": ["x", "y"]})
    arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])
    message = error_of("fake_calib")
    assert "reading dataset split 'train' failed after 0 records (ArrowInvalid" in message
    assert "delete the dataset from the Hugging Face datasets cache" in message


# --------------------------------------------------------------------------------------------
# Source errors
# --------------------------------------------------------------------------------------------


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


def test_parquet_missing_column_lists_available(tmp_path: Path) -> None:
    path = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"content": ["x"], "id": [1]}), path)
    message = error_of(path)
    assert "no column 'text'" in message
    assert "available columns: 'content', 'id'" in message and MODEL in message


def test_unknown_extension_lists_supported_forms(tmp_path: Path) -> None:
    path = tmp_path / "corpus.csv"
    path.write_text("text\nhello\n", encoding="utf-8")
    message = error_of(path)
    assert "unsupported file type '.csv'" in message
    for form in (".txt", ".jsonl", ".json", ".parquet", "save_to_disk"):
        assert form in message


def test_directory_that_is_not_a_saved_dataset(tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    assert "not one written by datasets' save_to_disk" in error_of(tmp_path / "plain")


# --------------------------------------------------------------------------------------------
# Windows
# --------------------------------------------------------------------------------------------


def windows(texts, tokenizer, samples: int, seq_len: int) -> torch.Tensor:
    return calibration_windows(texts, tokenizer, samples, seq_len, MODEL, "corpus.jsonl")


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


def test_line_chunks_cut_words_only_without_whitespace() -> None:
    assert list(calibration_files.line_chunks("abcdefghij", 4)) == ["abcd", "efgh", "ij"]
    assert list(calibration_files.line_chunks("ab cd ef", 4)) == ["ab", " cd", " ef"]
    assert list(calibration_files.line_chunks("", 4)) == []


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


# --------------------------------------------------------------------------------------------
# Files read as streams
# --------------------------------------------------------------------------------------------

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
    monkeypatch.setattr(calibration_files, "READ_BYTES", chunk)
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
        blocks = list(calibration_files._decoded_blocks(path, block, "s", MODEL))
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
        list(calibration_files._decoded_blocks(path, block, "t.txt", MODEL))
    assert str(info.value) == (
        f"calibration data 't.txt' for model '{MODEL}': {path} is not valid UTF-8 "
        f"({whole_read.value}). Re-save the file as UTF-8."
    )


def test_txt_is_read_only_as_far_as_the_windows_need(
    tmp_path: Path, tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(calibration_files, "READ_BYTES", 64)
    path = tmp_path / "corpus.txt"
    # Invalid UTF-8 far past what the windows need is never read, so never reported.
    path.write_bytes(b"w1 w2 w3 w4\n" * 20_000 + b"caf\xe9\n" + b"w5\n" * 100)
    texts = read_calibration_texts(CalibrationSource(str(path)), MODEL)
    assert windows(texts, tokenizer, samples=2, seq_len=4).tolist() == [ids("w1 w2 w3 w4")] * 2
    # Windows that need the whole file reach it, and report it as the whole-file read did.
    texts = read_calibration_texts(CalibrationSource(str(path)), MODEL)
    with pytest.raises(CalibrationError, match=r"position 240003: invalid continuation byte"):
        windows(texts, tokenizer, samples=1, seq_len=90_000)


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


def _count_calls(monkeypatch: pytest.MonkeyPatch, owner: type, name: str) -> list[int]:
    """Count the items the generator method ``owner.name`` hands out; a one-item counter."""
    pulled = [0]
    original = getattr(owner, name)

    def counting(self, *args, **kwargs):
        for item in original(self, *args, **kwargs):
            pulled[0] += 1
            yield item

    monkeypatch.setattr(owner, name, counting)
    return pulled


def test_parquet_is_read_in_batches_as_far_as_the_windows_need(
    tmp_path: Path, tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "corpus.parquet"
    documents = [None if i % 3 == 0 else f"w{i % 100} w{(i + 1) % 100}" for i in range(3000)]
    pq.write_table(pa.table({"text": documents}), path, row_group_size=500)
    assert read(path) == [text for text in documents if text is not None]
    monkeypatch.setattr(calibration_files, "BATCH_ROWS", 10)
    batches = _count_calls(monkeypatch, pq.ParquetFile, "iter_batches")
    texts = read_calibration_texts(CalibrationSource(str(path)), MODEL)
    result = windows(texts, tokenizer, samples=2, seq_len=4)
    # 64 tokens kept: 22 documents, in the first 4 batches of 10 rows out of 300.
    assert batches[0] == 4
    assert torch.equal(result, windows(read(path), tokenizer, samples=2, seq_len=4))


def test_saved_dataset_is_read_in_batches_as_far_as_the_windows_need(
    tmp_path: Path, tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    documents = [f"w{i % 100}" for i in range(3000)]
    datasets.Dataset.from_dict({"text": documents}).save_to_disk(tmp_path / "ds")
    monkeypatch.setattr(calibration_files, "BATCH_ROWS", 5)
    batches = _count_calls(monkeypatch, datasets.Dataset, "iter")
    texts = read_calibration_texts(CalibrationSource(str(tmp_path / "ds")), MODEL)
    result = windows(texts, tokenizer, samples=2, seq_len=2)
    assert torch.equal(result, windows(documents, tokenizer, samples=2, seq_len=2))
    assert batches[0] == 4  # 17 documents of 3,000, in batches of 5


@pytest.mark.parametrize("name", ["corpus.parquet", "ds"])
def test_column_of_numbers_is_not_text(tmp_path: Path, name: str) -> None:
    table = {"text": [1, 2]}
    if name == "ds":
        datasets.Dataset.from_dict(table).save_to_disk(tmp_path / name)
    else:
        pq.write_table(pa.table(table), tmp_path / name)
    assert f"{tmp_path / name}: column 'text' holds int64, not text" in error_of(tmp_path / name)


def test_truncated_parquet_is_a_calibration_error(tmp_path: Path) -> None:
    path = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"text": ["x"] * 100}), path)
    path.write_bytes(path.read_bytes()[:-20])
    message = error_of(path)
    assert f"{path} could not be read as Parquet (ArrowInvalid: " in message
    assert "Check that the file is a complete Parquet file." in message


# --------------------------------------------------------------------------------------------
# Paths that are not regular files
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Text that is not text
# --------------------------------------------------------------------------------------------

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
