"""The Markdown docs link only to files that exist and to headings that exist in them."""

import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import pytest
from markdown_it import MarkdownIt

ROOT = Path(__file__).resolve().parents[1]
DOCS = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").rglob("*.md")),
    *sorted(ROOT.glob("*/README.md")),
]
MARKDOWN = MarkdownIt("commonmark").enable("table")


def heading_anchors(markdown: str) -> set[str]:
    """GitHub's anchors for a document's headings: the heading's text in lower case,
    punctuation dropped, spaces to hyphens, a repeated heading suffixed -1, -2, ..."""
    tokens = MARKDOWN.parse(markdown)
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    for opening, inline in zip(tokens, tokens[1:], strict=False):
        if opening.type != "heading_open":
            continue
        text = "".join(
            t.content for t in inline.children or [] if t.type in ("text", "code_inline")
        )
        slug = re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def link_targets(markdown: str) -> Iterator[str]:
    """The targets of a document's links and images, code blocks excluded."""
    for token in MARKDOWN.parse(markdown):
        for child in token.children or []:
            target = child.attrGet("href") if child.type == "link_open" else child.attrGet("src")
            if target:
                yield unquote(str(target))


def test_headings_and_links_are_read_as_github_does() -> None:
    markdown = (
        "# A `code` title: [one](x.md), two\n```\n# not a heading [no](y.md)\n```\n"
        "## Setup\n## Setup\n\n| a |\n|---|\n| ![plot](img/p.png) |\n"
    )
    assert heading_anchors(markdown) == {"a-code-title-one-two", "setup", "setup-1"}
    assert list(link_targets(markdown)) == ["x.md", "img/p.png"]


def test_docs_are_found() -> None:
    assert ROOT / "README.md" in DOCS
    assert ROOT / "docs" / "studies" / "finetune.md" in DOCS


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc: Path) -> None:
    broken = []
    for target in link_targets(doc.read_text()):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in heading_anchors(dest.read_text()):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{doc.relative_to(ROOT)}: {broken}"
