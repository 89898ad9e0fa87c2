"""Read column data: Parquet files, ``save_to_disk`` directories and Hugging Face datasets.

Parquet files and saved datasets are read in batches of rows, so only the rows the token windows
need are held. A dataset name (``name`` or ``name:config``) is loaded the way ``datasets`` loads
it, like mergekit loads a model by name: from the Hub, or from the local cache when
``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` is set or the Hub is out of reach. It is streamed, so
only the documents the windows need are fetched from a large corpus.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from mergekit_sparsegpt.calibration.source import (
    SUPPORTED_FORMS,
    CalibrationError,
    CalibrationSource,
    brief,
    fail,
)

# Rows per batch read from a Parquet file or a saved dataset: a batch is held as Python strings.
BATCH_ROWS = 256


def missing_column(
    source: CalibrationSource, model_name: str, where: str, columns: Sequence[str]
) -> CalibrationError:
    available = ", ".join(repr(name) for name in columns) or "none"
    return fail(
        source.source,
        model_name,
        f"{where} has no column '{source.text_field}' (available columns: {available}). "
        "Set calibration_field to the column that holds the text.",
    )


def pick_split(splits: Any, source: CalibrationSource, model_name: str, where: str) -> Any:
    if source.split not in splits:
        available = ", ".join(repr(name) for name in splits) or "none"
        raise fail(
            source.source,
            model_name,
            f"{where} has no split '{source.split}' (available splits: {available}). "
            "Set calibration_split to one of these.",
        )
    return splits[source.split]


def _check_text_column(kind: Any, source: CalibrationSource, model_name: str, where: str) -> None:
    import pyarrow as pa

    # pa.types.is_string_view only exists in newer pyarrow releases.
    is_view = getattr(pa.types, "is_string_view", lambda _: False)
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or is_view(kind)):
        raise fail(
            source.source,
            model_name,
            f"{where}: column '{source.text_field}' holds {kind}, not text. "
            "Set calibration_field to a column of strings.",
        )


def read_parquet(path: Path, source: CalibrationSource, model_name: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several unrelated types for unreadable files
        raise _unreadable_parquet(path, source, model_name, err) from err
    with file:
        schema = file.schema_arrow
        if source.text_field not in schema.names:
            raise missing_column(source, model_name, str(path), schema.names)
        _check_text_column(schema.field(source.text_field).type, source, model_name, str(path))
        batches = file.iter_batches(batch_size=BATCH_ROWS, columns=[source.text_field])
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except Exception as err:  # a damaged row group further into the file
                raise _unreadable_parquet(path, source, model_name, err) from err
            yield from _texts_of(batch.column(0))


def _unreadable_parquet(
    path: Path, source: CalibrationSource, model_name: str, err: Exception
) -> CalibrationError:
    return fail(
        source.source,
        model_name,
        f"{path} could not be read as Parquet ({type(err).__name__}: {brief(err)}). "
        "Check that the file is a complete Parquet file.",
    )


def _texts_of(column: Any) -> Iterator[str]:
    return (text for text in column.to_pylist() if text is not None)


def read_saved_dataset(path: Path, source: CalibrationSource, model_name: str) -> Iterator[str]:
    dataset = _load_saved_dataset(path, source, model_name)
    if source.text_field not in dataset.column_names:
        raise missing_column(source, model_name, str(path), dataset.column_names)
    kind = dataset.data.schema.field(source.text_field).type
    _check_text_column(kind, source, model_name, str(path))
    # Arrow batches honour any indices mapping and avoid per-row Python formatting.
    column = dataset.select_columns([source.text_field]).with_format("arrow")
    for batch in column.iter(batch_size=BATCH_ROWS):
        yield from _texts_of(batch.column(0))


def _load_saved_dataset(path: Path, source: CalibrationSource, model_name: str) -> Any:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:  # not a save_to_disk directory, or a damaged one
        raise fail(
            source.source,
            model_name,
            f"{path} is a directory but not one written by datasets' save_to_disk "
            f"({type(err).__name__}: {brief(err)}). {SUPPORTED_FORMS}",
        ) from err
    if isinstance(loaded, datasets.DatasetDict):
        return pick_split(loaded, source, model_name, str(path))
    return loaded


def stream_hub_dataset(source: CalibrationSource, model_name: str) -> Iterator[str]:
    splits = _load_hub_dataset(source, model_name)
    dataset = pick_split(splits, source, model_name, f"dataset '{source.source}'")
    return _record_texts(dataset, source, model_name)


def _split_dataset_name(name: str) -> tuple[str, str | None]:
    dataset_name, _, config = name.partition(":")
    return dataset_name, config or None


def _load_hub_dataset(source: CalibrationSource, model_name: str) -> Any:
    import datasets

    name, config = _split_dataset_name(source.source)
    try:
        # One call for both worlds: datasets streams from the Hub, or (offline, or the Hub out of
        # reach) from the dataset's prepared copy in its cache. No split here, so that a wrong
        # calibration_split is reported with the splits there are.
        return datasets.load_dataset(name, config, streaming=True)
    except Exception as err:  # datasets raises many unrelated types for "cannot load this"
        raise _hub_failure(source, model_name, err) from err


def _hub_failure(source: CalibrationSource, model_name: str, err: Exception) -> CalibrationError:
    name, config = _split_dataset_name(source.source)
    config_arg = f", {config!r}" if config else ""
    example = f"datasets.load_dataset({name!r}{config_arg}, split={source.split!r})"
    switch = _offline_switch()
    if switch:
        # Streaming never fills the cache, so only a full download makes a dataset usable offline.
        fix = (
            f"Offline mode is on ({switch}), so only datasets already in the local Hugging Face "
            f"cache load: unset {switch.partition('=')[0]} to read it from the Hub, or download "
            f"it once with network access ({example}) so it is in the cache."
        )
    else:
        fix = (
            "Check the dataset name and config on the Hugging Face Hub (a gated or private "
            "dataset needs `hf auth login`)."
        )
    return fail(
        source.source,
        model_name,
        f"the path does not exist and it could not be loaded as a Hugging Face dataset "
        f"({type(err).__name__}: {brief(err)}). Give an existing file or directory, or a "
        f"dataset name ('name' or 'name:config'). {fix}",
    )


_OFFLINE_VARIABLES = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def _offline_switch() -> str | None:
    """The offline setting in force for ``datasets``, as the user wrote it, or None if online."""
    import datasets.config

    # datasets decides from its own flag, read from the environment when it was imported.
    if not datasets.config.HF_HUB_OFFLINE:
        return None
    for variable in _OFFLINE_VARIABLES:
        value = os.environ.get(variable, "")
        if value.upper() in datasets.config.ENV_VARS_TRUE_VALUES:
            return f"{variable}={value}"
    return "HF_HUB_OFFLINE=1"


def _record_texts(dataset: Any, source: CalibrationSource, model_name: str) -> Iterator[str]:
    where = f"dataset split '{source.split}'"
    field = source.text_field
    for record in _records(dataset, source, model_name, where):
        if field not in record:
            raise missing_column(source, model_name, where, list(record))
        value = record[field]
        if value is None:
            continue
        if not isinstance(value, str):
            raise fail(
                source.source,
                model_name,
                f"{where}: column '{field}' holds {type(value).__name__} values, not text. "
                "Set calibration_field to a column of strings.",
            )
        yield value


def _records(
    dataset: Any, source: CalibrationSource, model_name: str, where: str
) -> Iterator[dict[str, Any]]:
    from datasets.utils import tqdm

    # datasets shows no progress of its own while streaming; this bar obeys its switches.
    records = iter(tqdm(dataset, desc=f"Calibration documents of {source.source}", unit=" docs"))
    count = 0
    while True:
        try:
            record = next(records)
        except StopIteration:
            return
        except Exception as err:  # a lost connection or a damaged cache file, deep in datasets
            raise fail(
                source.source,
                model_name,
                f"reading {where} failed after {count} records ({type(err).__name__}: "
                f"{brief(err)}). Run again; if it fails at the same place, delete the dataset "
                "from the Hugging Face datasets cache and download it again.",
            ) from err
        count += 1
        yield record
