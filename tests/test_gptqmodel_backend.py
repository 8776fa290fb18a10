"""The GPTQModel adapter and the AutoGPTQ report (no full quantization here: minutes on a CPU)."""

import json
import os

import pytest
import torch

from course_utils.backends import autogptq
from course_utils.backends import gptqmodel as gm


def test_available_names_both_libraries_and_explains_what_is_missing():
    status = gm.available()
    assert set(status) == {"gptqmodel", "optimum"}
    for reason in status.values():
        assert reason is None or ("pip install" in reason and "--no-deps" in reason)


def test_importing_gptqmodel_leaves_the_hugging_face_cache_where_it_was():
    if gm.available()["gptqmodel"]:
        pytest.skip("GPTQModel is not installed")
    names = ("HF_HOME", "HF_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_MODULES_CACHE", "GPTQMODEL_CPU_WORKERS", "PATH")
    before = {k: os.environ.get(k) for k in names}
    gm._import()
    assert {k: os.environ.get(k) for k in before} == before
    assert gm.version() == gm.GPTQMODEL_VERSION


def test_the_worker_count_is_set_only_while_the_adapter_calls_gptqmodel(monkeypatch):
    monkeypatch.delenv("GPTQMODEL_CPU_WORKERS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    path = os.environ.get("PATH")
    with gm._gptqmodel_env():
        assert os.environ["GPTQMODEL_CPU_WORKERS"] == "2"
        os.environ["HF_HOME"] = "/tmp/set-by-a-library"
    assert "GPTQMODEL_CPU_WORKERS" not in os.environ and os.environ.get("PATH") == path
    assert os.environ.get("HF_HOME") != "/tmp/set-by-a-library"


def test_a_missing_library_raises_with_the_install_hint(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_optimum(name, *args, **kwargs):
        if name.startswith("optimum"):
            raise ImportError("No module named 'optimum'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_optimum)
    with pytest.raises(gm.BackendUnavailableError, match="optimum.*make setup"):
        gm._import_optimum()
    assert "No module named 'optimum'" in gm.available()["optimum"]


def test_calibration_accepts_token_rows_lists_and_texts_and_fingerprints_them():
    rows, fp = gm._calibration_rows(torch.arange(12).view(3, 4))
    assert len(rows) == 3 and torch.equal(rows[1]["input_ids"], torch.arange(4, 8))
    assert torch.equal(rows[0]["attention_mask"], torch.ones(4, dtype=torch.long))
    assert gm._calibration_rows([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]])[1] == fp
    assert gm._calibration_rows(torch.arange(12).view(3, 4) + 1)[1] != fp
    texts, tfp = gm._calibration_rows(["one text", "another"])
    assert texts == ["one text", "another"] and tfp.startswith("text:")
    with pytest.raises(ValueError, match="empty"):
        gm._calibration_rows([])
    with pytest.raises(ValueError, match="calibration"):
        gm.quantize(calibration=None)


def test_settings_name_the_cache_folder_and_a_matching_record_is_reused(tmp_path, monkeypatch):
    src = tmp_path / "float"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "model.safetensors").write_bytes(b"0")
    cal = torch.arange(64).view(2, 32)
    _, fp = gm._calibration_rows(cal)
    record = gm.settings_record(src, 4, 64, False, True, 0.01, fp)
    assert gm.settings_record(src, 4, 128, False, True, 0.01, fp) != record
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path / "cache"))
    out = gm.default_out_dir(record)
    assert out.name.startswith("gptqmodel-int4-g64-sym-") and out.parent.name == "gptq"
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}")
    (out / gm.CACHE_RECORD).write_text(json.dumps({"settings": record, "seconds": 123.0}))
    # a matching record: no quantization runs (it would need GPTQModel and minutes)
    monkeypatch.setattr(gm, "_import", lambda: pytest.fail("the cached checkpoint should have been reused"))
    assert gm.quantize(src, out, 4, 64, False, True, 0.01, cal) == (out, 123.0)
    assert gm.cached_record(out)["seconds"] == 123.0


def test_load_quantized_refuses_a_folder_without_config(tmp_path):
    if any(gm.available().values()):
        pytest.skip("GPTQModel or optimum is not installed")
    with pytest.raises(FileNotFoundError, match="config.json"):
        gm.load_quantized(tmp_path, "cpu")


def test_autogptq_skip_reason_is_one_clear_sentence_naming_the_successor():
    reason = autogptq.skip_reason()
    if autogptq.available()["auto_gptq"] is None:
        assert reason is None
        return
    assert isinstance(reason, str) and reason
    assert "auto-gptq" in reason and "GPTQModel" in reason and "end-of-life" in reason
    assert "not installed" in reason or "fails" in reason
    assert "Traceback" not in reason and "\n" not in reason


def test_autogptq_names_map_onto_gptqmodel():
    renames = autogptq.API_RENAMES
    assert autogptq.SUCCESSOR == "GPTQModel"
    joined = " ".join(renames)
    for old in ("AutoGPTQForCausalLM.from_pretrained", "BaseQuantizeConfig", "model.quantize", "save_quantized", "from_quantized"):
        assert old in joined
    assert any("GPTQModel.load" in v for v in renames.values())
    assert any("QuantizeConfig" in v for v in renames.values())
    assert any("model.save(" in v for v in renames.values())
    assert any("AutoModelForCausalLM" in v for v in renames.values())
