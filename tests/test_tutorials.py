"""The tutorials run as written: every code block of docs/tutorials/*.md, in order, from one fresh
folder (tutorial 3 reads the dataset tutorial 2 collects), and every ``output`` block matches.

Why a small harness of our own rather than a markdown-testing plugin: the pages mix ``bash``
commands (run as a learner types them) with ``python`` blocks that share a namespace, and what a
page quotes must be what the run prints. That is about forty lines here, with no dependency and
no plugin syntax in the pages a learner reads.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted((ROOT / "docs" / "tutorials").glob("[0-9][0-9]-*.md"))
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```$", re.M | re.S)


def blocks(page: Path) -> list[tuple[str, str]]:
    """(language, text) of every fenced block of a page, in order."""
    return [(m.group(1), m.group(2)) for m in BLOCK.finditer(page.read_text())]


def matches(expected: str, printed: str) -> bool:
    """Every expected line, in order, exactly; a ``...`` line stands for any lines."""
    pattern = "".join("(?:.*\n)*?" if line.strip() == "..." else re.escape(line.rstrip()) + "\n"
                      for line in expected.splitlines())
    lines = "".join(line.rstrip() + "\n" for line in printed.splitlines())
    return re.fullmatch(pattern, lines) is not None


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Where a learner would stand: a folder with the repository's scripts/ in it."""
    path = tmp_path_factory.mktemp("tutorials")
    (path / "scripts").symlink_to(ROOT / "scripts")
    return path


def test_the_path_is_listed_in_order():
    index = (ROOT / "docs" / "tutorials" / "README.md").read_text()
    assert PAGES and [p.name for p in PAGES] == re.findall(r"\((\d\d-[\w-]+\.md)\)", index)
    assert "docs/tutorials/README.md" in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("page", PAGES, ids=[p.stem for p in PAGES])
def test_tutorial_runs_as_written(page, folder, monkeypatch):
    monkeypatch.chdir(folder)
    namespace: dict = {}
    printed = None
    for language, text in blocks(page):
        if language == "output":
            assert printed is not None, f"{page.name}: an output block with no command before it"
            assert matches(text, printed), f"{page.name}: expected\n{text}\ngot\n{printed}"
            printed = None
        elif language == "python":
            buffer = io.StringIO()
            with contextlib.redirect_stdout(buffer):
                exec(compile(text, f"{page.name}", "exec"), namespace)  # noqa: S102
            printed = buffer.getvalue()
        elif language == "bash":
            result = subprocess.run(["bash", "-euo", "pipefail", "-c", text], cwd=folder, capture_output=True,
                                    text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            assert result.returncode == 0, f"{page.name}: {text}\n{result.stderr[-2000:]}"
            printed = result.stdout


def test_output_blocks_match_exactly_but_for_elisions():
    printed = "setup noise\nepisodes 8, steps 577\nreturn 0.715\n"
    assert matches("...\nepisodes 8, steps 577\nreturn 0.715\n", printed)
    assert not matches("...\nepisodes 8, steps 578\nreturn 0.715\n", printed)  # a number that changed
    assert not matches("episodes 8, steps 577\nreturn 0.715\n", printed)  # an unannounced extra line
    assert matches("setup noise\n...\n", printed)
