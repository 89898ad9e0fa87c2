"""Read calibration files as streams of documents, in memory bounded by what is consumed.

``.txt`` files are read in blocks, ``.jsonl`` files line by line, ``.parquet`` files and
``save_to_disk`` directories in batches of rows, so the token windows cost memory for the tokens
they need, not for the file. Only as much of a file is read as the windows consume: an error
(invalid UTF-8, a bad JSONL line) past that point is never reached. A ``.json`` file is one JSON
value and is parsed whole; a large corpus belongs in ``.jsonl``.

The types and message helpers shared with :mod:`mergekit_sparsegpt.calibration.windows` live here
because that module builds on this one; it re-exports the public ones.
"""

from __future__ import annotations

import codecs
import io
import json
import os
import stat
from collections.abc import Iterable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergekit_sparsegpt.special_files import special_file_kind

SUPPORTED_EXTENSIONS = (".txt", ".jsonl", ".json", ".parquet")

SUPPORTED_FORMS = (
    "Supported calibration sources: a .txt file (plain text), a .jsonl file (one JSON object per "
    "line), a .json file (a list of objects or strings, or an object holding one such list), a "
    ".parquet file, a directory written by datasets' save_to_disk, or a Hugging Face dataset "
    "name ('name' or 'name:config'), read from the Hub or, offline, from the local cache."
)

# Bytes read from a text file at a time when only its start matters (the blank check, JSONL).
READ_BYTES = 64 * 1024

# Rows per batch read from a Parquet file or a saved dataset: a batch is held as Python strings.
BATCH_ROWS = 256


class CalibrationError(ValueError):
    """A calibration source cannot give the token windows a model needs."""


@dataclass(frozen=True)
class CalibrationSource:
    """Where calibration text comes from.

    ``source`` is a path or a Hugging Face dataset name (``name`` or ``name:config``).
    ``text_field`` names the JSON field / column holding the text; ``split`` picks the split of
    a dataset (ignored for plain files).
    """

    source: str
    text_field: str = "text"
    split: str = "train"


def fail(source: str, model_name: str, problem: str) -> CalibrationError:
    return CalibrationError(f"calibration data '{source}' for model '{model_name}': {problem}")


def brief(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------
# Documents
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextFile:
    """A ``.txt`` file as one document, read from disk in blocks each time it is iterated."""

    path: Path
    source_name: str
    model_name: str

    def pieces(self, size: int) -> Iterator[str]:
        """The pieces :func:`line_chunks` cuts from the whole text, reading ``size`` bytes at a
        time: a cut needs the next ``size`` characters, so the buffer holds no more."""
        buffer = ""
        for block in _decoded_blocks(self.path, size, self.source_name, self.model_name):
            buffer += block
            while len(buffer) > size:
                end = _cut(buffer, 0, size)
                yield buffer[:end]
                buffer = buffer[end:]
        if buffer:
            yield buffer

    def is_blank(self) -> bool:
        """Whether the text is only whitespace; reads up to the first non-blank block."""
        blocks = _decoded_blocks(self.path, READ_BYTES, self.source_name, self.model_name)
        with closing(blocks):
            return not any(block.strip() for block in blocks)


# One calibration document: a string, or a text file read lazily.
Document = str | TextFile


def document_pieces(document: Document, size: int) -> Iterator[str]:
    """``document`` in consecutive pieces of about ``size`` characters (see :func:`line_chunks`)."""
    if isinstance(document, str):
        return line_chunks(document, size)
    return document.pieces(size)


def is_blank(document: Document) -> bool:
    return not document.strip() if isinstance(document, str) else document.is_blank()


def line_chunks(text: str, size: int) -> Iterator[str]:
    """Yield consecutive pieces of ``text`` of at most about ``size`` characters.

    Cuts follow a newline where possible, else whitespace, so token boundaries barely move;
    only a run of ``size`` characters without either is cut mid-word.
    """
    start = 0
    while len(text) - start > size:
        end = _cut(text, start, size)
        yield text[start:end]
        start = end
    if start < len(text):
        yield text[start:]


def _cut(text: str, start: int, size: int) -> int:
    """Where the piece starting at ``start`` ends; ``text`` holds more than ``size`` after it."""
    end = text.rfind("\n", start, start + size) + 1
    return end if end > start else _last_space(text, start, start + size)


def _last_space(text: str, start: int, stop: int) -> int:
    # Cut before the space so the next piece starts with " word", as the word tokenizes mid-text.
    for index in range(stop - 1, start, -1):
        if text[index].isspace():
            return index
    return stop


# --------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------


def read_path(path: Path, source: CalibrationSource, model_name: str) -> Iterable[Document]:
    """The documents of the existing file or directory ``path``, read lazily (``.json`` whole)."""
    # os.stat follows symlinks and opens nothing: opening a FIFO blocks until a writer comes,
    # and a device such as /dev/zero never ends.
    mode = os.stat(path).st_mode
    if stat.S_ISDIR(mode):
        return _read_saved_dataset(path, source, model_name)
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
        return _read_parquet(path, source, model_name)
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


# --------------------------------------------------------------------------------------------
# Text and JSON
# --------------------------------------------------------------------------------------------


def _decoded_blocks(
    path: Path, block_bytes: int, source_name: str, model_name: str
) -> Iterator[str]:
    """The text ``path.read_text(encoding="utf-8-sig")`` gives, in blocks of about
    ``block_bytes`` characters: a leading byte-order mark dropped, line ends read as "\\n"
    (universal newlines), and invalid UTF-8 reported at the position read_text reports."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    newlines = io.IncrementalNewlineDecoder(None, translate=True)
    with path.open("rb") as file:
        data = file.read(len(codecs.BOM_UTF8))
        # utf-8-sig drops a whole mark, and gives nothing for a file that is part of one.
        if codecs.BOM_UTF8.startswith(data):
            data = b""
        data += file.read(block_bytes)
        fed = 0  # bytes after the mark given to the decoder: read_text counts positions there
        while True:
            final = not data
            start = fed - len(decoder.getstate()[0])  # where this call's input starts
            try:
                text = decoder.decode(data, final)
            except UnicodeDecodeError as err:
                raise _not_utf8(path, err, start, source_name, model_name) from err
            fed += len(data)
            text = newlines.decode(text, final)
            if text:
                yield text
            if final:
                return
            data = file.read(block_bytes)


def _not_utf8(
    path: Path, err: UnicodeDecodeError, offset: int, source_name: str, model_name: str
) -> CalibrationError:
    # UnicodeDecodeError's own wording, with positions counted in the file instead of the block.
    start, end = offset + err.start, offset + err.end
    if err.end - err.start == 1:
        where = f"byte 0x{err.object[err.start]:02x} in position {start}"
    else:
        where = f"bytes in position {start}-{end - 1}"
    return fail(
        source_name,
        model_name,
        f"{path} is not valid UTF-8 ('{err.encoding}' codec can't decode {where}: "
        f"{err.reason}). Re-save the file as UTF-8.",
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
    blocks = _decoded_blocks(path, READ_BYTES, source.source, model_name)
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


# --------------------------------------------------------------------------------------------
# Columns: Parquet files and save_to_disk directories
# --------------------------------------------------------------------------------------------


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


def _read_parquet(path: Path, source: CalibrationSource, model_name: str) -> Iterator[str]:
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


def _read_saved_dataset(path: Path, source: CalibrationSource, model_name: str) -> Iterator[str]:
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
