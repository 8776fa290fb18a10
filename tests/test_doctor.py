from course_utils import doctor
from course_utils.__main__ import main


def test_every_check_has_a_known_status_and_this_machine_passes():
    checks = doctor.run_checks()
    assert {c.status for c in checks} <= {"OK", "INFO", "FAIL"}
    assert not [c for c in checks if c.status == "FAIL"], doctor.report(checks)
    names = {c.name for c in checks}
    assert {"python", "torch", "gpu", "default model", "disk", "memory"} <= names


def test_missing_required_library_is_fail_and_optional_is_info():
    assert doctor.check_library("no-such-distribution-xyz", "testing", True).status == "FAIL"
    assert doctor.check_library("no-such-distribution-xyz", "testing", False).status == "INFO"


def test_no_gpu_is_info_not_fail(monkeypatch):
    from course_utils import hardware

    monkeypatch.setattr(hardware, "gpus", lambda: [])
    check = doctor.check_torch_device()
    assert check.status == "INFO" and "CPU" in check.detail


def test_command_line_doctor_prints_report_and_exits_zero(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") >= 10 and "default model" in out


def test_gpu_paths_are_checked_only_with_a_gpu(monkeypatch):
    import llama_cpp

    from course_utils import hardware

    monkeypatch.setattr(hardware, "gpus", lambda: [])
    assert doctor.check_gpu_paths() == []
    monkeypatch.setattr(hardware, "gpus", lambda: [hardware.GPUInfo(0, "Test GPU", 24.0, (8, 9), None)])
    monkeypatch.setattr(llama_cpp, "llama_supports_gpu_offload", lambda: False)
    torch_check, llama_check = doctor.check_gpu_paths()
    assert torch_check.name == "torch CUDA"
    assert llama_check.status == "INFO" and "make gpu-setup" in llama_check.detail
