"""Deterministic demo corpora built only from what ships with every CPython install.

Three domains, each with disjoint ``train`` / ``calibration`` / ``heldout`` splits:

* ``prose``: English documentation topics from ``pydoc_data.topics`` (stdlib module
  docstrings when that module is missing);
* ``code``: a fixed list of standard-library ``.py`` sources;
* ``arithmetic``: generated lines like ``add 12+7=19`` (a skill with its own prompt form).
"""

from __future__ import annotations

import ast
import random
import sysconfig
from collections.abc import Sequence
from functools import cache
from pathlib import Path

DOMAINS = ("prose", "code", "arithmetic")
SPLITS = ("train", "calibration", "heldout")

# Modules present in CPython 3.10-3.14 (none of the PEP 594 removals), so the list is stable.
CODE_MODULES = (
    "abc", "base64", "bdb", "bisect", "calendar", "cmd", "code", "colorsys", "contextlib",
    "copy", "csv", "dis", "filecmp", "fileinput", "fractions", "functools", "getopt",
    "gettext", "glob", "graphlib", "gzip", "heapq", "hmac", "lzma", "mimetypes", "netrc",
    "numbers", "operator", "pprint", "pstats", "queue", "quopri", "random", "sched",
    "selectors", "shelve", "shlex", "string", "textwrap", "timeit", "tokenize", "trace",
    "tracemalloc", "types", "uuid", "warnings", "wave", "weakref", "zipapp",
)  # fmt: skip

# Docstring-prose fallback reads modules disjoint from CODE_MODULES, so domains never overlap.
DOCSTRING_MODULES = (
    "argparse", "ast", "datetime", "difflib", "doctest", "enum", "ftplib", "imaplib",
    "inspect", "ipaddress", "locale", "mailbox", "optparse", "pathlib", "pdb", "pickle",
    "pickletools", "pydoc", "shutil", "smtplib", "socket", "ssl", "statistics",
    "subprocess", "tarfile", "tempfile", "threading", "typing", "zipfile",
)  # fmt: skip

ARITH_SEED = 1234
ARITH_MAX_OPERAND = 99
ARITH_LINES_PER_TEXT = 16
ARITH_SPLIT_SIZES = {"heldout": 400, "calibration": 400}  # train gets the remaining pairs


def split_of(index: int) -> str:
    """Deterministic 6/1/1 assignment of the i-th sorted item to a split."""
    return {0: "heldout", 1: "calibration"}.get(index % 8, "train")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@cache
def code_files() -> tuple[Path, ...]:
    """The stdlib sources used for ``code``, sorted; missing modules are skipped."""
    paths = (_stdlib_dir() / f"{name}.py" for name in sorted(CODE_MODULES))
    return tuple(p for p in paths if p.is_file())


def _select(items: Sequence[str], split: str) -> list[str]:
    _check_split(split)
    return [item for i, item in enumerate(items) if split_of(i) == split]


def code_texts(split: str) -> list[str]:
    """Whole stdlib source files of one split."""
    names = _select([p.name for p in code_files()], split)
    return [(_stdlib_dir() / n).read_text(encoding="utf-8") for n in names]


@cache
def _prose_documents() -> tuple[tuple[str, str], ...]:
    """(name, text) pairs sorted by name: pydoc topics, else module docstrings."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        topics = {}
    docs = sorted((f"topic:{k}", v) for k, v in topics.items()) or sorted(_docstring_documents())
    # Some topics share one text (e.g. "if" and "else"); keep the first name so splits stay
    # disjoint in text, not only in name.
    unique = {text: name for name, text in reversed(docs)}
    return tuple(sorted((name, text) for text, name in unique.items()))


def _docstring_documents() -> list[tuple[str, str]]:
    """Module/class/function docstrings, parsed (not imported) so nothing runs."""
    docs: list[tuple[str, str]] = []
    for name in DOCSTRING_MODULES:
        path = _stdlib_dir() / f"{name}.py"
        if not path.is_file():
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        nodes = [tree, *ast.walk(tree)]
        strings = [ast.get_docstring(n) for n in nodes if _has_docstring(n)]
        text = "\n\n".join(s for s in dict.fromkeys(strings) if s)
        if text:
            docs.append((f"docstrings:{name}", text))
    return docs


def _has_docstring(node: ast.AST) -> bool:
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return isinstance(node, kinds)


def prose_texts(split: str) -> list[str]:
    """English documentation texts of one split."""
    docs = _prose_documents()
    names = set(_select([name for name, _ in docs], split))
    return [text for name, text in docs if name in names]


@cache
def _arith_pairs() -> dict[str, tuple[tuple[int, int], ...]]:
    """All operand pairs, shuffled once with a fixed seed and cut into disjoint splits."""
    n = ARITH_MAX_OPERAND + 1
    pairs = [(a, b) for a in range(n) for b in range(n)]
    random.Random(ARITH_SEED).shuffle(pairs)
    held, cal = ARITH_SPLIT_SIZES["heldout"], ARITH_SPLIT_SIZES["calibration"]
    return {
        "heldout": tuple(pairs[:held]),
        "calibration": tuple(pairs[held : held + cal]),
        "train": tuple(pairs[held + cal :]),
    }


def arithmetic_line(a: int, b: int) -> str:
    """One example of the arithmetic skill, e.g. ``add 12+7=19``."""
    return f"add {a}+{b}={a + b}"


def arithmetic_problems(split: str) -> list[tuple[str, str]]:
    """(prompt, answer) pairs such as ("add 12+7=", "19") for exact-match scoring."""
    _check_split(split)
    return [(f"add {a}+{b}=", str(a + b)) for a, b in _arith_pairs()[split]]


def arithmetic_texts(split: str) -> list[str]:
    """Blocks of newline-separated arithmetic lines (one block = one document)."""
    _check_split(split)
    lines = [arithmetic_line(a, b) for a, b in _arith_pairs()[split]]
    step = ARITH_LINES_PER_TEXT
    return ["\n".join(lines[i : i + step]) + "\n" for i in range(0, len(lines), step)]


def domain_texts(domain: str, split: str) -> list[str]:
    """Texts of one domain and split."""
    readers = {"prose": prose_texts, "code": code_texts, "arithmetic": arithmetic_texts}
    if domain not in readers:
        raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS}")
    return readers[domain](split)


def sources() -> dict[str, dict[str, list[str]]]:
    """Which files / topics / operand pairs each domain and split used (for reporting)."""
    docs = [name for name, _ in _prose_documents()]
    files = [p.name for p in code_files()]
    pairs = _arith_pairs()
    return {
        "prose": {s: _select(docs, s) for s in SPLITS},
        "code": {s: _select(files, s) for s in SPLITS},
        "arithmetic": {s: [f"{a}+{b}" for a, b in pairs[s]] for s in SPLITS},
    }
