"""The benchmark's domains: real text found on the machine plus generated exact-answer tasks.

* ``prose`` (the base's domain, and the retention column): ``pydoc_data.topics`` via the demo
  corpus;
* ``code``: standard-library sources via the demo corpus;
* ``german``: German man pages under /usr/share/man/de, only where they are installed;
* ``add`` / ``sort`` / ``rev``: generated problems, each with its own prompt form, scored by
  exact match (``add 12+7=19``, ``sort 39140=01349``, ``rev 39140=04193``).

Every domain has disjoint ``train`` / ``calibration`` / ``validation`` / ``heldout`` splits:
the demo corpus' calibration split is halved (alternate documents or problems) into
``calibration``, which feeds the Hessians, and ``validation``, on which hyperparameters are
chosen. :func:`sources` records what each split used.
"""

from __future__ import annotations

import gzip
import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from mergekit_sparsegpt.demo import corpus

SPLITS = ("train", "calibration", "validation", "heldout")
QA_LINES_PER_TEXT = corpus.ARITH_LINES_PER_TEXT
# Held-out and calibration (+ validation) problems per generated task; train gets the rest.
QA_SPLIT_SIZES = corpus.ARITH_SPLIT_SIZES
QA_POOL = 12_000

# Other natural languages, in order of preference: the first with enough man pages is used.
MAN_LANGUAGES = ("de", "fr", "es")
MAN_ROOT = Path("/usr/share/man")
MAN_MIN_FILES = 40  # fewer leaves the held-out and calibration splits a handful of pages


@dataclass(frozen=True)
class Domain:
    """A text domain; ``problems`` is set for exact-answer tasks (prompt, answer) pairs."""

    name: str
    texts: Callable[[str], list[str]]
    problems: Callable[[str], list[tuple[str, str]]] | None = None

    @property
    def exact(self) -> bool:
        return self.problems is not None


# ---------------------------------------------------------------------------- generated tasks


def halved_split(items_of: Callable[[str], list], split: str) -> list:
    """Items of one benchmark split, from a reader of the demo corpus' three splits."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if split in ("calibration", "validation"):
        return items_of("calibration")[split == "validation" :: 2]
    return items_of(split)


def _sort_problem(rng: random.Random) -> tuple[str, str]:
    digits = "".join(rng.choice(string.digits) for _ in range(5))
    return f"sort {digits}=", "".join(sorted(digits))


def _rev_problem(rng: random.Random) -> tuple[str, str]:
    # Digits (one token each), not letters: single-letter tokens such as " a" are common in
    # prose, and a tiny expert that learned to emit them lost most of its English.
    digits = "".join(rng.choice(string.digits) for _ in range(5))
    return f"rev {digits}=", digits[::-1]


GENERATORS: dict[str, tuple[Callable[[random.Random], tuple[str, str]], int]] = {
    "sort": (_sort_problem, 2024),
    "rev": (_rev_problem, 2025),
}


@cache
def _qa_splits(task: str) -> dict[str, tuple[tuple[str, str], ...]]:
    """Distinct problems drawn with the task's seed, cut into disjoint splits."""
    make, seed = GENERATORS[task]
    rng = random.Random(seed)
    pool: dict[str, str] = {}
    for _ in range(20 * QA_POOL):  # bounded: a too-small problem space must not hang
        prompt, answer = make(rng)
        pool.setdefault(prompt, answer)
        if len(pool) == QA_POOL:
            break
    if len(pool) < QA_POOL:
        raise ValueError(f"{task}: fewer than {QA_POOL} distinct problems")
    items = list(pool.items())
    held, cal = QA_SPLIT_SIZES["heldout"], QA_SPLIT_SIZES["calibration"]
    return {
        "heldout": tuple(items[:held]),
        "calibration": tuple(items[held : held + cal]),
        "train": tuple(items[held + cal :]),
    }


def qa_problems(task: str, split: str) -> list[tuple[str, str]]:
    """(prompt, answer) pairs of one generated task; ``add`` is the demo's arithmetic."""
    if task == "add":
        return halved_split(corpus.arithmetic_problems, split)
    return halved_split(lambda s: list(_qa_splits(task)[s]), split)


def qa_texts(task: str, split: str) -> list[str]:
    """Blocks of ``prompt+answer`` lines, one block per document, as the experts train on."""
    lines = [p + a for p, a in qa_problems(task, split)]
    step = QA_LINES_PER_TEXT
    return ["\n".join(lines[i : i + step]) + "\n" for i in range(0, len(lines), step)]


# ------------------------------------------------------------------------ another language

_TEXT_MACROS = re.compile(r"^\.(B|I|BI|BR|IB|IR|RB|RI|SB|SM|SH|SS)\b\s*")
_ESCAPES = [
    (re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""),  # font changes
    (re.compile(r"\\\*(\[[^\]]*\]|\(..|.)"), ""),  # string registers
    (re.compile(r"\\\((em|en)"), "-"),
    (re.compile(r"\\\(aq"), "'"),
    (re.compile(r"\\\((lq|rq|dq)"), '"'),
    (re.compile(r"\\\(.."), ""),
    (re.compile(r"\\[-]"), "-"),
    (re.compile(r"\\[e\\]"), "\\\\"),
    (re.compile(r"\\[&|^,/:]"), ""),
    (re.compile(r"\\ "), " "),
]


def strip_troff(source: str) -> str:
    """Plain text of a man page: keep text lines and the text of font/heading macros."""
    out: list[str] = []
    for line in source.splitlines():
        if line.startswith(('.\\"', "'\\\"", '.\\"')):
            continue
        macro = _TEXT_MACROS.match(line)
        if macro:
            line = line[macro.end() :].replace('"', "")
        elif line.startswith((".", "'")):
            continue
        for pattern, replacement in _ESCAPES:
            line = pattern.sub(replacement, line)
        out.append(line.rstrip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()


@cache
def man_language() -> tuple[str, tuple[Path, ...]]:
    """(language, sorted man page files) of the first language installed; ("", ()) if none."""
    for lang in MAN_LANGUAGES:
        files = tuple(sorted((MAN_ROOT / lang).glob("man*/*.gz")))
        if len(files) >= MAN_MIN_FILES:
            return lang, files
    return "", ()


def _man_files(split: str) -> list[Path]:
    _, files = man_language()
    return halved_split(
        lambda s: [p for i, p in enumerate(files) if corpus.split_of(i) == s], split
    )


def man_texts(split: str) -> list[str]:
    """Plain text of one split's man pages (split by sorted file, as the demo splits code)."""
    texts = []
    for path in _man_files(split):
        with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
            text = strip_troff(f.read())
        if text:
            texts.append(text)
    return texts


# ------------------------------------------------------------------------------- registry


def _qa(task: str) -> Domain:
    return Domain(task, lambda s: qa_texts(task, s), lambda s: qa_problems(task, s))


def domains() -> dict[str, Domain]:
    """Every domain available on this machine; the first is the base's (prose)."""
    found = {
        "prose": Domain("prose", lambda s: halved_split(corpus.prose_texts, s)),
        "code": Domain("code", lambda s: halved_split(corpus.code_texts, s)),
    }
    lang, _ = man_language()
    if lang:
        name = "german" if lang == "de" else f"man_{lang}"
        found[name] = Domain(name, man_texts)
    found.update({task: _qa(task) for task in ("add", "sort", "rev")})
    return found


def sources() -> dict[str, object]:
    """Which topics / files / problems / seeds each split of each domain used."""
    demo = {
        domain: {s: halved_split(lambda c, items=items: items[c], s) for s in SPLITS}
        for domain, items in corpus.sources().items()
    }
    lang, _ = man_language()
    record: dict[str, object] = {
        "prose": {"source": "pydoc_data.topics (demo corpus)", **demo["prose"]},
        "code": {"source": "stdlib .py files (demo corpus)", **demo["code"]},
        "other_language": {
            "language": lang or None,
            "looked_for": [str(MAN_ROOT / lang) for lang in MAN_LANGUAGES],
            "note": "man pages, troff stripped" if lang else "none installed: domain skipped",
            **{s: [str(p) for p in _man_files(s)] for s in SPLITS},
        },
        "add": {"source": "demo corpus", "seed": corpus.ARITH_SEED, **demo["arithmetic"]},
    }
    for task, (_, seed) in GENERATORS.items():
        record[task] = {
            "seed": seed,
            "pool": QA_POOL,
            **{s: [p + a for p, a in qa_problems(task, s)] for s in SPLITS},
        }
    return record
