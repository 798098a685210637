"""Citations of the repository's Markdown files point at files, and sections, that exist.

Code, configs and tests cite a section of the design document by its path and heading, as in
``docs/design.md "The math"``; a renamed heading or a file that was never written leaves the reader with nothing
to follow. This scans every file of the repository for names of ``.md`` files (outside URLs) and for quoted
section names right after them.
"""

from __future__ import annotations

import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
MARKDOWN = ".md"

# A Markdown file name, optionally with ../ or ./ in front and a #fragment after it.
_CITED_FILE = re.compile(r"((?:\.\.?/)*\w[\w./-]*\.md)\b(#[\w-]+)?")
# A section cited by name: the file name, an optional closing backtick, whitespace, then "Section name".
_CITED_SECTION = re.compile(r"(\w[\w./-]*\.md)`?\s+[\"“]([^\"”\n]+)[\"”]")
_URL = re.compile(r"https?://\S+")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
_FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def headings(markdown: str) -> set[str]:
    """The heading texts of a Markdown document (fenced code blocks skipped: a ``# comment`` there is no heading)."""
    return set(_HEADING.findall(_FENCE.sub("", markdown)))


def heading_slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def _resolve(name: str, citing_file: pathlib.Path, root: pathlib.Path) -> pathlib.Path | None:
    """The repository file ``name`` refers to, relative to the root or to the citing file's folder."""
    for base in (root, citing_file.parent):
        candidate = (base / name).resolve()
        if candidate.is_file() and candidate.is_relative_to(root):
            return candidate
    return None


def broken_citations(root: pathlib.Path, files: list[pathlib.Path]) -> list[str]:
    """``path:line: what is wrong`` for every cited Markdown file, section or anchor of ``files`` that ``root``
    does not hold."""
    problems = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # images and other binary files cite nothing
        for number, line in enumerate(text.splitlines(), start=1):
            line = _URL.sub("", line)
            where = f"{path.relative_to(root)}:{number}"
            for match in _CITED_FILE.finditer(line):
                name, fragment = match.group(1), match.group(2)
                target = _resolve(name, path, root)
                if target is None:
                    problems.append(f"{where}: cites {name}, which is not a file of the repository")
                elif fragment and fragment[1:] not in {heading_slug(h) for h in headings(target.read_text())}:
                    problems.append(f"{where}: cites {name}{fragment}, but {name} has no heading with that anchor")
            for match in _CITED_SECTION.finditer(line):
                name, section = match.groups()
                target = _resolve(name, path, root)
                if target is not None and section not in headings(target.read_text()):
                    problems.append(f'{where}: cites {name} "{section}", but {name} has no heading "{section}"')
    return problems


def repository_files(root: pathlib.Path) -> list[pathlib.Path]:
    """Tracked files and new files that git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=root,
                            capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip(f"not a git checkout, so the repository's files cannot be listed: {listed.stderr.strip()}")
    return [root / name for name in listed.stdout.splitlines() if (root / name).is_file()]


def test_every_cited_markdown_file_and_section_exists():
    problems = broken_citations(ROOT, repository_files(ROOT))
    assert not problems, "broken citations of the repository's Markdown files:\n" + "\n".join(problems)


def test_the_check_finds_missing_files_sections_and_anchors(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / f"guide{MARKDOWN}").write_text("# Guide\n\n## The math\n\n```\n# not a heading\n```\n")
    citing = tmp_path / "code.py"
    citing.write_text("\n".join([
        f'# docs/guide{MARKDOWN} "The math" and `docs/guide{MARKDOWN}` "The math": both exist',
        f'# docs/guide{MARKDOWN} "Lost trajectories": no such section',
        f"# PLAN{MARKDOWN}: no such file",
        f'# docs/guide{MARKDOWN} "not a heading": a comment in a code block',
        f"# [link](docs/guide{MARKDOWN}#the-math) exists, [link](docs/guide{MARKDOWN}#the-plan) does not",
        f"# https://example.org/ELSEWHERE{MARKDOWN} is a URL, not a citation",
    ]))
    problems = broken_citations(tmp_path, [citing])
    assert [problem.split(": ", 1)[0] for problem in problems] == ["code.py:2", "code.py:3", "code.py:4", "code.py:5"]
    assert "Lost trajectories" in problems[0] and f"PLAN{MARKDOWN}" in problems[1] and "#the-plan" in problems[3]
