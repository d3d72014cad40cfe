"""What the bench scripts share (they run as `python bench/NAME.py`, so this imports as `common`)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path


def code_version() -> str:
    """The commit of hwsearch/ and cost_models/ the runs use, with '+changes' when they differ from it."""

    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+changes" if git("status", "--porcelain", "hwsearch", "cost_models") else "")


def write_json(path: Path, obj) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (a temporary file, then a rename): an interrupted
    bench never leaves a half-written result that a resumed run would take as finished."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)
