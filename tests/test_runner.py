import json

import nbformat

from course_utils import results, runner


def _notebook(path, body: str):
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('import os\nMODEL = os.environ.get("COURSE_MODEL", "default")\nDEVICE = "auto"')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


def test_run_course_executes_injects_parameters_and_collects_results(tmp_path, monkeypatch):
    lessons = tmp_path / "lessons"
    lessons.mkdir()
    _notebook(lessons / "01_ok.ipynb", 'from course_utils import results\nresults.record("01", "answer", 42, "units")\nprint(MODEL, DEVICE)')
    _notebook(lessons / "02_fails.ipynb", "raise ValueError('deliberate')")
    monkeypatch.setattr(runner.config, "repo_root", lambda: tmp_path)
    monkeypatch.delenv("COURSE_RESULTS", raising=False)
    runs = runner.run_course(model="default", device="cpu", out_dir=tmp_path / "build")
    assert [r.name for r in runs] == ["01_ok", "02_fails"]
    assert runs[0].error is None and "deliberate" in runs[1].error
    executed = nbformat.read(tmp_path / "build" / "lessons" / "01_ok.ipynb", as_version=4)
    assert executed.cells[1].metadata["tags"] == ["injected-parameters"]
    assert "default cpu" in executed.cells[2].outputs[0]["text"]
    summary = (tmp_path / "build" / "summary.md").read_text()
    assert "| 01 | answer | 42 | units |" in summary and "FAILED" in summary
    assert results.load(tmp_path / "build" / "results.jsonl")[0]["value"] == 42


def test_record_without_results_file_is_a_no_op(monkeypatch, tmp_path):
    monkeypatch.delenv("COURSE_RESULTS", raising=False)
    assert results.record("01", "x", 1.5) == 1.5
    monkeypatch.setenv("COURSE_RESULTS", str(tmp_path / "r.jsonl"))
    results.record("01", "x", 2.5, "s")
    assert json.loads((tmp_path / "r.jsonl").read_text())["unit"] == "s"


def test_lesson_paths_filter(tmp_path):
    for name in ("01_a.ipynb", "02_b.ipynb", "notes.ipynb"):
        (tmp_path / name).write_text("{}")
    assert [p.name for p in runner.lesson_paths(tmp_path)] == ["01_a.ipynb", "02_b.ipynb"]
    assert [p.name for p in runner.lesson_paths(tmp_path, ["02"])] == ["02_b.ipynb"]
