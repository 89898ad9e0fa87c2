"""What the calibration tests share: a word-level tokenizer whose ids are easy to compute by hand,
and readers that turn a source into whole strings or its error message."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from mergekit_sparsegpt.calibration.documents import Document
from mergekit_sparsegpt.calibration.source import CalibrationError, CalibrationSource
from mergekit_sparsegpt.calibration.texts import read_calibration_texts
from mergekit_sparsegpt.calibration.windows import calibration_windows

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


def windows(texts, tokenizer, samples: int, seq_len: int) -> torch.Tensor:
    return calibration_windows(texts, tokenizer, samples, seq_len, MODEL, "corpus.jsonl")
