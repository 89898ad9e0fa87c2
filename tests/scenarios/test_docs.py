"""README.md and docs/: links resolve, every doc is reachable, README stays short.

Plain text checks only (no torch, no mergekit), so this runs in well under a second.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
DOCS = REPO / "docs"
MAX_README_LINES = 220

# [text](target) and ![alt](target); the target ends at whitespace or ")", then an optional title.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.DOTALL | re.MULTILINE)
# A code span: a run of backticks, then anything up to a run of the same length.
INLINE_CODE = re.compile(r"(`+)(.+?)(?<!`)\1(?!`)")


def _markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def _links(path: Path) -> list[str]:
    return _links_in_text(path.read_text(encoding="utf-8"))


def _links_in_text(text: str) -> list[str]:
    """Link targets outside code (fenced blocks are examples; link text may hold inline code)."""
    return LINK.findall(INLINE_CODE.sub(_keep_link_text, FENCE.sub("", text)))


def _keep_link_text(span: re.Match[str]) -> str:
    """Inline code that is a link's text ([`x`](y)) stays; other code spans are not links."""
    before, after = span.string[: span.start()], span.string[span.end() :]
    return span.group(0) if before.endswith("[") and after.startswith("](") else ""


def _local_target(source: Path, target: str) -> Path | None:
    """The file a relative link points to, or None for web, mail and same-page links."""
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("#"):
        return None
    path = unquote(target.split("#", 1)[0].split("?", 1)[0])
    return (source.parent / path).resolve()


def _fenced_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}[ \t]*\n(.*?)^```", text, re.DOTALL | re.MULTILINE)


def test_docs_folder_exists() -> None:
    assert DOCS.is_dir() and list(DOCS.glob("*.md")), "docs/ holds no markdown files"


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_point_to_existing_files(path: Path) -> None:
    broken = []
    for target in _links(path):
        resolved = _local_target(path, target)
        if resolved is not None and not resolved.exists():
            broken.append(target)
    assert not broken, f"{path.relative_to(REPO)} links to missing files: {broken}"


def test_every_doc_is_linked_from_readme() -> None:
    linked = {
        resolved
        for target in _links(README)
        if (resolved := _local_target(README, target)) is not None
    }
    unlinked = [
        str(doc.relative_to(REPO))
        for doc in sorted(DOCS.rglob("*"))
        if doc.is_file() and doc.resolve() not in linked
    ]
    assert not unlinked, f"README.md does not link to {unlinked}"


def test_readme_is_short() -> None:
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move detail into docs/"


def test_readme_bash_blocks_are_the_main_job_then_the_tests() -> None:
    blocks = _fenced_blocks(README.read_text(encoding="utf-8"), "bash")
    assert len(blocks) >= 2, "README.md needs the main-job and the test ```bash blocks"
    assert "python -m mergekit_sparsegpt.demo" in blocks[0], blocks[0]
    assert "pytest" in blocks[1], blocks[1]


def test_link_extraction_sees_links_and_skips_code() -> None:
    """The checker itself: links with inline-code text count, links inside code do not."""
    sample = DOCS / "_sample.md"
    text = (
        "[a](x.md) and [`b`](../y/z.md#part) and ![c](p.png) and `[no](code.md)` and "
        "``[not](either.md) ` inside`` "
        "[web](https://example.com) [anchor](#here)\n```\n[fenced](f.md)\n```\n"
    )
    expected = ["x.md", "../y/z.md#part", "p.png", "https://example.com", "#here"]
    assert _links_in_text(text) == expected
    assert _local_target(sample, "https://example.com") is None
    assert _local_target(sample, "#here") is None
    assert _local_target(sample, "../y/z.md#part") == (REPO / "y" / "z.md").resolve()
