"""The docs stay short enough to read, and their links lead somewhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


# the README grows by an op-table line per mixer (issues 28-29 list a dozen): 14 KB, still one sitting
@pytest.mark.parametrize("path, limit_kb", [("README.md", 14), ("bench/NOTES.md", 25), ("bench/RESULTS.md", 25)])
def test_doc_fits_its_size(path, limit_kb):
    size = (ROOT / path).stat().st_size
    assert size <= limit_kb * 1000, f"{path} is {size} bytes, over {limit_kb} KB"


def relative_links(markdown: str) -> list[str]:
    """The targets of the markdown links that point into the repository (no URL, no bare anchor)."""
    targets = (target.split("#", 1)[0] for target in LINK.findall(markdown))
    return [target for target in targets if target and not re.match(r"[a-z]+:", target)]


def test_relative_links_finds_only_repository_paths():
    text = "[a](ops/x.py) [b](https://example.com) [c](#guarantees) [d](bench/NOTES.md#host-path) [e](mailto:x@y)"
    assert relative_links(text) == ["ops/x.py", "bench/NOTES.md"]


@pytest.mark.parametrize("path", ["README.md", "bench/NOTES.md", "bench/RESULTS.md"])
def test_relative_links_point_at_files_that_exist(path):
    doc = ROOT / path
    missing = [target for target in relative_links(doc.read_text()) if not (doc.parent / target).exists()]
    assert not missing, f"{path} links to paths that do not exist: {missing}"
