"""The llama.cpp / gguf adapter: float export, quantization, speed, and clear errors when missing."""

import builtins
import sys

import numpy as np
import pytest

from course_utils.backends import llamacpp

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def f16_path(tmp_path_factory):
    """The default model exported to F16 into a fresh folder (about 5 s)."""
    return llamacpp.export_f16_gguf(dst=tmp_path_factory.mktemp("gguf") / "model.F16.gguf")


def test_available_reports_both_libraries():
    status = llamacpp.available()
    assert set(status) == {"gguf", "llama_cpp"}


def test_missing_library_gives_an_actionable_error(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "llama_cpp" or name.startswith("llama_cpp."):
            raise ImportError("No module named 'llama_cpp'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "llama_cpp", raising=False)
    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(llamacpp.BackendUnavailableError, match="pip install llama-cpp-python"):
        llamacpp.quantize_gguf("missing.gguf", "out.gguf", "Q8_0")
    assert "llama-cpp-python" in llamacpp.available()["llama_cpp"]


def test_type_names():
    pytest.importorskip("llama_cpp")
    assert llamacpp.llama_ftype("F16") == 1
    assert llamacpp.llama_ftype("q8_0") == 7
    with pytest.raises(ValueError, match="unknown llama.cpp type"):
        llamacpp.llama_ftype("Q3_X")


def test_base_stem():
    from pathlib import Path

    assert llamacpp._base_stem(Path("SmolLM2-135M-Instruct.Q4_1.gguf")) == "SmolLM2-135M-Instruct"
    assert llamacpp._base_stem(Path("model.F16.gguf")) == "model"
    assert llamacpp._base_stem(Path("Llama-3.1-8B.gguf")) == "Llama-3.1-8B"


@pytest.mark.slow
def test_f16_export_round_trips_every_tensor(f16_path):
    from course_utils.models import default_gguf_path

    src = gguf.GGUFReader(default_gguf_path())
    out = gguf.GGUFReader(f16_path)
    assert [t.name for t in out.tensors] == [t.name for t in src.tensors]
    for a, b in zip(src.tensors, out.tensors):
        assert list(a.shape) == list(b.shape), a.name
        reference = gguf.quants.dequantize(a.data, a.tensor_type)
        exported = gguf.quants.dequantize(b.data, b.tensor_type)
        if len(a.shape) == 1:
            assert b.tensor_type == gguf.GGMLQuantizationType.F32
            np.testing.assert_array_equal(exported, reference)
        else:
            assert b.tensor_type == gguf.GGMLQuantizationType.F16
            # exactly the dequantized values rounded once to F16 ...
            np.testing.assert_array_equal(exported, reference.astype(np.float16).astype(np.float32))
            # ... which is within F16's half-step (relative 2**-11) of them
            np.testing.assert_allclose(exported, reference, rtol=2**-11, atol=2**-24)
    # every metadata key is copied; only the file type changes (3 = mostly Q4_1 -> 1 = mostly F16)
    keys = lambda r: {k for k in r.fields if not k.startswith("GGUF.")}  # noqa: E731
    assert keys(out) == keys(src)
    assert out.get_field("general.file_type").contents() == 1
    assert out.get_field("tokenizer.ggml.tokens").contents() == src.get_field("tokenizer.ggml.tokens").contents()


@pytest.mark.slow
def test_quantize_and_decode_speed(f16_path, tmp_path):
    pytest.importorskip("llama_cpp")
    q8 = llamacpp.quantize_gguf(f16_path, tmp_path / "model.Q8_0.gguf", "Q8_0")
    summary = llamacpp.gguf_summary(q8)
    assert summary.metadata["general.file_type"] == 7
    assert summary.tensor_types["Q8_0"] >= 200 and set(summary.tensor_types) <= {"Q8_0", "F32"}
    f16 = llamacpp.gguf_summary(f16_path)
    assert f16.n_parameters == summary.n_parameters
    # Q8_0: 34 bytes per 32 weights; F16: 2 bytes per weight (1-D norms stay F32 in both)
    assert summary.tensor_bytes / f16.tensor_bytes == pytest.approx(34 / 64, rel=0.02)
    # a second call reuses the cached file
    mtime = q8.stat().st_mtime_ns
    assert llamacpp.quantize_gguf(f16_path, q8, "Q8_0").stat().st_mtime_ns == mtime

    speed = llamacpp.decode_speed(q8, "The capital of France is", n_tokens=8, repeats=2)
    assert speed.prompt_tokens >= 4 and speed.gen_tokens == 8 and len(speed.step_s) == 2 * 8
    assert speed.step_quantile_s(0.0) == min(speed.step_s) <= speed.median_step_s <= speed.step_quantile_s(1.0)
    assert speed.gen_tokens_per_s > 1 and speed.prompt_tokens_per_s > 1
    assert speed.gen_tokens_per_s_llama > 1
    assert speed.model_bytes == summary.tensor_bytes and speed.n_params == summary.n_parameters


@pytest.mark.slow
def test_summary_of_the_shipped_model():
    from course_utils.models import default_gguf_path

    summary = llamacpp.gguf_summary(default_gguf_path())
    assert summary.tensor_types == {"F32": 61, "Q4_1": 210, "Q8_0": 1}
    # tied embeddings: no output.weight, so the embedding matrix is read in full every token
    assert summary.bytes_per_token == summary.tensor_bytes
    assert 5.0 < summary.bits_per_weight < 6.5
