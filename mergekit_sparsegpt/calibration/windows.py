"""Cut calibration documents into token windows, deterministically, and refuse what is not text.

The documents come from :func:`mergekit_sparsegpt.calibration.texts.read_calibration_texts`.
Every failure is a :class:`~mergekit_sparsegpt.calibration.source.CalibrationError` whose message
names the model, the source and the fix.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from mergekit_sparsegpt.calibration.documents import Document, document_pieces
from mergekit_sparsegpt.calibration.source import CalibrationError, fail

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

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

# Text is refused when more than this share of its characters (spaces, tabs and line breaks not
# counted) are control or invisible format characters. Real text has a few (a zero-width joiner
# in an emoji sequence, a soft hyphen, a form feed in source code); a preallocated or crashed
# download (NUL bytes) or a zero-width-only file is made of nothing else.
INVISIBLE_SHARE_LIMIT = 0.5

# Text is refused when one token id is more than this share of its tokens. The most common token
# of prose is a few percent, of source code under half even where every space of the indentation
# is a token of its own, and the end-of-text separators between one-token documents are half;
# one word or character repeated, or a stream of unknown tokens, comes close to all of them.
TOKEN_SHARE_LIMIT = 0.75

# Streams shorter than this are not judged by their most common token: a few tokens of real text
# can repeat one word by chance.
TOKEN_SHARE_MIN_TOKENS = 64

# Control characters other than tab and line breaks (C0, DEL, C1) and the invisible format
# characters: soft hyphen, zero-width space / (non-)joiners, direction marks and embeddings,
# word joiner and invisible operators, isolates, and the byte-order mark inside a text.
_INVISIBLE_RUN = re.compile(
    "[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u00ad\u061c\u180e\u200b-\u200f\u2028-\u202e"
    "\u2060-\u2064\u2066-\u206f\ufeff]+"
)

_NOT_TEXT_FIX = (
    "This does not look like text: check that the file is a finished download (a crashed or "
    "preallocated download is full of NUL bytes) and that calibration_field names the field "
    "that holds the text."
)


def calibration_windows(
    texts: Iterable[Document],
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
    :func:`_default_sample_count`). A stream that is not text (see :func:`_refuse_non_text`) is
    refused before its length is judged.
    """
    for option, value in (("calibration_samples", samples), ("calibration_seq_len", seq_len)):
        if value is None and option == "calibration_samples":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise fail(
                source_name,
                model_name,
                f"{option} must be a positive integer, got {value!r}. Set it to 1 or more.",
            )
    needed = (DEFAULT_SAMPLES if samples is None else samples) * seq_len
    stream, characters = _token_stream(texts, tokenizer, limit=STREAM_OVERSAMPLE * needed)
    _refuse_non_text(stream, characters, tokenizer, model_name, source_name)
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


@dataclass
class _CharacterCount:
    """What the text tokenized is made of, counted piece by piece as it is tokenized."""

    counted: int = 0  # characters other than spaces, tabs and line breaks
    invisible: int = 0  # of those, control and invisible format characters
    first_invisible: str | None = None

    def add(self, piece: str) -> None:
        # str.count scans in C; spaces and line breaks are left out so that the share of a
        # document is about its visible text, however it is laid out.
        self.counted += len(piece) - sum(piece.count(blank) for blank in " \t\n\r")
        for run in _INVISIBLE_RUN.finditer(piece):
            self.invisible += run.end() - run.start()
            if self.first_invisible is None:
                self.first_invisible = piece[run.start()]


def _token_stream(
    texts: Iterable[Document], tokenizer: PreTrainedTokenizerBase, limit: int
) -> tuple[torch.Tensor, _CharacterCount]:
    eos_id = getattr(tokenizer, "eos_token_id", None)
    stream: list[int] = []
    characters = _CharacterCount()
    for text in texts:
        at_document_start = True
        for piece in document_pieces(text, CHUNK_CHARS):
            characters.add(piece)
            # verbose=False: pieces may exceed model_max_length, which is harmless here.
            ids = tokenizer(piece, add_special_tokens=False, verbose=False)["input_ids"]
            if not ids:
                continue
            if at_document_start and stream and eos_id is not None:
                stream.append(eos_id)
            at_document_start = False
            stream.extend(ids)
            if len(stream) >= limit:
                return torch.tensor(stream[:limit], dtype=torch.long), characters
    return torch.tensor(stream, dtype=torch.long), characters


def _refuse_non_text(
    stream: torch.Tensor,
    characters: _CharacterCount,
    tokenizer: PreTrainedTokenizerBase,
    model_name: str,
    source_name: str,
) -> None:
    """Refuse text made of control or invisible characters, or of one token repeated: Hessians
    built from it would calibrate the model on garbage, with no sign of it in the merge."""
    if characters.invisible > INVISIBLE_SHARE_LIMIT * characters.counted:
        share = characters.invisible / characters.counted
        first = ord(characters.first_invisible or "\0")
        raise fail(
            source_name,
            model_name,
            f"{share:.0%} of its characters are control or invisible format characters "
            f"({characters.invisible:,} of the {characters.counted:,} read, not counting "
            f"spaces and line breaks; the first is U+{first:04X}). {_NOT_TEXT_FIX}",
        )
    if len(stream) < TOKEN_SHARE_MIN_TOKENS:
        return
    counts = torch.bincount(stream)
    top = int(counts.argmax())
    share = int(counts[top]) / len(stream)
    if share > TOKEN_SHARE_LIMIT:
        raise fail(
            source_name,
            model_name,
            f"token id {top}{_token_name(tokenizer, top)} is {share:.0%} of the "
            f"{len(stream):,} tokens read with that model's tokenizer. {_NOT_TEXT_FIX}",
        )


def _token_name(tokenizer: Any, token_id: int) -> str:
    convert = getattr(tokenizer, "convert_ids_to_tokens", None)
    return f" ({convert(token_id)!r})" if convert is not None else ""
