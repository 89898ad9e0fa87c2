"""Calibration documents: a string, or a ``.txt`` file read from disk in blocks as it is tokenized.

A document is handed to the tokenizer in pieces cut on line boundaries, so that neither a large
file nor a large string is ever tokenized (or, for a file, held) whole.
"""

from __future__ import annotations

import codecs
import io
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from mergekit_sparsegpt.calibration.source import CalibrationError, fail

# Bytes read from a text file at a time when only its start matters (the blank check, JSONL).
READ_BYTES = 64 * 1024


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
        for block in decoded_blocks(self.path, size, self.source_name, self.model_name):
            buffer += block
            while len(buffer) > size:
                end = _cut(buffer, 0, size)
                yield buffer[:end]
                buffer = buffer[end:]
        if buffer:
            yield buffer

    def is_blank(self) -> bool:
        """Whether the text is only whitespace; reads up to the first non-blank block."""
        blocks = start_blocks(self.path, self.source_name, self.model_name)
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


def start_blocks(path: Path, source_name: str, model_name: str) -> Iterator[str]:
    """:func:`decoded_blocks` of ``READ_BYTES``, for a reader that may stop early."""
    return decoded_blocks(path, READ_BYTES, source_name, model_name)


def decoded_blocks(
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
