"""Turn a user's calibration source into a stream of documents.

A calibration source is either an existing path (``.txt``, ``.jsonl``, ``.json``, ``.parquet``,
or a directory written by ``datasets``' ``save_to_disk``; see
:mod:`mergekit_sparsegpt.calibration.files`) or the name of a Hugging Face dataset (``name`` or
``name:config``; see :mod:`mergekit_sparsegpt.calibration.datasets`). Every form is streamed, so
only the documents the token windows need are read.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from pathlib import Path

from mergekit_sparsegpt.calibration.datasets import stream_hub_dataset
from mergekit_sparsegpt.calibration.documents import Document, is_blank
from mergekit_sparsegpt.calibration.files import read_path
from mergekit_sparsegpt.calibration.source import (
    SUPPORTED_EXTENSIONS,
    SUPPORTED_FORMS,
    CalibrationSource,
    fail,
)

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


def read_calibration_texts(source: CalibrationSource, model_name: str) -> Iterable[Document]:
    """Return the documents of ``source`` in their stored order, as an iterable to read once.

    A ``.txt`` file is one document, a :class:`TextFile` read from disk as it is tokenized; every
    other form gives one string per record. Blank documents and null values are dropped. Only the
    first non-blank document is read now (a ``.json`` file is parsed whole), to raise
    :class:`CalibrationError` when there is none; the rest, and any error in it, is read only as
    far as the consumer goes, so the part of a large file after what the windows need is never
    read. A path that is neither a regular file nor a directory (a FIFO, a device, a symlink to
    one) is refused before anything is opened.
    """
    if not source.source.strip():
        raise fail(source.source, model_name, "no calibration source given. " + SUPPORTED_FORMS)
    path = Path(source.source).expanduser()
    if path.exists():
        texts = read_path(path, source, model_name)
    elif _looks_like_path(source.source):
        raise fail(
            source.source,
            model_name,
            f"file not found: {path.absolute()}. Fix the path (a relative path is resolved "
            f"against the current directory, {Path.cwd()}).",
        )
    else:
        texts = stream_hub_dataset(source, model_name)
    return _non_blank(texts, source.source, model_name)


def _non_blank(texts: Iterable[Document], source_name: str, model_name: str) -> Iterable[Document]:
    documents = (text for text in texts if not is_blank(text))
    # Peeking reports an empty source now, before any model loads, without reading a stream whole.
    first = next(documents, None)
    if first is None:
        raise fail(
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
