"""Record a lesson's key measured figures so that ``python -m course_utils run`` can report them; where figures go.

A lesson calls ``record("03", "bandwidth", 31.2, "GB/s")``. When the runner executes lessons it sets
``$COURSE_RESULTS`` to a JSON-lines file and collects the records into ``build/summary.md``; in an
interactive session or under pytest, recording does nothing. A lesson saves
its plots with ``fig.savefig(results.figure_path("lesson02_values.png"))``: under ``build/figures``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from course_utils import config


def record(lesson: str, name: str, value: float | int | str, unit: str = "") -> None:
    """Append one figure to ``$COURSE_RESULTS`` (if set). Returns nothing, so that a cell ending with a
    record shows no stray value."""
    path = os.environ.get("COURSE_RESULTS")
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"lesson": lesson, "name": name, "value": value, "unit": unit}) + "\n")


def load(path: str | Path) -> list[dict]:
    """All records in a results file, in the order they were written (empty if the file is missing)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def figure_path(name: str) -> Path:
    """``<course>/build/figures/<name>`` (the folder is created): where lessons save their plots."""
    folder = config.repo_root() / "build" / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name
