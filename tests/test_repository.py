"""The repository stands on its own: code and docs cite files inside it, never the project's shared notes."""

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE = ("ALGORITHMS.md", "DESIGN.md", "MORE-METHODS.md", "../shared")


def test_no_file_refers_to_documents_outside_the_repository():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    offenders = []
    for name in files:
        path = ROOT / name
        if path.suffix not in (".py", ".md", ".toml", ".txt", "") or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        offenders += [f"{name}: {word}" for word in OUTSIDE if word in text and name != "tests/test_repository.py"]
    assert offenders == []
