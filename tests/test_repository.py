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


def _python_files(*dirs: str) -> list[Path]:
    return [p for d in dirs for p in sorted((REPO / d).rglob("*.py"))]


def test_analysis_uses_the_public_api_only():
    """Benchmarks measure what users run: analysis/ imports no private name of flexgen_long and reaches none through
    a module (if a benchmark needs one, the API is missing it)."""
    import ast
    hits = []
    for path in _python_files("analysis"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        ours = set()  # names bound to flexgen_long modules in this file
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("flexgen_long"):
                for alias in node.names:
                    if alias.name.startswith("_"):
                        hits.append(f"{path.relative_to(REPO)}:{node.lineno}: imports {alias.name}")
                    ours.add(alias.asname or alias.name)
            elif isinstance(node, ast.Import):
                ours |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name.startswith("flexgen_long")}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__") \
                    and isinstance(node.value, ast.Name) and node.value.id in ours:
                hits.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not hits, "\n".join(hits)


def test_only_patterns_asks_which_pattern_class_a_pattern_is():
    """A new pattern is one class: no code outside flexgen_long/patterns.py branches on the pattern classes."""
    check = re.compile(r"isinstance\([^)]*\b(Full|AttnSink|BlockSparse)\b|issubclass\([^)]*\b(Full|AttnSink|"
                       r"BlockSparse)\b")
    hits = [f"{p.relative_to(REPO)}:{i}: {line.strip()}" for p in _python_files("flexgen_long", "recipes", "analysis")
            if p.name != "patterns.py" for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
            if check.search(line)]
    assert not hits, "\n".join(hits)
