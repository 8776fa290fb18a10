"""Labs are their solutions with the exercise regions stubbed out: in sync, and unsolved as shipped."""

from pathlib import Path

import nbformat
import pytest

from course_utils import config, labs

ROOT = config.repo_root()
SOLUTIONS = sorted((ROOT / "solutions").glob("[0-9][0-9]_*.ipynb"))
LOADS_THE_MODEL = ("load_model", "default_model_dir", "calibration_batches", "evaluation_windows")


def _loads_the_default_model(lab: Path) -> bool:
    """Whether a cell before the lab's first exercise loads the default model (or its tokenizer): the run
    then takes tens of seconds before it reaches the exercise."""
    for cell in nbformat.read(lab, as_version=4).cells:
        if cell.cell_type != "code":
            continue
        if "NotImplementedError" in cell.source:
            return False
        if any(word in cell.source for word in LOADS_THE_MODEL):
            return True
    return False


def _lab_param(solution: Path):
    slow = _loads_the_default_model(labs.lab_path(solution)) if labs.lab_path(solution).is_file() else False
    return pytest.param(solution, id=solution.name, marks=[pytest.mark.slow] if slow else [])


def test_stub_replaces_marked_region_and_keeps_the_rest():
    source = "def f(x):\n    # BEGIN SOLUTION double it\n    y = 2 * x\n    return y\n    # END SOLUTION\n\nprint('after')"
    assert labs.stub_source(source) == (
        'def f(x):\n    # TODO: double it\n    raise NotImplementedError("exercise: double it")\n\nprint(\'after\')'
    )


@pytest.mark.parametrize("source", ["# BEGIN SOLUTION\nx = 1", "x = 1\n# END SOLUTION", "# BEGIN SOLUTION\n# BEGIN SOLUTION"])
def test_unbalanced_markers_are_refused(source):
    with pytest.raises(ValueError):
        labs.stub_source(source)


def test_a_lab_that_drifts_from_its_solution_is_detected(tmp_path):
    (tmp_path / "solutions").mkdir()
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("# BEGIN SOLUTION add\nz = 1 + 1\n# END SOLUTION")
    cell.metadata["tags"] = ["exercise"]
    nb.cells = [cell, nbformat.v4.new_code_cell("assert z == 2, 'z should be 2'")]
    nbformat.write(nb, tmp_path / "solutions" / "01_x.ipynb")
    assert labs.sync(tmp_path) == [tmp_path / "labs" / "01_x.ipynb"]
    assert labs.sync(tmp_path, check=True) == []
    lab = nbformat.read(tmp_path / "labs" / "01_x.ipynb", as_version=4)
    lab.cells[1].source = "assert True"  # someone edits the lab's self-check by hand
    nbformat.write(lab, tmp_path / "labs" / "01_x.ipynb")
    assert labs.sync(tmp_path, check=True) == [tmp_path / "labs" / "01_x.ipynb"]


def test_every_solution_has_a_lab_in_sync():
    assert SOLUTIONS, "solutions/ holds no notebooks"
    assert labs.sync(ROOT, check=True) == [], "run `python -m course_utils labs` to regenerate the labs"


@pytest.mark.parametrize("solution", [_lab_param(p) for p in SOLUTIONS])
def test_lab_as_shipped_is_unsolved(solution: Path):
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    lab = nbformat.read(labs.lab_path(solution), as_version=4)
    with pytest.raises(CellExecutionError, match="NotImplementedError"):
        NotebookClient(lab, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "labs")}}).execute()
