"""The repository speaks of what the code does, never of how it was developed.

Every tracked text file (code, configs, docs) is searched for words that only make sense in the
history of the work: a numbered session, stop, round or issue, the note of an issue, or the
session a text was written in. A hit names its file and line.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".sh", ".cfg", ".sbatch"}
NAMES = {"Makefile"}
# Written with \s+ so that this file's own source never matches them.
PROCESS_WORDS = re.compile(
    r"\b(sessions?|stops?|rounds?)\s+#?\d+"
    r"|\bissues?[\s-]*#?\d+"
    r"|\bthis\s+session\b"
    r"|\b(earlier|previous|last)\s+session\b"
    r"|\bissue[\s-]+note\b",
    re.IGNORECASE,
)


def tracked_text_files(root: Path = ROOT) -> list[Path]:
    """The files git tracks under ``root`` that are text this check reads (present on disk)."""
    out = subprocess.run(["git", "ls-files", "-z"], cwd=root, check=True, capture_output=True).stdout
    paths = (root / name for name in out.decode().split("\0") if name)
    return [p for p in paths if (p.suffix in SUFFIXES or p.name in NAMES) and p.is_file()]


def process_word_hits(paths: list[Path], root: Path = ROOT) -> list[str]:
    """``file:line: text`` for every line of ``paths`` that speaks of the development history."""
    hits = []
    for path in paths:
        text = path.read_text(encoding="utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), start=1):
            if PROCESS_WORDS.search(line):
                name = path.relative_to(root) if path.is_relative_to(root) else path
                hits.append(f"{name}:{number}: {line.strip()}")
    return hits


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(),
                    reason="needs a git checkout")
def test_no_tracked_file_speaks_of_the_development_history():
    files = tracked_text_files()
    assert any(p.name == "README.md" for p in files)  # the listing found the repository's files
    hits = process_word_hits(files)
    assert not hits, "development history in tracked files (say what the code does instead):\n" + "\n".join(hits)


def test_the_checker_finds_an_added_process_word(tmp_path):
    bad = tmp_path / "notes.md"
    bad.write_text("A first line.\nMeasured in " + "session" + " 13, twice.\n")
    assert process_word_hits([bad], tmp_path) == ["notes.md:2: Measured in " + "session" + " 13, twice."]
    for words in ("see the issue" + "-11 note", "as in " + "this" + " session", "stop " + "4 of the plan",
                  "issue #" + "12", "in an earlier " + "session"):
        bad.write_text(words + "\n")
        assert process_word_hits([bad], tmp_path), words


def test_the_checker_leaves_ordinary_words_alone(tmp_path):
    fine = tmp_path / "fine.py"
    fine.write_text("# early stopping on val; the future share is rounded up\n"
                    "# a session of the training loop; an issue with the cache is reported\n"
                    "x = round(3.14159, 2)  # stop the run\n")
    assert process_word_hits([fine], tmp_path) == []
