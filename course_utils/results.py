"""Record a lesson's key measured figures so that ``python -m course_utils run`` can report them.

A lesson calls ``record("03", "bandwidth", 31.2, "GB/s")``. When the runner executes lessons it sets
``$COURSE_RESULTS`` to a JSON-lines file and collects the records into ``build/summary.md``; in an
interactive session or under pytest, recording is a no-op that just returns the value.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def record(lesson: str, name: str, value: float | int | str, unit: str = "") -> float | int | str:
    """Append one figure to ``$COURSE_RESULTS`` (if set) and return ``value`` unchanged."""
    path = os.environ.get("COURSE_RESULTS")
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"lesson": lesson, "name": name, "value": value, "unit": unit}) + "\n")
    return value


def load(path: str | Path) -> list[dict]:
    """All records in a results file, in the order they were written (empty if the file is missing)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
