"""The gguf and llama.cpp adapters: GGUF files (float export, summary, anatomy, rewrite, tensor names) and
llama.cpp (quantization, speed, logits), and clear errors when a library is missing."""

import builtins
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from course_utils.backends import gguf_file, llamacpp

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def f16_path(tmp_path_factory):
    """The default model exported to F16 into a fresh folder (about 5 s)."""
    return gguf_file.export_f16_gguf(dst=tmp_path_factory.mktemp("gguf") / "model.F16.gguf")


def _default_shapes():
    """The default model's tensors counted from its config: (decoder layers, weights in the Linears of the
    decoder layers, weights in the token embedding, weights in the RMSNorms). Tied embeddings: no
    output.weight, so a GGUF of it holds 7 Linears + 2 norms per layer, the embedding and the final norm."""
    import json

    from course_utils.models import default_model_dir

    cfg = json.loads((default_model_dir() / "config.json").read_text())
    assert cfg["tie_word_embeddings"]
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    linear = layers * (2 * h * h + 2 * h * kv + 3 * h * inter)  # q, o: h x h; k, v: h x kv; gate, up, down: h x inter
    return layers, linear, cfg["vocab_size"] * h, (2 * layers + 1) * h


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
    from transformers import AutoTokenizer

    from course_utils.models import default_model_dir

    layers, linear, embedding, norms = _default_shapes()
    q8 = llamacpp.quantize_gguf(f16_path, tmp_path / "model.Q8_0.gguf", "Q8_0")
    summary = gguf_file.gguf_summary(q8)
    assert summary.metadata["general.file_type"] == 7
    # every matrix (7 Linears per layer and the embedding) in Q8_0; the 1-D norms (2 per layer and the final one) stay F32
    assert summary.tensor_types == {"Q8_0": 7 * layers + 1, "F32": 2 * layers + 1}
    f16 = gguf_file.gguf_summary(f16_path)
    assert f16.n_parameters == summary.n_parameters == linear + embedding + norms
    # Q8_0: 34 bytes (32 int8 codes and an F16 scale) per block of 32 weights; F16: 2 bytes a weight; F32: 4
    assert summary.tensor_bytes == (linear + embedding) // 32 * 34 + 4 * norms
    assert f16.tensor_bytes == 2 * (linear + embedding) + 4 * norms
    # a second call reuses the cached file
    mtime = q8.stat().st_mtime_ns
    assert llamacpp.quantize_gguf(f16_path, q8, "Q8_0").stat().st_mtime_ns == mtime

    prompt = "The capital of France is"
    speed = llamacpp.decode_speed(q8, prompt, n_tokens=8, repeats=2)
    # the GGUF says tokenizer.ggml.add_bos_token = false: the prompt's tokens are the tokenizer's, no BOS added
    assert speed.prompt_tokens == len(AutoTokenizer.from_pretrained(default_model_dir())(prompt)["input_ids"]) == 5
    # what was asked: 8 steps in each of the 2 timed runs (the warm-up run is not kept); the times themselves
    # are the machine's business, and what is computed from them is tested on given times below
    assert speed.gen_tokens == 8 and len(speed.step_s) == 2 * 8
    assert speed.model_bytes == summary.tensor_bytes and speed.n_params == summary.n_parameters


def test_speed_figures_are_computed_from_the_step_times():
    speed = llamacpp.LlamaCppSpeed(
        path=None, n_threads=2, prompt_tokens=6, gen_tokens=4, prompt_s=0.012, gen_s=0.2,
        step_s=(0.05, 0.01, 0.04, 0.02, 0.03), prompt_tokens_per_s_llama=0.0, gen_tokens_per_s_llama=0.0,
        model_bytes=0, n_params=0)
    assert speed.prompt_tokens_per_s == pytest.approx(6 / 0.012) and speed.gen_tokens_per_s == pytest.approx(4 / 0.2)
    assert speed.median_step_s == 0.03
    # the q quantile is the sorted step at position round(q * (n - 1)) of 0..n-1, clipped to the ends
    ordered = (0.01, 0.02, 0.03, 0.04, 0.05)
    for q, position in [(0.0, 0), (0.1, 0), (0.3, 1), (0.5, 2), (0.75, 3), (0.9, 4), (1.0, 4), (-0.5, 0), (2.0, 4)]:
        assert speed.step_quantile_s(q) == ordered[position], q
    even = llamacpp.LlamaCppSpeed(**{**speed.__dict__, "step_s": (0.04, 0.01, 0.02, 0.03)})
    assert even.median_step_s == pytest.approx(0.025)  # between the middle two


class _FakeClock:
    """``perf_counter`` of a clock that moves only when a fake model evaluates (by the time scripted for it)."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


class _FakeLlama:
    """Stands in for ``llama_cpp.Llama``: ``eval`` takes the next scripted duration on the fake clock and
    counts like llama.cpp's perf counters (prompt tokens in the first batch, then single-token steps)."""

    n_vocab_value = 8

    def __init__(self, name, clock, durations, log):
        self.name, self.clock, self.durations, self.log = name, clock, iter(durations), log
        self.model, self.ctx = object(), self
        self.perf = None

    def tokenize(self, text, add_bos, special):
        return list(range(len(text.split())))

    def n_vocab(self):
        return self.n_vocab_value

    def reset(self):
        self.log.append(self.name)

    def eval(self, tokens):
        seconds = next(self.durations)
        self.clock.now += seconds
        if self.perf.n_p_eval == 0:
            self.perf.n_p_eval, self.perf.t_p_eval_ms = len(tokens), 1e3 * seconds
        else:
            self.perf.n_eval += len(tokens)
            self.perf.t_eval_ms += 1e3 * seconds

    def close(self):
        pass


class _FakeLib:
    """The ``llama_cpp`` functions ``_Runner`` calls, for a ``_FakeLlama``."""

    def __init__(self):
        import ctypes

        self._logits = (ctypes.c_float * _FakeLlama.n_vocab_value)(*[0, 0, 1, 0, 0, 0, 0, 0])
        self._pointer = ctypes.cast(self._logits, ctypes.POINTER(ctypes.c_float))

    def llama_get_logits_ith(self, ctx, i):
        return self._pointer

    def llama_perf_context_reset(self, ctx):
        ctx.perf = types.SimpleNamespace(n_p_eval=0, t_p_eval_ms=0.0, n_eval=0, t_eval_ms=0.0)

    def llama_perf_context(self, ctx):
        return ctx.perf

    def llama_model_size(self, model):
        return 1234

    def llama_model_n_params(self, model):
        return 567


def test_decode_speeds_time_each_step_on_a_fake_clock_and_keep_the_median_run(monkeypatch):
    clock, log, lib = _FakeClock(), [], _FakeLib()
    # per run: the prompt, then 3 steps; run 0 is the warm-up (slow on purpose: it must not count)
    runs_a = [(9.0, 9.0, 9.0, 9.0), (0.010, 0.001, 0.002, 0.003), (0.030, 0.004, 0.004, 0.004), (0.020, 0.001, 0.001, 0.001)]
    runs_b = [(8.0, 8.0, 8.0, 8.0), (0.100, 0.010, 0.010, 0.010), (0.300, 0.020, 0.020, 0.020), (0.200, 0.030, 0.030, 0.030)]
    fakes = {"a.gguf": [s for run in runs_a for s in run], "b.gguf": [s for run in runs_b for s in run]}
    monkeypatch.setattr(llamacpp, "time", clock)
    monkeypatch.setattr(llamacpp, "_import_llama_cpp", lambda: lib)
    monkeypatch.setattr(llamacpp, "_open",
                        lambda path, n_ctx, n_threads, **kw: _FakeLlama(path.name, clock, fakes[path.name], log))
    speeds = llamacpp.decode_speeds(["a.gguf", "b.gguf"], "one two three four", n_tokens=3, n_threads=2, repeats=3)
    assert log == ["a.gguf", "b.gguf"] * 4  # one warm-up, then 3 timed runs, taking turns
    a, b = speeds[Path("a.gguf")], speeds[Path("b.gguf")]
    assert (a.prompt_tokens, a.gen_tokens, a.n_threads, a.model_bytes, a.n_params) == (4, 3, 2, 1234, 567)
    assert a.step_s == pytest.approx((0.001, 0.002, 0.003, 0.004, 0.004, 0.004, 0.001, 0.001, 0.001))
    assert a.prompt_s == pytest.approx(0.020)  # median of 10, 30 and 20 ms
    assert a.gen_s == pytest.approx(0.006)  # median of the runs' totals: 6, 12 and 3 ms
    # llama.cpp's own counters come from the run with the median total: the first timed one (6 ms for 3 steps)
    assert a.gen_tokens_per_s_llama == pytest.approx(3 / 0.006) and a.prompt_tokens_per_s_llama == pytest.approx(4 / 0.010)
    assert b.prompt_s == pytest.approx(0.200) and b.gen_s == pytest.approx(0.060)  # totals 30, 60, 90 ms
    assert b.gen_tokens_per_s_llama == pytest.approx(3 / 0.060) and b.prompt_tokens_per_s_llama == pytest.approx(4 / 0.300)
    # 4 prompt tokens + 3 new ones do not fit a context of 6
    with pytest.raises(ValueError, match="exceed n_ctx=6"):
        llamacpp.decode_speeds(["a.gguf"], "one two three four", n_tokens=3, n_ctx=6)


@pytest.mark.slow
def test_summary_of_the_shipped_model():
    from course_utils.models import default_gguf_path

    layers, linear, embedding, norms = _default_shapes()
    summary = gguf_file.gguf_summary(default_gguf_path())
    assert summary.tensor_types == {"F32": 2 * layers + 1, "Q4_1": 7 * layers, "Q8_0": 1}
    assert summary.n_parameters == linear + embedding + norms
    # tied embeddings: no output.weight, so the embedding matrix is read in full every token
    assert summary.bytes_per_token == summary.tensor_bytes
    # Q4_1: 20 bytes (16 of 4-bit codes, an F16 scale and an F16 minimum) per block of 32 weights: the
    # Linears; Q8_0: 34 bytes per 32: the embedding; F32: 4 bytes: the norms
    expected = linear // 32 * 20 + embedding // 32 * 34 + 4 * norms
    assert summary.tensor_bytes == expected
    assert summary.bits_per_weight == pytest.approx(8 * expected / (linear + embedding + norms), rel=1e-15)  # 5.744


# ------------------------------------------------------------------------- anatomy, rewrite, logits


@pytest.mark.slow
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


@pytest.mark.slow
def test_truncated_files_are_named(tmp_path):
    from course_utils.models import default_gguf_path

    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(default_gguf_path().read_bytes()[:5_000_000])
    with pytest.raises(gguf_file.GGUFFormatError, match="cut.gguf"):
        gguf_file.anatomy(truncated)
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(default_gguf_path().read_bytes()[:100])
    with pytest.raises(gguf_file.GGUFFormatError, match="header.gguf"):
        gguf_file.read(header_only)


def test_foreign_and_missing_files_are_named(tmp_path):
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
    # all 7 Linears of every layer change type; llama.cpp keeps the tied embedding (also the output
    # projection) at Q8_0 for both Q4_0 and Q5_0, and the norms at F32
    layers = _default_shapes()[0]
    assert gguf_file.gguf_summary(plain).tensor_types == {"F32": 2 * layers + 1, "Q4_0": 7 * layers, "Q8_0": 1}
    assert gguf_file.gguf_summary(again).tensor_types == {"F32": 2 * layers + 1, "Q5_0": 7 * layers, "Q8_0": 1}


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
