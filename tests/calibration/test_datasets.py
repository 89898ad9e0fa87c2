"""Tests for reading calibration columns: Parquet files, saved datasets, Hugging Face datasets."""

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
from calibration_helpers import (
    MODEL,
    VOCAB,
    SpyTokenizer,
    error_of,
    ids,
    read,
    windows,
)
from datasets.arrow_writer import ArrowWriter

from mergekit_sparsegpt.calibration import datasets as calibration_datasets
from mergekit_sparsegpt.calibration.source import CalibrationError, CalibrationSource
from mergekit_sparsegpt.calibration.texts import read_calibration_texts


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
    from mergekit_sparsegpt.statistics.keys import tokens_fingerprint

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


def test_parquet_missing_column_lists_available(tmp_path: Path) -> None:
    path = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"content": ["x"], "id": [1]}), path)
    message = error_of(path)
    assert "no column 'text'" in message
    assert "available columns: 'content', 'id'" in message and MODEL in message


def test_directory_that_is_not_a_saved_dataset(tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    assert "not one written by datasets' save_to_disk" in error_of(tmp_path / "plain")


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
    monkeypatch.setattr(calibration_datasets, "BATCH_ROWS", 10)
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
    monkeypatch.setattr(calibration_datasets, "BATCH_ROWS", 5)
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
