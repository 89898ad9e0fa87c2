"""Turn a user's calibration source into token windows, deterministically.

A calibration source is either an existing path (``.txt``, ``.jsonl``, ``.json``, ``.parquet``,
or a directory written by ``datasets``' ``save_to_disk``) or the name of a Hugging Face dataset
(``name`` or ``name:config``) that is already in the local cache. Dataset names are only ever
resolved offline: a merge must never start a download behind the user's back.

Every failure is a :class:`CalibrationError` whose message names the model, the source and the
fix, because these errors surface in the middle of a long merge run.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "CalibrationError",
    "CalibrationSource",
    "calibration_windows",
    "read_calibration_texts",
]

# Tokenizers are fed pieces of about this many characters, cut on line boundaries: a single
# multi-gigabyte string would make fast tokenizers allocate the whole encoding at once.
CHUNK_CHARS = 64 * 1024

# Tokenizing stops once the stream holds this many times the tokens the windows need. The windows
# are spread over the whole stream, so a few times the need already samples it well, and the bound
# keeps huge corpora from costing minutes of tokenization.
STREAM_OVERSAMPLE = 8

SUPPORTED_EXTENSIONS = (".txt", ".jsonl", ".json", ".parquet")

# Suffixes that make a string look like a file path, so a missing file is reported as such
# instead of being looked up as a dataset name.
_PATH_LIKE_SUFFIXES = SUPPORTED_EXTENSIONS + (
    ".csv",
    ".tsv",
    ".arrow",
    ".md",
    ".gz",
    ".bz2",
    ".xz",
    ".zst",
    ".zip",
)

_SUPPORTED_FORMS = (
    "Supported calibration sources: a .txt file (plain text), a .jsonl file (one JSON object per "
    "line), a .json file (a list of objects or strings, or an object holding one such list), a "
    ".parquet file, a directory written by datasets' save_to_disk, or a Hugging Face dataset "
    "name ('name' or 'name:config') that is already in the local cache."
)


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


def _fail(source: str, model_name: str, problem: str) -> CalibrationError:
    return CalibrationError(f"calibration data '{source}' for model '{model_name}': {problem}")


# --------------------------------------------------------------------------------------------
# Reading sources
# --------------------------------------------------------------------------------------------


def read_calibration_texts(source: CalibrationSource, model_name: str) -> list[str]:
    """Return the documents of ``source`` in their stored order.

    A ``.txt`` file is one document; every other form gives one document per record. Blank
    documents and null values are dropped. Raises :class:`CalibrationError` when nothing is left.
    """
    if not source.source.strip():
        raise _fail(source.source, model_name, "no calibration source given. " + _SUPPORTED_FORMS)
    path = Path(source.source).expanduser()
    if path.exists():
        texts = _read_path(path, source, model_name)
    elif _looks_like_path(source.source):
        raise _fail(
            source.source,
            model_name,
            f"file not found: {path.absolute()}. Fix the path (a relative path is resolved "
            f"against the current directory, {Path.cwd()}).",
        )
    else:
        texts = _read_cached_dataset(source, model_name)
    texts = [text for text in texts if text.strip()]
    if not texts:
        raise _fail(
            source.source,
            model_name,
            "contains no text. Point the calibration source at data with non-blank text.",
        )
    return texts


def _looks_like_path(name: str) -> bool:
    # A single "/" is how Hub datasets are namespaced ("org/name"), so it alone is not enough.
    if name.startswith(("/", "./", "../", "~", "\\")) or "\\" in name or name.count("/") > 1:
        return True
    return name.lower().endswith(_PATH_LIKE_SUFFIXES)


def _read_path(path: Path, source: CalibrationSource, model_name: str) -> list[str]:
    if path.is_dir():
        return _read_saved_dataset(path, source, model_name)
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [_read_utf8(path, source.source, model_name)]
    if suffix == ".jsonl":
        return _read_jsonl(path, source, model_name)
    if suffix == ".json":
        return _read_json(path, source, model_name)
    if suffix == ".parquet":
        return _read_parquet(path, source, model_name)
    raise _fail(
        source.source,
        model_name,
        f"unsupported file type '{suffix or path.name}'. {_SUPPORTED_FORMS}",
    )


def _read_utf8(path: Path, source_name: str, model_name: str) -> str:
    try:
        # utf-8-sig drops a leading byte-order mark, which editors on Windows like to add.
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise _fail(
            source_name,
            model_name,
            f"{path} is not valid UTF-8 ({err}). Re-save the file as UTF-8.",
        ) from err


def _read_jsonl(path: Path, source: CalibrationSource, model_name: str) -> list[str]:
    texts: list[str] = []
    content = _read_utf8(path, source.source, model_name)
    # Split on "\n" only: str.splitlines also breaks on U+2028, which JSON allows inside strings.
    for line_number, line in enumerate(content.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path} line {line_number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise _fail(
                source.source,
                model_name,
                f"{where} is not valid JSON ({err.msg} at column {err.colno}). "
                "Fix or remove that line: a .jsonl file holds one JSON object per line.",
            ) from err
        _append_record_text(texts, record, where, source, model_name, allow_plain_string=False)
    return texts


def _read_json(path: Path, source: CalibrationSource, model_name: str) -> list[str]:
    content = _read_utf8(path, source.source, model_name)
    try:
        data = json.loads(content) if content.strip() else []
    except json.JSONDecodeError as err:
        raise _fail(
            source.source,
            model_name,
            f"{path} is not valid JSON ({err.msg} at line {err.lineno} column {err.colno}). "
            "Fix the file, or use .jsonl for one JSON object per line.",
        ) from err
    records = _json_records(data, path, source, model_name)
    texts: list[str] = []
    for index, record in enumerate(records):
        where = f"{path} item {index}"
        _append_record_text(texts, record, where, source, model_name, allow_plain_string=True)
    return texts


def _json_records(data: Any, path: Path, source: CalibrationSource, model_name: str) -> list[Any]:
    if isinstance(data, list):
        return data
    # Many exports wrap the records as {"data": [...]}; accept exactly one such list.
    if isinstance(data, dict):
        lists = [value for value in data.values() if isinstance(value, list)]
        if len(data) == 1 and len(lists) == 1:
            return lists[0]
    raise _fail(
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


def _append_record_text(
    texts: list[str],
    record: Any,
    where: str,
    source: CalibrationSource,
    model_name: str,
    *,
    allow_plain_string: bool,
) -> None:
    field = source.text_field
    if allow_plain_string and isinstance(record, str):
        texts.append(record)
        return
    if not isinstance(record, dict):
        raise _fail(
            source.source,
            model_name,
            f"{where} is a JSON {type(record).__name__}, not an object with field '{field}'. "
            "Make every record an object holding the text.",
        )
    if field not in record:
        fields = ", ".join(repr(key) for key in record) or "none"
        raise _fail(
            source.source,
            model_name,
            f"{where} has no field '{field}' (fields: {fields}). Set calibration_field "
            "to the field that holds the text, or add it to that record.",
        )
    value = record[field]
    if value is None:
        return
    if not isinstance(value, str):
        raise _fail(
            source.source,
            model_name,
            f"{where}: field '{field}' is a JSON {type(value).__name__}, not a string. "
            "Set calibration_field to a field holding text.",
        )
    texts.append(value)


def _read_parquet(path: Path, source: CalibrationSource, model_name: str) -> list[str]:
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
        if source.text_field not in schema.names:
            raise _missing_column(source, model_name, str(path), schema.names)
        column = pq.read_table(path, columns=[source.text_field]).column(source.text_field)
    except CalibrationError:
        raise
    except Exception as err:  # pyarrow raises several unrelated types for unreadable files
        raise _fail(
            source.source,
            model_name,
            f"{path} could not be read as Parquet ({type(err).__name__}: {_brief(err)}). "
            "Check that the file is a complete Parquet file.",
        ) from err
    return _string_column(column, source, model_name, str(path))


def _missing_column(
    source: CalibrationSource, model_name: str, where: str, columns: Sequence[str]
) -> CalibrationError:
    available = ", ".join(repr(name) for name in columns) or "none"
    return _fail(
        source.source,
        model_name,
        f"{where} has no column '{source.text_field}' (available columns: {available}). "
        "Set calibration_field to the column that holds the text.",
    )


def _string_column(column: Any, source: CalibrationSource, model_name: str, where: str) -> list:
    import pyarrow as pa

    kind = column.type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or _is_string_view(kind)):
        raise _fail(
            source.source,
            model_name,
            f"{where}: column '{source.text_field}' holds {kind}, not text. "
            "Set calibration_field to a column of strings.",
        )
    return [text for text in column.to_pylist() if text is not None]


def _is_string_view(kind: Any) -> bool:
    import pyarrow as pa

    # pa.types.is_string_view only exists in newer pyarrow releases.
    check = getattr(pa.types, "is_string_view", None)
    return bool(check and check(kind))


def _read_saved_dataset(path: Path, source: CalibrationSource, model_name: str) -> list[str]:
    dataset = _load_saved_dataset(path, source, model_name)
    return _dataset_texts(dataset, source, model_name, str(path))


def _load_saved_dataset(path: Path, source: CalibrationSource, model_name: str) -> Any:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:  # not a save_to_disk directory, or a damaged one
        raise _fail(
            source.source,
            model_name,
            f"{path} is a directory but not one written by datasets' save_to_disk "
            f"({type(err).__name__}: {_brief(err)}). {_SUPPORTED_FORMS}",
        ) from err
    if isinstance(loaded, datasets.DatasetDict):
        if source.split not in loaded:
            splits = ", ".join(repr(name) for name in loaded) or "none"
            raise _fail(
                source.source,
                model_name,
                f"{path} has no split '{source.split}' (available splits: {splits}). "
                "Set calibration_split to one of these.",
            )
        return loaded[source.split]
    return loaded


def _dataset_texts(dataset: Any, source: CalibrationSource, model_name: str, where: str) -> list:
    if source.text_field not in dataset.column_names:
        raise _missing_column(source, model_name, where, dataset.column_names)
    # The arrow view honours any indices mapping and avoids per-row Python formatting.
    column = dataset.with_format("arrow")[source.text_field]
    return _string_column(column, source, model_name, where)


def _read_cached_dataset(source: CalibrationSource, model_name: str) -> list[str]:
    dataset = _load_cached_dataset(source, model_name)
    return _dataset_texts(dataset, source, model_name, f"dataset split '{source.split}'")


def _split_dataset_name(name: str) -> tuple[str, str | None]:
    dataset_name, _, config = name.partition(":")
    return dataset_name, config or None


def _load_cached_dataset(source: CalibrationSource, model_name: str) -> Any:
    import datasets

    name, config = _split_dataset_name(source.source)
    try:
        with _hf_offline():
            return datasets.load_dataset(name, config, split=source.split)
    except Exception as err:  # datasets raises many types here; all mean "not usable offline"
        config_arg = f", {config!r}" if config else ""
        example = f"datasets.load_dataset({name!r}{config_arg}, split={source.split!r})"
        raise _fail(
            source.source,
            model_name,
            f"the path does not exist and it is not a dataset available offline in the Hugging "
            f"Face cache ({type(err).__name__}: {_brief(err)}). Give an existing file or "
            f"directory, or download the dataset once with network access ({example}) so it is "
            "in the cache.",
        ) from err


def _brief(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def _hf_offline() -> Iterator[None]:
    """Force ``datasets``/``huggingface_hub`` offline for the duration, then restore.

    Both libraries read their offline switches into module constants at import time, so the
    environment variables alone would not take effect in an already running process.
    """
    import datasets.config
    import huggingface_hub.constants

    saved_env = {key: os.environ.get(key) for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    targets = [
        (datasets.config, "HF_HUB_OFFLINE"),
        (datasets.config, "HF_DATASETS_OFFLINE"),
        (huggingface_hub.constants, "HF_HUB_OFFLINE"),
    ]
    # Older releases lack some of these switches; only the ones that exist can matter.
    saved_attrs = [(mod, attr, getattr(mod, attr)) for mod, attr in targets if hasattr(mod, attr)]
    try:
        for key in saved_env:
            os.environ[key] = "1"
        for module, attr, _ in saved_attrs:
            setattr(module, attr, True)
        yield
    finally:
        for module, attr, value in saved_attrs:
            setattr(module, attr, value)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# --------------------------------------------------------------------------------------------
# Token windows
# --------------------------------------------------------------------------------------------


def calibration_windows(
    texts: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    samples: int,
    seq_len: int,
    model_name: str,
    source_name: str,
) -> torch.Tensor:
    """Return ``samples`` non-overlapping ``seq_len``-token windows, int64 ``[samples, seq_len]``.

    All documents are tokenized into one stream (``eos`` between documents when the tokenizer has
    one). Tokenizing stops at ``STREAM_OVERSAMPLE`` times the needed tokens and the stream is cut
    there. Window ``k`` starts at ``k * (len(stream) // samples)``, so the windows are evenly
    spread over the stream; nothing is random.
    """
    for option, value in (("calibration_samples", samples), ("calibration_seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _fail(
                source_name,
                model_name,
                f"{option} must be a positive integer, got {value!r}. Set it to 1 or more.",
            )
    needed = samples * seq_len
    stream = _token_stream(texts, tokenizer, limit=STREAM_OVERSAMPLE * needed)
    if len(stream) < needed:
        raise CalibrationError(
            f"calibration data '{source_name}' for model '{model_name}' gives only "
            f"{len(stream)} tokens with that model's tokenizer; calibration_samples x "
            f"calibration_seq_len = {samples} x {seq_len} = {needed} are needed. Add text or "
            "lower calibration_samples / calibration_seq_len."
        )
    stride = len(stream) // samples
    starts = torch.arange(samples, dtype=torch.long).unsqueeze(1) * stride
    offsets = torch.arange(seq_len, dtype=torch.long).unsqueeze(0)
    return stream[starts + offsets]


def _token_stream(
    texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, limit: int
) -> torch.Tensor:
    eos_id = getattr(tokenizer, "eos_token_id", None)
    stream: list[int] = []
    for text in texts:
        at_document_start = True
        for piece in _line_chunks(text, CHUNK_CHARS):
            # verbose=False: pieces may exceed model_max_length, which is harmless here.
            ids = tokenizer(piece, add_special_tokens=False, verbose=False)["input_ids"]
            if not ids:
                continue
            if at_document_start and stream and eos_id is not None:
                stream.append(eos_id)
            at_document_start = False
            stream.extend(ids)
            if len(stream) >= limit:
                return torch.tensor(stream[:limit], dtype=torch.long)
    return torch.tensor(stream, dtype=torch.long)


def _line_chunks(text: str, size: int) -> Iterator[str]:
    """Yield consecutive pieces of ``text`` of at most about ``size`` characters.

    Cuts follow a newline where possible, else whitespace, so token boundaries barely move;
    only a run of ``size`` characters without either is cut mid-word.
    """
    start = 0
    while len(text) - start > size:
        end = text.rfind("\n", start, start + size) + 1
        if end <= start:
            end = _last_space(text, start, start + size)
        yield text[start:end]
        start = end
    if start < len(text):
        yield text[start:]


def _last_space(text: str, start: int, stop: int) -> int:
    # Cut before the space so the next piece starts with " word", as the word tokenizes mid-text.
    for index in range(stop - 1, start, -1):
        if text[index].isspace():
            return index
    return stop
