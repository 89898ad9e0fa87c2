"""Read a calibration path: dispatch on what it is, and read text, JSON and JSONL files.

``.txt`` files are read in blocks, ``.jsonl`` files line by line, ``.parquet`` files and
``save_to_disk`` directories in batches of rows (see
:mod:`mergekit_sparsegpt.calibration.datasets`), so the token windows cost memory for the tokens
they need, not for the file. Only as much of a file is read as the windows consume: an error
(invalid UTF-8, a bad JSONL line) past that point is never reached. A ``.json`` file is one JSON
value and is parsed whole; a large corpus belongs in ``.jsonl``.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from mergekit_sparsegpt.calibration.datasets import read_parquet, read_saved_dataset
from mergekit_sparsegpt.calibration.documents import Document, TextFile, start_blocks
from mergekit_sparsegpt.calibration.source import (
    SUPPORTED_FORMS,
    CalibrationError,
    CalibrationSource,
    fail,
)
from mergekit_sparsegpt.special_files import special_file_kind


def read_path(path: Path, source: CalibrationSource, model_name: str) -> Iterable[Document]:
    """The documents of the existing file or directory ``path``, read lazily (``.json`` whole)."""
    # os.stat follows symlinks and opens nothing: opening a FIFO blocks until a writer comes,
    # and a device such as /dev/zero never ends.
    mode = os.stat(path).st_mode
    if stat.S_ISDIR(mode):
        return read_saved_dataset(path, source, model_name)
    if not stat.S_ISREG(mode):
        raise _special_file(path, source, model_name)
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [TextFile(path, source.source, model_name)]
    if suffix == ".jsonl":
        return _read_jsonl(path, source, model_name)
    if suffix == ".json":
        return _read_json(path, source, model_name)
    if suffix == ".parquet":
        return read_parquet(path, source, model_name)
    raise fail(
        source.source,
        model_name,
        f"unsupported file type '{suffix or path.name}'. {SUPPORTED_FORMS}",
    )


def _special_file(path: Path, source: CalibrationSource, model_name: str) -> CalibrationError:
    return fail(
        source.source,
        model_name,
        f"{path} is {special_file_kind(path)}, not a regular file: reading it could block or "
        "never end. Save the calibration text to a regular file and give that file's path.",
    )


def _read_utf8_whole(path: Path, source_name: str, model_name: str) -> str:
    try:
        # utf-8-sig drops a leading byte-order mark, which editors on Windows like to add.
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise fail(
            source_name,
            model_name,
            f"{path} is not valid UTF-8 ({err}). Re-save the file as UTF-8.",
        ) from err


def _lines(blocks: Iterable[str]) -> Iterator[str]:
    """The lines of the text ``blocks`` make up, as ``"".join(blocks).split("\\n")`` gives them."""
    # Split on "\n" only: str.splitlines also breaks on U+2028, which JSON allows inside strings.
    pending: list[str] = []  # the start of a line longer than a block
    for block in blocks:
        *complete, last = block.split("\n")
        if complete:
            complete[0] = "".join(pending) + complete[0]
            pending = []
            yield from complete
        pending.append(last)
    yield "".join(pending)


def _read_jsonl(path: Path, source: CalibrationSource, model_name: str) -> Iterator[str]:
    blocks = start_blocks(path, source.source, model_name)
    for line_number, line in enumerate(_lines(blocks), start=1):
        if not line.strip():
            continue
        where = f"{path} line {line_number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise fail(
                source.source,
                model_name,
                f"{where} is not valid JSON ({err.msg} at column {err.colno}). "
                "Fix or remove that line: a .jsonl file holds one JSON object per line.",
            ) from err
        text = _record_text(record, where, source, model_name, allow_plain_string=False)
        if text is not None:
            yield text


def _read_json(path: Path, source: CalibrationSource, model_name: str) -> list[str]:
    content = _read_utf8_whole(path, source.source, model_name)
    try:
        data = json.loads(content) if content.strip() else []
    except json.JSONDecodeError as err:
        raise fail(
            source.source,
            model_name,
            f"{path} is not valid JSON ({err.msg} at line {err.lineno} column {err.colno}). "
            "Fix the file, or use .jsonl for one JSON object per line.",
        ) from err
    texts = (
        _record_text(record, f"{path} item {index}", source, model_name, allow_plain_string=True)
        for index, record in enumerate(_json_records(data, path, source, model_name))
    )
    return [text for text in texts if text is not None]


def _json_records(data: Any, path: Path, source: CalibrationSource, model_name: str) -> list[Any]:
    if isinstance(data, list):
        return data
    # Many exports wrap the records as {"data": [...]}; accept exactly one such list.
    if isinstance(data, dict):
        lists = [value for value in data.values() if isinstance(value, list)]
        if len(data) == 1 and len(lists) == 1:
            return lists[0]
    raise fail(
        source.source,
        model_name,
        f"{path} must hold a list of objects with field '{source.text_field}', a list of "
        'strings, or an object with a single list value such as {"data": [...]}; '
        f"found {_describe_json(data)}. Reshape the file into one of these forms.",
    )


def _describe_json(data: Any) -> str:
    if isinstance(data, dict):
        keys = ", ".join(repr(key) for key in list(data)[:10])
        return f"an object with keys {keys}" if keys else "an empty object"
    return f"a JSON {type(data).__name__}"


def _record_text(
    record: Any,
    where: str,
    source: CalibrationSource,
    model_name: str,
    *,
    allow_plain_string: bool,
) -> str | None:
    """The text of one JSON record, None for a null value."""
    field = source.text_field
    if allow_plain_string and isinstance(record, str):
        return record
    if not isinstance(record, dict):
        raise fail(
            source.source,
            model_name,
            f"{where} is a JSON {type(record).__name__}, not an object with field '{field}'. "
            "Make every record an object holding the text.",
        )
    if field not in record:
        fields = ", ".join(repr(key) for key in record) or "none"
        raise fail(
            source.source,
            model_name,
            f"{where} has no field '{field}' (fields: {fields}). Set calibration_field "
            "to the field that holds the text, or add it to that record.",
        )
    value = record[field]
    if value is not None and not isinstance(value, str):
        raise fail(
            source.source,
            model_name,
            f"{where}: field '{field}' is a JSON {type(value).__name__}, not a string. "
            "Set calibration_field to a field holding text.",
        )
    return value
