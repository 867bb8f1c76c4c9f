"""The repository stands on its own: no file refers to notes, helpers or issue numbers that a user of a fresh clone
does not have. Every fact the code relies on is stated where it is used, with its measurement or source."""

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Spelled with \x escapes so that this file, which is scanned too, does not name what it forbids.
FORBIDDEN = re.compile(r"s\x68ared/|\bF\x41CTS\b|\.gpu-pr\x65amble|\bd\x65vice tool\b|\bissu\x65s? #?\d+|\(issu\x65[ :]",
                       re.I)


def _tracked_text_files() -> list[Path]:
    try:
        names = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
        files = [REPO / n for n in names.splitlines()]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (an unpacked archive): every file
        files = [p for p in REPO.rglob("*") if ".venv" not in p.parts and ".git" not in p.parts]
    return [p for p in files if p.is_file() and p.suffix not in (".png", ".pt", ".safetensors")]


def test_no_file_refers_to_what_a_fresh_clone_lacks():
    hits = []
    for path in _tracked_text_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for i, line in enumerate(text.splitlines(), 1):
            if FORBIDDEN.search(line):
                hits.append(f"{path.relative_to(REPO)}:{i}: {line.strip()[:120]}")
    assert not hits, "\n".join(hits)
