import json

import nbformat
import pytest

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
    assert results.record("01", "x", 1.5) is None  # nothing written, nothing shown at the end of a cell
    assert not list(tmp_path.rglob("*.jsonl"))
    monkeypatch.setenv("COURSE_RESULTS", str(tmp_path / "r.jsonl"))
    results.record("01", "x", 2.5, "s")
    assert json.loads((tmp_path / "r.jsonl").read_text())["unit"] == "s"


def test_lesson_paths_filter(tmp_path):
    for name in ("01_a.ipynb", "02_b.ipynb", "notes.ipynb"):
        (tmp_path / name).write_text("{}")
    assert [p.name for p in runner.lesson_paths(tmp_path)] == ["01_a.ipynb", "02_b.ipynb"]
    assert [p.name for p in runner.lesson_paths(tmp_path, ["02"])] == ["02_b.ipynb"]


def _fake_gpus(monkeypatch, *memory_gib):
    import torch

    from course_utils import hardware

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(hardware, "gpus", lambda: [hardware.GPUInfo(i, "Test GPU", m, (9, 0), None) for i, m in enumerate(memory_gib)])


def test_cuda_without_a_gpu_falls_back_to_the_cpu_and_says_why(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    device, messages = runner.plan_device("default", "cuda")
    assert device == "cpu" and "torch sees no CUDA GPU" in messages[0] and "on the CPU instead" in messages[0]
    assert runner.plan_device("default", "cpu") == ("cpu", [])


def test_a_model_too_big_for_the_gpus_is_refused_before_loading_with_what_would_fit(monkeypatch):
    from course_utils import models

    _fake_gpus(monkeypatch, 80.0)
    monkeypatch.setattr(models, "parameters_from_config", lambda name: 70e9)
    with pytest.raises(ValueError, match=r"70B parameters: about 210 GB in 16-bit .* more than the 86 GB .*stored in INT4 it would fit"):
        runner.plan_device("meta-llama/Llama-3.1-70B", "cuda")
    _fake_gpus(monkeypatch, 24.0)
    with pytest.raises(ValueError, match="even at 4 bits it would not"):
        runner.plan_device("meta-llama/Llama-3.1-70B", "cuda")
    _fake_gpus(monkeypatch, 80.0, 80.0)   # two GPUs: accelerate spreads the model over both
    with pytest.raises(ValueError, match="more than the 172 GB of the 2 visible GPU"):
        runner.plan_device("meta-llama/Llama-3.1-70B", "cuda")
    monkeypatch.setattr(models, "parameters_from_config", lambda name: 8e9)
    device, messages = runner.plan_device("meta-llama/Llama-3.1-8B", "cuda")
    assert device == "cuda" and "8B parameters, about 24.0 GB" in messages[0]


def test_an_unknown_model_offline_is_reported_not_fatal_for_the_check(monkeypatch):
    from course_utils import models

    _fake_gpus(monkeypatch, 80.0)

    def offline(name):
        raise models.ModelNotAvailableError(f"{name} is not in the Hugging Face cache and there is no network")

    monkeypatch.setattr(models, "parameters_from_config", offline)
    device, messages = runner.plan_device("someone/model", "cuda")
    assert device == "cuda" and "could not check that someone/model fits" in messages[0]


def test_parameters_are_counted_from_a_config_folder(tmp_path, tiny_llama):
    from course_utils import models

    model = tiny_llama()
    model.config.save_pretrained(tmp_path)  # the config alone: no weight file in the folder
    # embedding and lm_head 256 x 64 each (untied); per layer q, o 64 x 64, k, v 64 x 32 (2 of 4 heads of 16),
    # gate, up, down 64 x 128, and 2 norms of 64; the final norm
    expected = 2 * 256 * 64 + 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64) + 64
    assert models.parameters_from_config(str(tmp_path)) == models.count_parameters(model) == expected


@pytest.mark.slow
def test_parameters_are_counted_from_the_config_without_loading_weights(default_model):
    from course_utils import models

    assert models.parameters_from_config("default") == models.count_parameters(default_model[0])


def test_the_command_line_exits_with_a_message_when_the_model_cannot_fit(monkeypatch, capsys):
    from course_utils import __main__ as cli

    def too_big(model, device, out, only):
        raise ValueError("x has 405B parameters: ... choose a smaller model")

    monkeypatch.setattr(runner, "run_course", too_big)
    assert cli.main(["run", "--model", "x", "--device", "cuda"]) == 2
    assert "error: x has 405B parameters" in capsys.readouterr().err
