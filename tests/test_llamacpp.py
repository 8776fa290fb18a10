"""The gguf and llama.cpp adapters: GGUF files (float export, summary, anatomy, rewrite, tensor names) and
llama.cpp (quantization, speed, logits), and clear errors when a library is missing."""

import builtins
import sys
import types

import numpy as np
import pytest

from course_utils.backends import gguf_file, llamacpp

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def f16_path(tmp_path_factory):
    """The default model exported to F16 into a fresh folder (about 5 s)."""
    return gguf_file.export_f16_gguf(dst=tmp_path_factory.mktemp("gguf") / "model.F16.gguf")


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

    assert gguf_file._base_stem(Path("SmolLM2-135M-Instruct.Q4_1.gguf")) == "SmolLM2-135M-Instruct"
    assert gguf_file._base_stem(Path("model.F16.gguf")) == "model"
    assert gguf_file._base_stem(Path("Llama-3.1-8B.gguf")) == "Llama-3.1-8B"


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
    summary = gguf_file.gguf_summary(q8)
    assert summary.metadata["general.file_type"] == 7
    assert summary.tensor_types["Q8_0"] >= 200 and set(summary.tensor_types) <= {"Q8_0", "F32"}
    f16 = gguf_file.gguf_summary(f16_path)
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

    summary = gguf_file.gguf_summary(default_gguf_path())
    assert summary.tensor_types == {"F32": 61, "Q4_1": 210, "Q8_0": 1}
    # tied embeddings: no output.weight, so the embedding matrix is read in full every token
    assert summary.bytes_per_token == summary.tensor_bytes
    assert 5.0 < summary.bits_per_weight < 6.5


# ------------------------------------------------------------------------- anatomy, rewrite, logits


def test_anatomy_of_the_shipped_model():
    from course_utils.models import default_gguf_path

    a = gguf_file.anatomy(default_gguf_path())
    assert a.magic == b"GGUF" and a.version == 3
    assert a.n_tensors == len(a.tensors) == 272 and a.n_kv == len(a.metadata)
    assert a.metadata["general.architecture"] == "llama" and a.metadata["llama.block_count"] == 30
    assert a.data_offset % a.alignment == 0
    assert all((t.offset - a.data_offset) % a.alignment == 0 for t in a.tensors)
    last = max(a.tensors, key=lambda t: t.offset)
    assert last.offset + last.n_bytes <= a.file_bytes
    q = a.tensor("blk.0.attn_q.weight")
    assert q.type_name == "Q4_1" and q.shape == (576, 576) and q.bits_per_weight == 5.0


def test_truncated_and_foreign_files_are_named(tmp_path):
    from course_utils.models import default_gguf_path

    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(default_gguf_path().read_bytes()[:5_000_000])
    with pytest.raises(gguf_file.GGUFFormatError, match="cut.gguf"):
        gguf_file.anatomy(truncated)
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(default_gguf_path().read_bytes()[:100])
    with pytest.raises(gguf_file.GGUFFormatError, match="header.gguf"):
        gguf_file.read(header_only)
    foreign = tmp_path / "model.safetensors"
    foreign.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(gguf_file.GGUFFormatError, match="not a GGUF file"):
        gguf_file.read(foreign)
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        gguf_file.read(tmp_path / "missing.gguf")


def test_gguf_tensor_names():
    assert gguf_file.gguf_tensor_name("model.layers.3.mlp.up_proj") == "blk.3.ffn_up.weight"
    assert gguf_file.gguf_tensor_name("model.layers.12.self_attn.o_proj") == "blk.12.attn_output.weight"
    with pytest.raises(ValueError, match="lm_head"):
        gguf_file.gguf_tensor_name("lm_head")
    with pytest.raises(ValueError, match="arch must be .* got 'nope'"):
        gguf_file.gguf_tensor_name("model.layers.3.mlp.up_proj", arch="nope")


def test_gguf_tensor_names_of_every_linear_of_the_default_model():
    """gguf's own tensor map gives llama.cpp's names for all 7 Linears of each of the 30 decoder layers."""
    short = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for layer in range(30):
        for hf, name in short.items():
            assert gguf_file.gguf_tensor_name(f"model.layers.{layer}.{hf}") == f"blk.{layer}.{name}.weight"


def test_gguf_file_does_not_import_llama_cpp_code():
    import subprocess

    code = ("import sys, course_utils.backends.gguf_file; "
            "print('course_utils.backends.llamacpp' in sys.modules, 'llama_cpp' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
    assert set(gguf_file.available()) == {"gguf"}


@pytest.mark.slow
def test_own_quantizer_writes_a_gguf_llama_cpp_runs(f16_path, tmp_path, default_model):
    pytest.importorskip("llama_cpp")
    from course_utils import data, evaluate
    from course_utils.quant import gguf_blocks

    def to_q8(name, values):
        if values.ndim == 2:
            return gguf_blocks.quantize(values, "Q8_0", name), gguf.GGMLQuantizationType.Q8_0
        return values, None

    ours = gguf_file.rewrite(f16_path, tmp_path / "own.Q8_0.gguf", to_q8, file_type=7)
    theirs = llamacpp.quantize_gguf(f16_path, tmp_path / "model.Q8_0.gguf", "Q8_0")
    # llama.cpp's quantizer and ours write the same bytes for every tensor (llama.cpp reorders them)
    theirs_by_name = {t.name: t for t in gguf_file.read(theirs).tensors}
    ours_tensors = gguf_file.read(ours).tensors
    assert {t.name for t in ours_tensors} == set(theirs_by_name)
    for a in ours_tensors:
        b = theirs_by_name[a.name]
        assert a.tensor_type == b.tensor_type, a.name
        np.testing.assert_array_equal(np.array(a.data), np.array(b.data))

    _, tokenizer = default_model
    windows = data.evaluation_windows(tokenizer, max_windows=1)
    float_ppl = evaluate.perplexity(default_model[0], windows).value
    with llamacpp.LlamaCppLogits(f16_path) as f16:
        assert evaluate.perplexity(f16, windows).value == pytest.approx(float_ppl, rel=0.005)
    with llamacpp.LlamaCppLogits(ours) as q8:
        logits = q8(windows.input_ids[:1, :8]).logits
        assert logits.shape == (1, 8, q8.llm.n_vocab())


@pytest.mark.slow
def test_importance_matrix_and_requantize_are_passed_on(f16_path, tmp_path):
    pytest.importorskip("llama_cpp")

    rng = np.random.default_rng(0)
    imatrix = {f"blk.{i}.attn_q.weight": rng.uniform(0.01, 10, 576) for i in range(30)}
    plain = llamacpp.quantize_gguf(f16_path, tmp_path / "plain.Q4_0.gguf", "Q4_0")
    weighted = llamacpp.quantize_gguf(f16_path, tmp_path / "weighted.Q4_0.gguf", "Q4_0", imatrix=imatrix)
    type_a, a = gguf_file.tensor_bytes(plain, "blk.5.attn_q.weight")
    type_b, b = gguf_file.tensor_bytes(weighted, "blk.5.attn_q.weight")
    assert type_a == type_b == "Q4_0" and a.shape == b.shape and not np.array_equal(a, b)
    # an already quantized source is refused unless allow_requantize is set
    with pytest.raises(RuntimeError, match="could not quantize"):
        llamacpp.quantize_gguf(plain, tmp_path / "again.Q5_0.gguf", "Q5_0")
    again = llamacpp.quantize_gguf(plain, tmp_path / "again.Q5_0.gguf", "Q5_0", allow_requantize=True)
    assert gguf_file.gguf_summary(again).tensor_types.get("Q5_0", 0) >= 200


def test_extra_buffer_types_are_only_probed_where_amx_is_advertised(monkeypatch):
    llamacpp.extra_buffer_types_work.cache_clear()
    monkeypatch.setattr(llamacpp, "cpu_advertises_amx", lambda: False)
    monkeypatch.setattr(llamacpp.subprocess, "run", lambda *a, **k: pytest.fail("no probe without AMX"))
    assert llamacpp.extra_buffer_types_work()
    llamacpp.extra_buffer_types_work.cache_clear()
    monkeypatch.setattr(llamacpp, "cpu_advertises_amx", lambda: True)
    monkeypatch.setattr(llamacpp.subprocess, "run", lambda *a, **k: types.SimpleNamespace(returncode=-11))  # SIGSEGV
    assert not llamacpp.extra_buffer_types_work()
    llamacpp.extra_buffer_types_work.cache_clear()


def test_without_extra_buffer_types_switches_them_off_and_back():
    llama_cpp = pytest.importorskip("llama_cpp")
    default = llama_cpp.llama_cpp.llama_model_default_params
    assert default().use_extra_bufts
    with llamacpp._without_extra_buffer_types(llama_cpp):
        assert not llama_cpp.llama_cpp.llama_model_default_params().use_extra_bufts
    assert llama_cpp.llama_cpp.llama_model_default_params is default
