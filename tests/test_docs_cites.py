"""Every section the code cites ("model-format §5.2.3", "http-api §1.4") is a numbered heading
of that document, and no comment cites the spec by an older name ("spec section 6")."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = {
    "model-format": REPO / "docs" / "spec" / "model-format.md",
    "http-api": REPO / "docs" / "spec" / "http-api.md",
}
#: Where citing code lives.
CODE_ROOTS = ("bitnetd_trio", "native", "tests", "build_native.py")
CODE_SUFFIXES = {".py", ".c", ".h"}

SECTION = "\u00a7"
#: A document's name or a section number; a bare section number belongs to the document named
#: last before it in the same file ("model-format §5.2.1 RMSNorm, §5.4.1-§5.4.2").
#: Sections of outside documents ("RFC 9110 §7.8") are theirs, not ours: not checked.
_TOKEN = re.compile(
    rf"\b({'|'.join(map(re.escape, DOCS))}|RFC ?\d+)\b|{SECTION}(\d+(?:\.\d+)*)"
)
#: Older ways of naming the spec that the numbering no longer matches.
_OLD_NAME = re.compile(rf"spec section|spec {SECTION}|spec/bitnet-gguf|shared/spec")


def headings(text: str) -> set[str]:
    """The numbers of a markdown document's numbered headings ("## 5. Forward pass" -> "5")."""
    found = re.findall(r"^#+\s+(\d+(?:\.\d+)*)\.?\s", text, re.M)
    return set(found)


def cites(text: str) -> list[tuple[int, str | None, str]]:
    """(line, document or None when none was named before it, section) for each cite."""
    out: list[tuple[int, str | None, str]] = []
    doc: str | None = None
    for lineno, line in enumerate(text.splitlines(), 1):
        for m in _TOKEN.finditer(line):
            if m.group(1):
                doc = m.group(1)
            elif doc is None or not doc.startswith("RFC"):
                out.append((lineno, doc, m.group(2)))
    return out


def bad_cites(text: str, known: dict[str, set[str]]) -> list[str]:
    """The cites of one file that do not resolve, as "line N: ..." descriptions."""
    problems = []
    for lineno, doc, section in cites(text):
        if doc is None:
            problems.append(f"line {lineno}: {SECTION}{section} names no document")
        elif section not in known[doc]:
            problems.append(f"line {lineno}: {doc} {SECTION}{section} is not a heading")
    for lineno, line in enumerate(text.splitlines(), 1):
        if _OLD_NAME.search(line):
            problems.append(f"line {lineno}: old spec name: {line.strip()}")
    return problems


def code_files() -> list[Path]:
    files = []
    for root in CODE_ROOTS:
        path = REPO / root
        if path.is_file():
            files.append(path)
        else:
            files += sorted(p for p in path.rglob("*") if p.suffix in CODE_SUFFIXES)
    return files


@pytest.fixture(scope="module")
def known() -> dict[str, set[str]]:
    return {name: headings(path.read_text()) for name, path in DOCS.items()}


def test_the_docs_have_the_numbered_sections_the_code_relies_on(known):
    assert {"1", "5.2.3", "5.4.3", "9"} <= known["model-format"]
    assert {"0", "1.4", "3.3"} <= known["http-api"]


def test_every_cite_in_the_code_names_an_existing_heading(known):
    problems = []
    files = code_files()
    assert len(files) > 20
    for path in files:
        if path == Path(__file__).resolve():
            continue
        name = str(path.relative_to(REPO))
        problems += [f"{name} {p}" for p in bad_cites(path.read_text(), known)]
    assert not problems, "\n".join(problems)


def test_sections_of_an_rfc_are_not_ours_to_check(known):
    assert bad_cites("# http-api §1.1; RFC 9110 §7.8 allows it", known) == []
    assert len(bad_cites("# RFC 9110 §7.8, then http-api §99", known)) == 1


def test_the_check_catches_a_missing_or_unnamed_section(known):
    good = f"/* model-format {SECTION}5.2.1 RMSNorm, {SECTION}5.4.1-{SECTION}5.4.2 */"
    assert bad_cites(good, known) == []
    assert bad_cites(f"# http-api {SECTION}1.4 and {SECTION}3.3", known) == []
    assert bad_cites(f"# model-format {SECTION}5.9", known) == [
        f"line 1: model-format {SECTION}5.9 is not a heading"]
    assert bad_cites(f"# http-api {SECTION}1.1, {SECTION}9", known) == [
        f"line 1: http-api {SECTION}9 is not a heading"]
    assert bad_cites(f"# see {SECTION}5.2", known) == [f"line 1: {SECTION}5.2 names no document"]
    assert len(bad_cites("# (spec section 6)", known)) == 1
