"""MXFP4 and NVFP4 from scratch, bit for bit against llama.cpp's reference (gguf.quants) and compressed-tensors."""

import numpy as np
import pytest
import torch

from course_utils.quant import methods, microscaling as ms

pytestmark = pytest.mark.usefixtures("one_cpu_thread")  # tiny models: see conftest


def _gguf_mxfp4(w: torch.Tensor) -> np.ndarray:
    from gguf import GGMLQuantizationType, quants

    return quants.quantize(w.numpy(), GGMLQuantizationType.MXFP4).reshape(-1, 17)


def _cases() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(64, 256, generator=g) * torch.logspace(-3, 2, 64).unsqueeze(1)  # 5 decades of row sizes
    zero_block = torch.randn(4, 64, generator=g)
    zero_block[0, :32] = 0
    outlier = torch.randn(4, 64, generator=g) * 0.01
    outlier[1, 5] = 50.0
    tiny = torch.randn(4, 64, generator=g) * 1e-30
    return {"rows": rows, "zero block": zero_block, "outlier": outlier, "tiny": tiny, "zeros": torch.zeros(2, 64)}


# ------------------------------------------------------------------------------------------ E2M1


def test_e2m1_table_is_sign_then_exponent_then_mantissa():
    for code, value in enumerate(ms.E2M1_VALUES):
        sign, exponent, mantissa = code >> 3, (code >> 1) & 3, code & 1
        magnitude = mantissa * 0.5 if exponent == 0 else (1 + mantissa / 2) * 2.0 ** (exponent - 1)  # bias 1
        assert value == (-magnitude if sign else magnitude) and (np.signbit(value) == bool(sign))


@pytest.mark.parametrize("rounding, expected", [
    ("even", [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, -0.0, -1.0]),
    ("llama.cpp", [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 0.0, -0.5]),
])
def test_ties_and_saturation_by_rounding_rule(rounding, expected):
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.9, -0.1, -0.75])
    got = ms.e2m1_values(ms.e2m1_codes(ties, rounding))
    assert got.tolist() == expected
    assert torch.equal(torch.signbit(got), torch.signbit(torch.tensor(expected)))  # -0 only with "even"


def test_values_off_ties_round_to_the_nearest_level_under_both_rules():
    x = torch.linspace(-6.5, 6.5, 2601)
    x = x[~torch.isin(x.abs(), torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]))]
    levels = torch.tensor(sorted(set(abs(v) for v in ms.E2M1_VALUES)))
    nearest = levels[(x.abs().unsqueeze(1) - levels).abs().argmin(1)] * x.sign()
    for rounding in ms.ROUNDINGS:
        assert torch.equal(ms.e2m1_values(ms.e2m1_codes(x, rounding)), nearest)


# ---------------------------------------------------------------------------------------- MXFP4


def test_mxfp4_scale_puts_the_block_max_in_four_to_eight():
    amax = torch.tensor([6.0, 4.0, 7.99, 3.99, 0.3, 1e30])
    scale = ms.e8m0_scales(ms.e8m0_exponents(amax))
    assert ((amax / scale >= 4) & (amax / scale < 8)).all()
    assert ms.e8m0_exponents(torch.tensor([0.0, 1e-39])).tolist() == [0, 0]  # clamped to 2**-127
    with pytest.raises(ValueError, match="NaN"):
        ms.e8m0_scales(torch.tensor([255], dtype=torch.uint8))


@pytest.mark.parametrize("case", ["rows", "zero block", "outlier", "tiny", "zeros"])
def test_mxfp4_blocks_equal_llama_cpp_reference_byte_for_byte(case):
    from gguf import GGMLQuantizationType, quants

    w = _cases()[case]
    ref = _gguf_mxfp4(w)
    q = ms.quantize(w, "mxfp4", rounding="llama.cpp")
    assert np.array_equal(ms.to_gguf_mxfp4(q).numpy(), ref)
    assert np.array_equal(q.dequantize().numpy(), quants.dequantize(ref, GGMLQuantizationType.MXFP4).reshape(w.shape))


def test_mxfp4_even_rounding_differs_from_llama_cpp_only_on_ties_and_zero_signs():
    w = _cases()["rows"]
    even, llama = ms.quantize(w, "mxfp4", "even"), ms.quantize(w, "mxfp4", "llama.cpp")
    assert torch.equal(even.scales, llama.scales)
    differ = even.codes != llama.codes
    assert differ.any()  # random data has negative values that round to zero: -0 against +0
    scaled = (w.unflatten(-1, (-1, 32)) / even.block_scales().unsqueeze(-1)).flatten(-2)
    ties = torch.isin(scaled.abs(), torch.tensor([0.75, 1.75, 3.5]))
    assert (ties | (ms.e2m1_values(even.codes) == 0))[differ].all()


def test_mxfp4_denormal_block_is_where_the_reference_wraps_around():
    """llama.cpp's reference casts floor(log2(amax)) - 2 + 127 to a byte: for a block whose largest value
    is below 2**-125 the exponent is negative and wraps (3e-39 gives byte 253, a scale of 2**126), so every
    element becomes 0. The spec's E8M0 range stops at 2**-127, which the course uses."""
    w = torch.randn(2, 64, generator=torch.Generator().manual_seed(3))
    w[0, :32] = 3e-39 * torch.linspace(-1, 1, 32)
    with np.errstate(over="ignore"):  # the wrapped scale times 6 overflows float32 inside the reference
        ref = _gguf_mxfp4(w)
    own = ms.to_gguf_mxfp4(ms.quantize(w, "mxfp4", "llama.cpp")).numpy()
    assert ref[0, 0] == 253 and own[0, 0] == 0  # the wrapped byte against the smallest scale
    assert np.array_equal(own[1:], ref[1:])
    assert (ref[0, 1:] == 0).all() and (own[0, 1:] != 0).any()  # the spec's scale keeps a few nonzero codes


# ---------------------------------------------------------------------------------------- NVFP4


@pytest.mark.parametrize("case", ["rows", "zero block", "outlier", "tiny", "zeros"])
def test_nvfp4_equals_compressed_tensors(case):
    w = _cases()[case]
    from course_utils.backends import llmcompressor

    ref = llmcompressor.nvfp4_reference(w)
    gs, scale, fake, packed = ref["tensor_scale"], ref["block_scales"], ref["dequantized"], ref["packed"]
    q = ms.quantize(w, "nvfp4", rounding="even")
    assert torch.equal(q.tensor_scale, gs)
    assert torch.equal(q.dequantize(), fake)
    assert torch.equal(q.packed(), packed.reshape(-1))
    # Block scales: equal, except that compressed-tensors stores 0.125 (E4M3's epsilon) where a block is all
    # zeros and the course stores 0; both decode that block to zeros.
    own = q.scales.float()
    assert torch.equal(own[own != 0], scale[own != 0])
    assert (scale[own == 0] == 0.125).all()


def test_nvfp4_block_scales_use_the_fp8_range():
    w = _cases()["rows"]
    q = ms.quantize(w, "nvfp4")
    assert q.scales.dtype == torch.float8_e4m3fn and q.scales.shape == (64, 16)
    assert float(q.scales.float().max()) == 448.0  # the tensor's largest block is stretched to E4M3's largest value


# ------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_non_finite_values_are_refused(fmt, bad):
    w = torch.randn(2, 32)
    w[1, 3] = bad
    with pytest.raises(ValueError, match=r"NaN or infinite.*\(1, 3\)"):
        ms.quantize(w, fmt)


def test_bad_block_format_and_rounding_are_refused():
    with pytest.raises(ValueError, match="blocks of 32"):
        ms.quantize(torch.randn(2, 48), "mxfp4")
    with pytest.raises(ValueError, match="blocks of 16"):
        ms.quantize(torch.randn(2, 24), "nvfp4")
    with pytest.raises(ValueError, match="known: mxfp4, nvfp4"):
        ms.MicroscaleConfig(fmt="mxfp6")
    with pytest.raises(ValueError, match="rounding"):
        ms.MicroscaleConfig(rounding="up")


# ---------------------------------------------------------------------------------------- a model


@pytest.mark.parametrize("fmt, bits", [("mxfp4", 4.25), ("nvfp4", 4.5)])
def test_model_layers_compute_with_the_dequantized_weight(tiny_llama, logits_of, fmt, bits):
    model = tiny_llama()
    cfg = ms.MicroscaleConfig(fmt)
    assert cfg.bits_per_weight == bits and cfg.label() == fmt
    before = dict(model.named_modules())["model.layers.0.mlp.down_proj"].weight.detach().clone()
    qmodel, report, cached = methods.quantized_copy(model, cfg, "tiny")
    assert not cached and report.n_layers == 14 and report.ratio > 1
    layer = dict(qmodel.named_modules())["model.layers.0.mlp.down_proj"]
    assert isinstance(layer, ms.MicroscaledLinear)
    assert torch.equal(layer.dequantized_weight(), ms.quantize(before, fmt).dequantize())
    stored = layer.packed.numel() + layer.scales.numel() * layer.scales.element_size()
    assert stored * 8 == bits * before.numel()
    float_logits, q_logits = logits_of(model), logits_of(qmodel)
    assert torch.isfinite(q_logits).all() and not torch.equal(float_logits, q_logits)
    with pytest.raises(ValueError, match="already quantized"):
        ms.quantize_model(qmodel, cfg)
