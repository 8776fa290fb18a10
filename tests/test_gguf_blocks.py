"""GGUF block formats from scratch: bit-exact against the ``gguf`` package and against llama.cpp's files."""

import numpy as np
import pytest

from course_utils.quant import gguf_blocks as gb

gguf = pytest.importorskip("gguf")
import gguf.quants  # noqa: E402

LEGACY = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
ALL = LEGACY + ["Q4_K", "Q6_K"]


def _qtype(name):
    return gguf.GGMLQuantizationType[name]


def _hard_tensor(rng):
    """Random rows plus the blocks that break careless code: all zero, one huge outlier, constant,
    exact half steps (rounding ties), tiny values, negative outlier."""
    x = rng.standard_normal((16, 512)).astype(np.float32) * 0.02
    x[0, :256] = 0.0
    x[1, 5] = 40.0
    x[2, :64] = 0.7
    x[3, :32] = np.arange(32, dtype=np.float32) * 0.5 - 8
    x[4] *= 1e-6
    x[5, 300] = -17.0
    x[6, :32] = np.linspace(-1, 1, 32, dtype=np.float32)
    return x


@pytest.mark.parametrize("fmt", LEGACY)
@pytest.mark.parametrize("scale", [1e-3, 1.0, 300.0])
def test_legacy_quantizers_are_bit_exact_on_random_tensors(fmt, scale):
    rng = np.random.default_rng(hash((fmt, scale)) % 2**32)
    x = (rng.standard_normal((32, 1024)) * scale).astype(np.float32)
    np.testing.assert_array_equal(gb.quantize(x, fmt), gguf.quants.quantize(x, _qtype(fmt)))


@pytest.mark.parametrize("fmt", LEGACY)
def test_legacy_quantizers_are_bit_exact_on_hard_blocks(fmt):
    x = _hard_tensor(np.random.default_rng(1))
    ours = gb.quantize(x, fmt)
    np.testing.assert_array_equal(ours, gguf.quants.quantize(x, _qtype(fmt)))
    back = gb.dequantize(ours, fmt)
    assert np.isfinite(back).all()
    np.testing.assert_array_equal(back[0, :256], 0.0)  # an all-zero block stays exactly zero


@pytest.mark.parametrize("fmt", ALL)
def test_dequantizers_are_bit_exact(fmt):
    x = _hard_tensor(np.random.default_rng(2))
    raw = gb.quantize(x, fmt)
    np.testing.assert_array_equal(gb.dequantize(raw, fmt), gguf.quants.dequantize(raw, _qtype(fmt)))


# The worst rounding error in a block of 32, in units of the block's largest |x|: half a step for the
# formats with a minimum (Q4_1, Q5_1: range <= 2 absmax, 15 or 31 steps: 1/15, 1/31), a whole step for the
# symmetric ones whose largest value maps to -8, -16, -32 while the other sign stops at 7, 15, 31 (Q4_0: 1/8,
# Q5_0: 1/16, Q6_K: 1/32 of its sub-blocks of 16), half a step of 127 for Q8_0 (1/254), and Q4_K as Q4_1
# plus 1/64 for its sub-scales and minima rounded to 6 bits. Every format adds 2**-10 below for its
# float16 scales and minima (each off by 2**-11 relative at most).
WORST_ERROR = {"Q8_0": 1 / 254, "Q4_0": 1 / 8, "Q5_0": 1 / 16, "Q4_1": 1 / 15, "Q5_1": 1 / 31, "Q6_K": 1 / 32, "Q4_K": 1 / 15 + 1 / 64}


@pytest.mark.parametrize("fmt", ALL)
def test_error_is_within_the_grid(fmt):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((8, 512)).astype(np.float32)
    err = np.abs(gb.dequantize(gb.quantize(x, fmt), fmt) - x).reshape(-1, 32).max(1)
    absmax = np.abs(x).reshape(-1, 32).max(1)
    assert (err <= (WORST_ERROR[fmt] + 2**-10) * absmax).all()
    # and the grid is used: the error is not far below its bound (a quantizer storing floats would pass the
    # bound alone); on Gaussian blocks the worst block reaches more than half of it
    assert (err / absmax).max() > 0.5 * WORST_ERROR[fmt]


def test_bits_per_weight():
    expected = {"Q8_0": 8.5, "Q4_0": 4.5, "Q4_1": 5.0, "Q5_0": 5.5, "Q5_1": 6.0, "Q4_K": 4.5, "Q6_K": 6.5625}
    for fmt, bits in expected.items():
        assert gb.block_format(fmt).bits_per_weight == bits
        bs, nbytes = gguf.GGML_QUANT_SIZES[_qtype(fmt)]
        assert (gb.block_format(fmt).block_size, gb.block_format(fmt).block_bytes) == (bs, nbytes)


def test_bad_input_names_the_tensor_and_the_type():
    with pytest.raises(ValueError, match="blk.0.attn_q.weight.*576.*256"):
        gb.quantize(np.zeros((2, 576), np.float32), "Q4_K", name="blk.0.attn_q.weight")
    with pytest.raises(ValueError, match="unknown block format 'Q7_0'"):
        gb.quantize(np.zeros((2, 64), np.float32), "Q7_0")
    with pytest.raises(ValueError, match="not whole Q8_0 blocks"):
        gb.dequantize(np.zeros((2, 35), np.uint8), "Q8_0")


@pytest.mark.parametrize("fmt", ALL)
@pytest.mark.parametrize("bad", [np.nan, -np.inf])
def test_nan_or_inf_is_refused_naming_the_tensor_and_the_index(fmt, bad):
    x = np.random.default_rng(4).standard_normal((4, 256)).astype(np.float32)
    x[2, 33] = bad
    x[3, 0] = np.inf  # a second one, later in row-major order
    label = "nan" if np.isnan(bad) else "-inf"
    with pytest.raises(ValueError, match=rf"tensor 'blk\.3\.ffn_down\.weight' holds 2 NaN or infinite value\(s\), the first at index \(2, 33\) \({label}\)"):
        gb.quantize(x, fmt, name="blk.3.ffn_down.weight")


@pytest.fixture(scope="module")
def shipped():
    from course_utils.models import default_gguf_path

    return default_gguf_path()


@pytest.mark.slow
def test_requantizing_the_shipped_q4_1_reproduces_it_bit_for_bit(shipped):
    from course_utils.backends import gguf_file

    for name in ("blk.0.attn_q.weight", "blk.29.ffn_down.weight"):
        type_name, raw = gguf_file.tensor_bytes(shipped, name)
        assert type_name == "Q4_1"
        np.testing.assert_array_equal(gb.quantize(gb.dequantize(raw, "Q4_1"), "Q4_1"), raw)


@pytest.mark.slow
def test_bit_exact_on_a_real_tensor(shipped):
    from course_utils.backends import gguf_file

    w = gguf_file.float_tensor(shipped, "blk.7.ffn_up.weight").astype(np.float16).astype(np.float32)
    for fmt in LEGACY:
        np.testing.assert_array_equal(gb.quantize(w, fmt), gguf.quants.quantize(w, _qtype(fmt)))


@pytest.mark.slow
def test_k_quant_dequantization_matches_tensors_llama_cpp_wrote(tmp_path):
    pytest.importorskip("llama_cpp")
    from course_utils.backends import gguf_file, llamacpp

    f16 = gguf_file.export_f16_gguf(dst=tmp_path / "m.F16.gguf")
    q4km = llamacpp.quantize_gguf(f16, tmp_path / "m.Q4_K_M.gguf", "Q4_K_M")
    reader = gguf_file.read(q4km)
    seen = set()
    for t in reader.tensors:
        name = t.tensor_type.name
        if name in ALL and name not in seen:
            raw = np.array(t.data).reshape(-1, t.data.shape[-1])
            np.testing.assert_array_equal(gb.dequantize(raw, name), gguf.quants.dequantize(raw, t.tensor_type))
            # the bytes on disk are what the format's bits per weight say
            assert 8 * int(t.n_bytes) / int(t.n_elements) == gb.block_format(name).bits_per_weight
            seen.add(name)
    assert {"Q4_K", "Q6_K"} <= seen
    # our plain Q4_K quantizer against llama.cpp's searched one, on the same tensor
    for t in reader.tensors:
        if t.tensor_type.name == "Q4_K":
            w = gguf_file.float_tensor(f16, t.name)
            theirs = gguf.quants.dequantize(np.array(t.data), t.tensor_type).reshape(w.shape)
            ours = gb.dequantize(gb.quantize(w, "Q4_K"), "Q4_K")
            rmse = lambda a: float(np.sqrt(np.mean((a - w) ** 2)))  # noqa: E731
            # llama.cpp searches each sub-block's scale and minimum, so its error is the lower; a plain min/max
            # grid of the same 4 bits stays within 1.6 times it (RTN against a searched clip: tens of percent)
            assert rmse(theirs) <= rmse(ours) < 1.6 * rmse(theirs)
            break
