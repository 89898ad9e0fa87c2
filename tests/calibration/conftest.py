"""Fixtures the calibration tests share."""

from __future__ import annotations

import pytest
from calibration_helpers import make_tokenizer
from transformers import PreTrainedTokenizerFast


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()
