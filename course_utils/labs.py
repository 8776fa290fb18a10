"""Labs are generated from their solutions, mechanically, so the two cannot drift apart.

A solution notebook (``solutions/NN_*.ipynb``) marks each exercise inside a code cell tagged
``exercise``::

    def bytes_needed(n_params, bits):
        # BEGIN SOLUTION multiply the parameter count by the bits, convert to bytes
        return n_params * bits / 8
        # END SOLUTION

The lab (``labs/NN_*.ipynb``) is the same notebook, outputs cleared, with every marked region
replaced by a ``TODO`` line carrying the hint and ``raise NotImplementedError``. Everything else,
self-check cells included, is identical. ``python -m course_utils labs`` writes the labs;
``--check`` only reports labs that differ from what their solution generates.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

BEGIN = re.compile(r"^(?P<indent>\s*)# BEGIN SOLUTION\s*(?P<hint>.*)$")
END = re.compile(r"^\s*# END SOLUTION\s*$")
TAG = "exercise"


def stub_source(source: str) -> str:
    """Replace each ``# BEGIN SOLUTION hint`` ... ``# END SOLUTION`` region by a TODO and a raise."""
    out: list[str] = []
    inside = False
    for line in source.splitlines():
        begin = BEGIN.match(line)
        if begin:
            if inside:
                raise ValueError("nested '# BEGIN SOLUTION' markers")
            inside = True
            indent, hint = begin["indent"], begin["hint"].strip() or "your code here"
            out += [f"{indent}# TODO: {hint}", f'{indent}raise NotImplementedError("exercise: {hint}")']
        elif END.match(line):
            if not inside:
                raise ValueError("'# END SOLUTION' without a matching BEGIN")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise ValueError("'# BEGIN SOLUTION' without a matching END")
    return "\n".join(out)


def make_lab(solution):
    """The lab notebook for a solution notebook (an ``nbformat`` node; the input is not modified)."""
    lab = copy.deepcopy(solution)
    n_exercises = 0
    for cell in lab.cells:
        cell.metadata.pop("execution", None)  # run timestamps: a re-run solution must give the same lab
        if cell.cell_type != "code":
            continue
        cell.outputs, cell.execution_count = [], None
        if TAG in cell.metadata.get("tags", []):
            if "# BEGIN SOLUTION" not in cell.source:
                raise ValueError(f"cell tagged {TAG!r} has no '# BEGIN SOLUTION' marker:\n{cell.source[:200]}")
            cell.source = stub_source(cell.source)
            n_exercises += 1
    if n_exercises == 0:
        raise ValueError("a solution notebook needs at least one code cell tagged 'exercise'")
    return lab


def lab_path(solution: Path) -> Path:
    """Where the lab generated from ``solution`` lives: ``labs/`` beside ``solutions/``."""
    return solution.parent.parent / "labs" / solution.name


def sync(root: Path, check: bool = False) -> list[Path]:
    """Write (or, with ``check``, only compare) every lab; returns the labs that were out of date."""
    import nbformat

    stale = []
    for solution in sorted((root / "solutions").glob("[0-9][0-9]_*.ipynb")):
        lab = make_lab(nbformat.read(solution, as_version=4))
        target = lab_path(solution)
        text = nbformat.writes(lab) + "\n"
        if not target.is_file() or target.read_text() != text:
            stale.append(target)
            if not check:
                target.parent.mkdir(exist_ok=True)
                target.write_text(text)
    return stale
