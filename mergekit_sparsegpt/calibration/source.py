"""What a calibration source is, and the error every calibration stage raises about one.

Every failure is a :class:`CalibrationError` whose message names the model, the source and the
fix, because these errors surface in the middle of a long merge run.
"""

from __future__ import annotations

from dataclasses import dataclass

SUPPORTED_EXTENSIONS = (".txt", ".jsonl", ".json", ".parquet")

SUPPORTED_FORMS = (
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


def fail(source: str, model_name: str, problem: str) -> CalibrationError:
    return CalibrationError(f"calibration data '{source}' for model '{model_name}': {problem}")


def brief(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
