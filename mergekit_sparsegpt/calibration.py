"""Turn a user's calibration source into token windows, deterministically.

A calibration source is either an existing path (``.txt``, ``.jsonl``, ``.json``, ``.parquet``,
or a directory written by ``datasets``' ``save_to_disk``) or the name of a Hugging Face dataset
(``name`` or ``name:config``). A dataset name is loaded the way ``datasets`` loads it, like mergekit
loads a model by name: from the Hub, or from the local cache when ``HF_HUB_OFFLINE`` /
``HF_DATASETS_OFFLINE`` is set or the Hub is out of reach. It is streamed, so only the documents
the windows need are fetched from a large corpus.

Every failure is a :class:`CalibrationError` whose message names the model, the source and the
fix, because these errors surface in the middle of a long merge run.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
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

LOG = logging.getLogger(__name__)

# Windows per task when calibration_samples is not set, and the fewest a short text may give then.
DEFAULT_SAMPLES = 128
FEWEST_DEFAULT_SAMPLES = 16

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
    "name ('name' or 'name:config'), read from the Hub or, offline, from the local cache."
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


def read_calibration_texts(source: CalibrationSource, model_name: str) -> Iterable[str]:
    """Return the documents of ``source`` in their stored order.

    A ``.txt`` file is one document; every other form gives one document per record. Blank
    documents and null values are dropped. Raises :class:`CalibrationError` when nothing is left.
    Files give a list; a dataset name gives a lazy, single-pass iterable that fetches documents
    only as they are consumed.
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
        texts = _stream_hub_dataset(source, model_name)
    return _non_blank(texts, source.source, model_name)


def _non_blank(texts: Iterable[str], source_name: str, model_name: str) -> Iterable[str]:
    documents = (text for text in texts if text.strip())
    # Peeking reports an empty source now, before any model loads, without reading a stream whole.
    first = next(documents, None)
    if first is None:
        raise _fail(
            source_name,
            model_name,
            "contains no text. Point the calibration source at data with non-blank text.",
        )
    if isinstance(texts, list):
        return [first, *documents]
    return itertools.chain([first], documents)


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
        return _pick_split(loaded, source, model_name, str(path))
    return loaded


def _pick_split(splits: Any, source: CalibrationSource, model_name: str, where: str) -> Any:
    if source.split not in splits:
        available = ", ".join(repr(name) for name in splits) or "none"
        raise _fail(
            source.source,
            model_name,
            f"{where} has no split '{source.split}' (available splits: {available}). "
            "Set calibration_split to one of these.",
        )
    return splits[source.split]


def _dataset_texts(dataset: Any, source: CalibrationSource, model_name: str, where: str) -> list:
    if source.text_field not in dataset.column_names:
        raise _missing_column(source, model_name, where, dataset.column_names)
    # The arrow view honours any indices mapping and avoids per-row Python formatting.
    column = dataset.with_format("arrow")[source.text_field]
    return _string_column(column, source, model_name, where)


def _stream_hub_dataset(source: CalibrationSource, model_name: str) -> Iterator[str]:
    splits = _load_hub_dataset(source, model_name)
    dataset = _pick_split(splits, source, model_name, f"dataset '{source.source}'")
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
    return _fail(
        source.source,
        model_name,
        f"the path does not exist and it could not be loaded as a Hugging Face dataset "
        f"({type(err).__name__}: {_brief(err)}). Give an existing file or directory, or a "
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
            raise _missing_column(source, model_name, where, list(record))
        value = record[field]
        if value is None:
            continue
        if not isinstance(value, str):
            raise _fail(
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
            raise _fail(
                source.source,
                model_name,
                f"reading {where} failed after {count} records ({type(err).__name__}: "
                f"{_brief(err)}). Run again; if it fails at the same place, delete the dataset "
                "from the Hugging Face datasets cache and download it again.",
            ) from err
        count += 1
        yield record


def _brief(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------
# Token windows
# --------------------------------------------------------------------------------------------


def calibration_windows(
    texts: Iterable[str],
    tokenizer: PreTrainedTokenizerBase,
    samples: int | None,
    seq_len: int,
    model_name: str,
    source_name: str,
) -> torch.Tensor:
    """Return ``samples`` non-overlapping ``seq_len``-token windows, int64 ``[samples, seq_len]``.

    All documents are tokenized into one stream (``eos`` between documents when the tokenizer has
    one). Tokenizing stops at ``STREAM_OVERSAMPLE`` times the needed tokens and the stream is cut
    there. Window ``k`` starts at ``k * (len(stream) // samples)``, so the windows are evenly
    spread over the stream; nothing is random. ``samples`` None (not set by the user) means
    ``DEFAULT_SAMPLES``, or as many whole windows as a shorter text gives (see
    :func:`_default_sample_count`).
    """
    for option, value in (("calibration_samples", samples), ("calibration_seq_len", seq_len)):
        if value is None and option == "calibration_samples":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _fail(
                source_name,
                model_name,
                f"{option} must be a positive integer, got {value!r}. Set it to 1 or more.",
            )
    needed = (DEFAULT_SAMPLES if samples is None else samples) * seq_len
    stream = _token_stream(texts, tokenizer, limit=STREAM_OVERSAMPLE * needed)
    if samples is None:
        samples = _default_sample_count(len(stream), seq_len, model_name, source_name)
    elif len(stream) < needed:
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


def _default_sample_count(tokens: int, seq_len: int, model_name: str, source_name: str) -> int:
    """Windows to take when the user set no ``calibration_samples``: the default, or every whole
    window of a shorter text down to ``FEWEST_DEFAULT_SAMPLES``, below which the Hessians of a
    large model would rest on too few tokens to trust without the user saying so."""
    whole = tokens // seq_len
    if whole >= DEFAULT_SAMPLES:
        return DEFAULT_SAMPLES
    if whole < FEWEST_DEFAULT_SAMPLES:
        raise CalibrationError(
            f"calibration data '{source_name}' for model '{model_name}' gives only {tokens} "
            f"tokens with that model's tokenizer: {whole} whole windows of {seq_len} tokens, "
            f"fewer than the {FEWEST_DEFAULT_SAMPLES} taken at least when calibration_samples "
            "is not set. Add text, or set calibration_samples (and calibration_seq_len) to "
            "what it can give."
        )
    LOG.warning(
        "calibration data '%s' for model '%s' gives %d tokens: %d whole windows of %d tokens, "
        "fewer than the default %d; calibrating on those %d. Add text or set "
        "calibration_samples to silence this.",
        source_name,
        model_name,
        tokens,
        whole,
        seq_len,
        DEFAULT_SAMPLES,
        whole,
    )
    return whole


def _token_stream(
    texts: Iterable[str], tokenizer: PreTrainedTokenizerBase, limit: int
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
