"""NF4/FP4 blockwise quantization and double quantization, with values worked out by hand."""

import math

import pytest
import torch

from course_utils import memory, models
from course_utils.formats import NF4_LEVELS
from course_utils.quant import nf4, packing

pytestmark = pytest.mark.usefixtures("one_cpu_thread")  # tiny models: see conftest


def test_nf4_levels_derived_from_normal_quantiles_equal_the_table():
    derived = nf4.nf4_levels_from_normal()
    assert derived.shape == (16,)
    assert (derived - torch.tensor(NF4_LEVELS)).abs().max() < 2e-7  # float32 rounding: spacing 6e-8 to 1.2e-7 near 1
    assert derived[7] == 0 and derived[0] == -1 and derived[-1] == 1


def test_fp4_levels_are_e2m1_magnitudes_over_six_with_a_sign_bit():
    lv = nf4.levels("fp4")
    assert sorted(lv[:8].tolist()) == pytest.approx([0, 1 / 192, 1 / 6, 1.5 / 6, 2 / 6, 3 / 6, 4 / 6, 1])
    assert torch.equal(lv[8:], -lv[:8])


def test_quantize_by_hand_one_block():
    x = torch.tensor([2.0, -2.0, 0.0, 1.0])  # absmax 2: scaled 1, -1, 0, 0.5
    q = nf4.quantize_4bit(x, block_size=4)
    assert q.absmax.tolist() == [2.0]
    assert q.codes.tolist() == [15, 0, 7, 12]  # 0.5 is nearer to level 12 (0.4407) than to 13 (0.5626)
    assert q.dequantize().tolist() == pytest.approx([2.0, -2.0, 0.0, 2 * NF4_LEVELS[12]])


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_roundtrip_error_is_bounded_by_half_the_largest_gap(quant_type):
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    q = nf4.quantize_4bit(w, 64, quant_type)
    gap = nf4.levels(quant_type).sort().values.diff().max()
    err = (q.dequantize() - w).abs().view(-1, 64) / q.absmax.view(-1, 1)
    assert err.max() <= gap / 2 + 1e-6
    assert q.codes.dtype == torch.uint8 and q.codes.numel() == w.numel()


def test_zero_block_decodes_to_zero_and_packing_roundtrips():
    w = torch.zeros(2, 64)
    w[1, 3] = 1.0
    q = nf4.quantize_4bit(w, 64)
    assert q.dequantize()[0].abs().max() == 0
    assert torch.equal(packing.unpack(q.packed(), 4, w.numel()), q.codes.to(torch.int16))
    assert nf4.to_bnb_layout(torch.tensor([1, 2, 3, 4])).tolist() == [0x12, 0x34]


def test_block_size_that_does_not_divide_is_refused_with_a_hint():
    with pytest.raises(ValueError, match="does not divide"):
        nf4.quantize_4bit(torch.randn(10, 10), block_size=64)
    with pytest.raises(ValueError, match="positive integer"):
        nf4.quantize_4bit(torch.randn(64), block_size=0)
    with pytest.raises(ValueError, match="quant_type"):
        nf4.quantize_4bit(torch.randn(64), quant_type="nf3")


def test_nan_or_inf_is_refused_with_its_index(tiny_llama):
    w = torch.randn(8, 64)
    w[6, 2] = float("nan")
    for quant_type in ("nf4", "fp4"):
        with pytest.raises(ValueError, match=r"the tensor holds 1 NaN or infinite value\(s\), the first at index \(6, 2\)"):
            nf4.quantize_4bit(w, 64, quant_type)
    w[6, 2], w[7, 63] = 1.0, float("-inf")
    with pytest.raises(ValueError, match=r"the first at index \(7, 63\) \(-inf\)"):
        nf4.quantize_4bit(w, 32)
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj\.weight holds 1 NaN or infinite value\(s\), the first at index \(3, 5\)"):
        nf4.quantize_model(model, nf4.NF4Config(block_size=32))

def test_double_quantization_keeps_absmax_close_and_bits_add_up():
    torch.manual_seed(0)
    absmax = torch.rand(512) + 0.5
    dq = nf4.double_quantize(absmax, 256)
    assert dq.codes.dtype == torch.uint8 and dq.absmax2.shape == (2,)
    assert abs(dq.offset - float(absmax.mean())) < 1e-6  # the same float32 mean of values near 1
    # error at most half a step of the 8-bit grid: absmax2 / 127 / 2
    assert ((dq.dequantize() - absmax).abs() <= dq.absmax2.max() / 254 + 1e-6).all()
    assert memory.blockwise_4bit_bits(64) == 4.5
    assert memory.blockwise_4bit_bits(64, double_quant=True) == pytest.approx(4 + 8 / 64 + 32 / (64 * 256))
    assert math.isclose(memory.blockwise_4bit_bits(64, double_quant=True), 4.127, abs_tol=1e-3)


def test_linear4bit_own_matches_dequantized_weight_and_stores_half_a_byte():
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 64)
    layer = nf4.Linear4bitOwn(lin, "nf4", 64)
    assert layer.packed.numel() == 128 * 64 // 2
    # resident bytes from the shape: codes two per byte, one float32 absmax per 64 weights, the float32 bias
    assert models.model_bytes(layer) == 128 * 64 // 2 + 4 * (128 * 64 // 64) + 4 * 64
    expected = nf4.quantize_4bit(lin.weight.detach(), 64).dequantize()
    assert torch.equal(layer.dequantized_weight(), expected)
    x = torch.randn(3, 128)
    assert torch.allclose(layer(x), x @ expected.T + lin.bias, atol=1e-5)  # the same product, float32 order
    dq = nf4.Linear4bitOwn(lin, "nf4", 64, double_quant=True)
    # 8-bit absmax: each block's absmax is off by at most half a step of 1/127 of the largest deviation of
    # the absmax values from their mean (a few percent of them), 0.017 % here; the weights move by that
    # fraction of their block's absmax: 0.1 % of the largest weight allows for it, a wrong table does not
    assert (dq.dequantized_weight() - expected).abs().max() < 0.001 * lin.weight.abs().max()
    # with double quantization: uint8 absmax codes, one float32 absmax2 per 256 blocks (128 blocks: one)
    # and the float32 offset, instead of 128 float32 absmax values
    assert models.model_bytes(dq) == 128 * 64 // 2 + 128 + 4 + 4 + 4 * 64


def test_quantize_model_refuses_a_quantized_model():
    model = torch.nn.Sequential(torch.nn.Linear(64, 64))
    assert nf4.quantize_model(model).n_layers == 1
    with pytest.raises(ValueError, match="already quantized"):
        nf4.quantize_model(model)
