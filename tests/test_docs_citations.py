"""Docs and comments cite only files inside the repository; docs/methods.md names only real config fields."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from diffusers_ptq.config import _SECTIONS

ROOT = Path(__file__).resolve().parents[1]
SCANNED_DIRS = ("src", "tests", "benchmarks", "examples", "docs")
SCANNED_FILES = ("README.md", "BENCHMARKS.md")
SUFFIXES = {".py", ".md", ".sh", ".toml"}  # prose and code; result data files are not citations
THIS_FILE = Path(__file__).resolve()

# A cited Markdown file (`BENCHMARKS.md`, `../BENCHMARKS.md`, `docs/methods.md`) or anything under docs/.
MD_PATH = re.compile(r"(?<![\w/.-])((?:\.\./|\./)*[\w/.-]*\w\.md)\b")
DOCS_PATH = re.compile(r"(?<![\w/.-])(docs/[\w/.-]*\w)")
# Notes kept outside the repository, which a user never sees: the team's notes folder and the two note
# files in it, and this machine's work folder. The names are assembled so this file does not cite them.
_FOLDER, _METHODS, _NOTES = "sha" + "red", "METH" + "ODS", "BENCHMARK" + "-NOTES"
SHARED = re.compile(rf"(?<![\w-]){_FOLDER}/|/work/|{_NOTES}|(?<![\w/]){_METHODS}\.md")
# `section.field` (optionally `section.field=value`) at the start of a code span.
FIELD = re.compile(r"`([a-z_]+)\.([a-z_]+)\b")


def scanned_files() -> list[Path]:
    files = [ROOT / name for name in SCANNED_FILES]
    for folder in SCANNED_DIRS:
        files += [
            p
            for p in sorted((ROOT / folder).rglob("*"))
            if p.is_file() and p.suffix in SUFFIXES and "__pycache__" not in p.parts
        ]
    return [p for p in files if p.exists() and p.resolve() != THIS_FILE]


def repo_file_names() -> set[str]:
    return {p.name for p in ROOT.rglob("*") if p.is_file() and ".git" not in p.parts}


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def citation_exists(cited: str, citing: Path, names: set[str]) -> bool:
    candidates = [citing.parent / cited, ROOT / cited]
    if any(c.exists() for c in candidates):
        return True
    # A bare file name (`table.md`, `reference.md`) names an output every results folder holds.
    return "/" not in cited and cited in names


def broken_citations(files: list[Path]) -> list[str]:
    names = repo_file_names()
    broken = []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            for pattern in (MD_PATH, DOCS_PATH):
                for cited in pattern.findall(line):
                    if not citation_exists(cited, path, names):
                        broken.append(f"{_name(path)}:{number}: {cited}")
    return broken


def shared_citations(files: list[Path]) -> list[str]:
    found = []
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if SHARED.search(line):
                found.append(f"{_name(path)}:{number}: {line.strip()}")
    return found


def methods_fields(text: str) -> list[tuple[str, str]]:
    return [(section, name) for section, name in FIELD.findall(text) if section in _SECTIONS]


def unknown_fields(fields: list[tuple[str, str]]) -> list[str]:
    known = {section: {f.name for f in dataclasses.fields(cls)} for section, cls in _SECTIONS.items()}
    return sorted({f"{section}.{name}" for section, name in fields if name not in known[section]})


def test_every_cited_markdown_or_docs_path_exists():
    files = scanned_files()
    assert len(files) > 50  # the scan sees the repository
    assert broken_citations(files) == []


def test_nothing_cites_files_outside_the_repository():
    assert shared_citations(scanned_files()) == []


def test_docs_methods_names_only_real_config_fields():
    fields = methods_fields((ROOT / "docs" / "methods.md").read_text(encoding="utf-8"))
    assert len(fields) > 40  # the page does cite fields; a changed pattern would find none
    assert unknown_fields(fields) == []


@pytest.mark.parametrize(
    ("text", "broken"),
    [
        ("see `docs/nowhere.md` for details", True),
        (f"see ../{_FOLDER}/{_METHODS}.md", True),
        (f"as {_NOTES} describes", True),
        ("see docs/methods.md and BENCHMARKS.md", False),
    ],
)
def test_the_checks_fail_on_broken_citations(tmp_path, text, broken):
    # The checks themselves catch what they are for (a scan that always passed would prove nothing).
    cited = tmp_path / "module.py"
    cited.write_text(f"# {text}\n")
    found = broken_citations([cited]) + shared_citations([cited])
    assert bool(found) == broken


def test_the_field_check_fails_on_a_misspelt_field():
    fields = methods_fields(
        "`calibration.num_samples`, `reconstruction.iterations`, `calibration.num_sample`"
    )
    assert unknown_fields(fields) == ["calibration.num_sample"]
    assert methods_fields("`selection.active_eta=2.0` and `foo.bar`") == [("selection", "active_eta")]
