"""Citations of docs/design.md sections resolve, and nothing cites a design file outside the repository."""

import re
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "design.md"
#: Where code, tests and docs live (docs/results holds generated data only).
SOURCES = ("moe_backend", "weights", "integrations", "tests", "scripts", "examples", "docs")
TOP_LEVEL = ("README.md", "CHANGELOG.md", "pyproject.toml")
#: "docs/design.md §3.5", "design.md §11.2", "(design §11.2)", "design.md §1, §3".
CITATION = re.compile(r"design(?:\.md)?((?:,? ?§\d+(?:\.\d+)?)+)")
SECTION = re.compile(r"§(\d+(?:\.\d+)?)")


def _text_files() -> Iterator[Path]:
    for name in TOP_LEVEL:
        yield ROOT / name
    for folder in SOURCES:
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix in (".py", ".md", ".toml", ".sh") and "results" not in path.parts:
                yield path


def _headings() -> set:
    """Section numbers of design.md: '## 3. Contracts' -> '3', '### 3.5 The ...' -> '3.5'."""
    found = set()
    for line in DESIGN.read_text(encoding="utf-8").splitlines():
        match = re.match(r"#{2,3} (\d+(?:\.\d+)?)\.? ", line)
        if match:
            found.add(match.group(1))
    return found


def test_design_sections_are_numbered():
    headings = _headings()
    assert {"1", "2", "3", "2.2", "3.5", "11.2"} <= headings
    tops = sorted(int(h) for h in headings if "." not in h)
    assert tops == list(range(1, len(tops) + 1)), f"top-level sections out of order: {tops}"


def _cited_sections(text: str) -> list:
    return [s for m in CITATION.finditer(text) for s in SECTION.findall(m.group(1))]


def test_citation_pattern_reads_every_form():
    assert _cited_sections("see docs/design.md §3.5 and (design §11.2); design.md §1, §3.") == ["3.5", "11.2", "1", "3"]


def test_design_citations_resolve():
    headings = _headings()
    missing = {}
    for path in _text_files():
        text = path.read_text(encoding="utf-8")
        cited = _cited_sections(text) + (SECTION.findall(text) if path == DESIGN else [])
        bad = sorted(set(cited) - headings)
        if bad:
            missing[str(path.relative_to(ROOT))] = bad
    assert not missing, f"citations of design.md sections that do not exist: {missing}"


def test_no_citation_of_a_design_file_outside_the_repository():
    outside = "DESIGN" + ".md"  # spelled in two parts so this file does not match itself
    offenders = [
        str(p.relative_to(ROOT))
        for p in _text_files()
        if outside in p.read_text(encoding="utf-8") and p.name != Path(__file__).name
    ]
    assert not offenders, f"cite docs/design.md instead of {outside}: {offenders}"
