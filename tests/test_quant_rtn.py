"""Hand-worked RTN codes and scales, packing round trips, QuantLinear and model byte accounting."""

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from course_utils import models
from course_utils.quant import packing, rtn
from course_utils.memory import bits_per_weight
from course_utils.quant.linear import QuantLinear, RTNConfig, quantize_model

pytestmark = pytest.mark.usefixtures("one_cpu_thread")  # tiny models: see conftest

W = torch.tensor([[0.5, -1.0, 0.25, 2.0]])


def test_symmetric_int4_by_hand():
    # absmax 1.75, qmax 7 -> scale 0.25 (exact); 0.5 -> 2; -1.0 -> -4; 0.3 -> 1.2 -> 1; 1.75 -> 7
    q = rtn.quantize(torch.tensor([[0.5, -1.0, 0.3, 1.75]]), bits=4, group_size=4)
    assert q.codes.tolist() == [[2, -4, 1, 7]]
    assert q.scales.item() == 0.25
    assert q.zeros is None
    assert q.dequantize().flatten().tolist() == [0.5, -1.0, 0.25, 1.75]


def test_asymmetric_int4_by_hand():
    # range [-1, 2], 15 steps -> scale 0.2; zero = round(1 / 0.2) = 5; codes round(w / 0.2) + 5
    q = rtn.quantize(W, bits=4, group_size=4, symmetric=False)
    assert q.scales.item() == pytest.approx(0.2)
    assert q.zeros.tolist() == [[5]]
    assert q.codes.tolist() == [[7, 0, 6, 15]]  # 2.5 -> 2 and 1.25 -> 1 (round half to even)
    assert q.dequantize().flatten().tolist() == pytest.approx([0.4, -1.0, 0.2, 2.0])


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [True, False])
def test_codes_stay_in_range_and_error_is_at_most_half_a_step(bits, symmetric):
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(bits))
    q = rtn.quantize(w, bits, 32, symmetric)
    lo, hi = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    assert q.codes.min() >= lo and q.codes.max() <= hi
    step = q.scales.repeat_interleave(32, dim=1)
    assert ((q.dequantize() - w).abs() <= step / 2 + 1e-6).all()


def test_error_falls_with_bits_and_with_smaller_groups():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    err = {b: (rtn.fake_quantize(w, b, 64) - w).pow(2).mean() for b in (3, 4, 8)}
    assert err[8] < err[4] < err[3]
    by_group = [(rtn.fake_quantize(w, 4, g) - w).pow(2).mean() for g in ("tensor", "channel", 128, 32)]
    assert by_group == sorted(by_group, reverse=True)


def test_one_outlier_ruins_a_per_tensor_scale_but_not_per_group():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    w[0, 0] = 100.0
    per_tensor = (rtn.fake_quantize(w, 4, "tensor") - w)[1:].pow(2).mean()
    per_group = (rtn.fake_quantize(w, 4, 32) - w)[1:].pow(2).mean()
    # per tensor the step is 100/7: nearly every other weight rounds to 0, error about var(w) = 1; groups of 32
    # have a step of about 2.2/7, error step**2/12 = 0.008 (98-108 times less over seeds 0-2); 50 leaves room
    assert per_tensor > 50 * per_group


def test_clip_search_never_worse_than_no_clipping():
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(0))
    ratio = rtn.search_clip_ratio(w, 3, 64)
    assert ratio.shape == (32, 2) and (ratio <= 1).all()
    clipped = (rtn.fake_quantize(w, 3, 64, clip_ratio=ratio) - w).pow(2).mean()
    plain = (rtn.fake_quantize(w, 3, 64) - w).pow(2).mean()
    assert clipped <= plain


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"bits": 1}, "bits must be an integer from 2 to 8"),
        ({"bits": 9}, "bits must be an integer from 2 to 8"),
        ({"group_size": 128}, "does not divide in_features=576"),
        ({"group_size": 0}, "positive int"),
    ],
)
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rtn.quantize(torch.randn(4, 576), **kwargs)


def test_nan_or_inf_weight_is_refused():
    w = torch.randn(4, 64)
    w[1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"the weight holds 1 NaN or infinite value\(s\), the first at index \(1, 3\)"):
        rtn.quantize(w)
    w[1, 3], w[2, 60], w[0, 10] = 0.0, float("inf"), float("-inf")  # the first in row-major order: (0, 10)
    with pytest.raises(ValueError, match=r"the weight holds 2 NaN or infinite value\(s\), the first at index \(0, 10\) \(-inf\)"):
        rtn.quantize(w, 4, 32, symmetric=False)


def test_quantize_model_names_the_layer_holding_a_nan_weight(tiny_llama):
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj\.weight holds 1 NaN or infinite value\(s\), the first at index \(3, 5\)"):
        quantize_model(model, RTNConfig(4, 32))


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_unpack_round_trip_and_size(bits):
    codes = torch.randint(0, 2**bits, (1001,), generator=torch.Generator().manual_seed(bits))
    packed = packing.pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packing.packed_nbytes(1001, bits) == -(-1001 * bits // 8)
    assert torch.equal(packing.unpack(packed, bits, 1001).long(), codes)


def test_two_int4_codes_share_a_byte_low_nibble_first():
    assert packing.pack(torch.tensor([3, 10]), 4).tolist() == [3 + 16 * 10]


def test_pack_rejects_codes_out_of_range():
    with pytest.raises(ValueError, match="0..15"):
        packing.pack(torch.tensor([16]), 4)


@pytest.mark.parametrize("config", [RTNConfig(4, 64), RTNConfig(3, 32, symmetric=False), RTNConfig(8, "channel"), RTNConfig(4, 64, clip=True)])
def test_quant_linear_equals_matmul_with_dequantized_weight(config):
    torch.manual_seed(0)
    linear = nn.Linear(128, 48)
    q = QuantLinear.from_linear(linear, config)
    ratio = rtn.search_clip_ratio(linear.weight, config.bits, config.group_size, config.symmetric) if config.clip else 1.0
    expected = rtn.quantize(linear.weight, config.bits, config.group_size, config.symmetric, ratio)
    assert torch.equal(q.codes(), expected.codes)
    # the layer computes with its codes and the float16 scales it stores, exactly
    g = expected.group_size
    codes = expected.codes.float() if expected.zeros is None else expected.codes.float() - expected.zeros.float().repeat_interleave(g, 1)
    weight = codes * expected.scales.half().float().repeat_interleave(g, 1)
    assert torch.equal(q.dequantized_weight(), weight)
    x = torch.randn(5, 128)
    q.engine = "dequantize"
    torch.testing.assert_close(q(x), x @ weight.T + linear.bias, rtol=1e-6, atol=1e-6)  # float32 sums in another order
    # by default a few rows go through a bf16 kernel where one fits (4 bits, or 8 bits per channel): the same
    # weight up to bf16 rounding of the input, the scales and the output (each under 2^-8 relative)
    q.engine = "auto"
    with torch.no_grad():
        exact = x @ weight.T + linear.bias
        rel = float((q(x) - exact).norm() / exact.norm())
    assert rel < (1e-2 if q._kernel[2] is not None else 1e-6), rel


def resident_bytes(out, cols, bits, groups, symmetric, bias):
    """Bytes a QuantLinear must hold, from its shape: packed codes, float16 scales, uint8 zero points
    (asymmetric), float32 bias."""
    return math.ceil(out * cols * bits / 8) + 2 * out * groups + (0 if symmetric else out * groups) + (4 * out if bias else 0)


@pytest.mark.parametrize("out,cols,config,bias", [
    (48, 128, RTNConfig(4, 64), True),
    (48, 128, RTNConfig(4, 64), False),
    (48, 128, RTNConfig(3, 32, symmetric=False), True),
    (16, 64, RTNConfig(2, 16, symmetric=False), False),
    (48, 128, RTNConfig(8, "channel"), True),
    (3, 33, RTNConfig(3, "channel"), True),  # 297 bits of codes: 38 bytes, the last one partly filled
    (48, 128, RTNConfig(4, "tensor"), False),  # one scale, stored once per row
])
def test_quant_linear_holds_exactly_its_codes_scales_zeros_and_bias(out, cols, config, bias):
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(nn.Linear(cols, out, bias=bias), config)
    groups = {"channel": 1, "tensor": 1}.get(config.group_size) or cols // config.group_size
    expected = resident_bytes(out, cols, config.bits, groups, config.symmetric, bias)
    assert models.model_bytes(layer) == expected
    assert sum(b.numel() * b.element_size() for b in layer.buffers()) == expected and not list(layer.parameters())
    assert layer.packed.numel() == math.ceil(out * cols * config.bits / 8) and layer.scales.shape == (out, groups)
    if out * cols * config.bits % 8 == 0 and config.group_size != "tensor":  # whole bytes: the theory's bits per weight
        bpw = bits_per_weight(config.bits, cols // groups, 16, 0 if config.symmetric else 8)
        assert expected == out * cols * bpw / 8 + (4 * out if bias else 0)


def test_theory_of_4bit_group_128_is_4_125_bits():
    assert bits_per_weight(4, 128) == 4.125
    assert bits_per_weight(4, 64, zero_bits=8) == 4 + 24 / 64


def test_quantize_model_bytes_match_theory_and_keep_head_float():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))
    model.lm_head = nn.Linear(64, 10)
    report = quantize_model(model, RTNConfig(4, 32))
    assert report.n_layers == 2 and isinstance(model[0], QuantLinear) and isinstance(model.lm_head, nn.Linear)
    weights_theory = (64 * 128 + 128 * 64) * (4 + 16 / 32) / 8
    float_rest = 4 * (128 + 64 + 64 * 10 + 10)  # biases and the head stay float32
    assert report.bytes_theory == int(weights_theory + float_rest)
    # codes, scales and biases, each layer from its shape; 64 x 128 x 4 bits fill whole bytes: the theory exactly
    layers = resident_bytes(128, 64, 4, 2, True, True) + resident_bytes(64, 128, 4, 4, True, True)
    assert report.bytes_after == layers + 4 * (64 * 10 + 10) == report.bytes_theory
    assert report.bytes_before == 4 * (64 * 128 + 128 + 128 * 64 + 64 + 64 * 10 + 10)


def test_report_seconds_is_the_time_spent_replacing_the_layers(monkeypatch):
    from course_utils.quant import contract

    clock = iter([100.0, 102.5])  # the clock read before and after the layers are replaced
    monkeypatch.setattr(contract, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    report = quantize_model(nn.Sequential(nn.Linear(64, 32)), RTNConfig(4, 32))
    assert report.seconds == 2.5
    assert next(clock, None) is None  # read exactly twice


def test_quantize_model_refuses_non_linear_targets():
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    with pytest.raises(ValueError, match="only Linear layers"):
        quantize_model(model, RTNConfig(), only=["1"])
    with pytest.raises(ValueError, match="no nn.Linear layers"):
        quantize_model(nn.Sequential(nn.LayerNorm(4)), RTNConfig())
    with pytest.raises(ValueError, match="single layer"):
        quantize_model(nn.Linear(4, 4), RTNConfig())


@pytest.mark.slow
def test_default_model_rtn_size_and_quality(default_model):
    from course_utils import data, evaluate

    model, tok = default_model
    qmodel = copy.deepcopy(model)
    report = quantize_model(qmodel, RTNConfig(8, "channel"))
    assert report.n_layers == 7 * model.config.num_hidden_layers
    # every replaced weight: 8 bits per code plus one float16 scale per row, no bias (Llama), from the shapes
    replaced = [m for m in model.modules() if type(m) is nn.Linear and m is not model.lm_head]
    stored = sum(m.out_features * m.in_features + 2 * m.out_features for m in replaced)
    assert report.bytes_after == report.bytes_before - sum(4 * m.weight.numel() for m in replaced) + stored
    assert report.bytes_after == report.bytes_theory  # whole bytes everywhere: the theory is exact
    windows = data.evaluation_windows(tok, max_windows=1, window=256)
    # 8-bit codes per row: each weight moves by at most absmax / 254 (absmax about 4 sigma: noise of about
    # 1e-4 of the weights' variance); the perplexity moves by about 0.4 %, 2 % would mean a broken quantizer
    assert abs(evaluate.compare(qmodel, model, windows).ppl_delta_pct) < 2.0


def test_the_full_grid_puts_the_largest_magnitude_on_the_extra_code():
    """Q4_0's rule: the value of largest magnitude, sign kept, lands on -8 exactly; the codes span -8..7 and
    the error is no larger than the balanced grid's (one more level for the same range)."""
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    full = rtn.quantize(w, 4, 32, True, full_grid=True)
    assert int(full.codes.min()) == -8 and int(full.codes.max()) <= 7
    groups = w.view(32, 2, 32)
    extreme = groups.gather(-1, groups.abs().argmax(-1, keepdim=True)).squeeze(-1)
    torch.testing.assert_close(full.scales * -8, extreme)
    assert ((full.scales < 0) == (extreme > 0)).all()
    balanced = rtn.quantize(w, 4, 32, True)
    assert (full.dequantize() - w).pow(2).sum() < (balanced.dequantize() - w).pow(2).sum()
    assert rtn.code_range(4, True, True) == (-8, 7) and rtn.code_range(4, True) == (-7, 7)
    with pytest.raises(ValueError, match="zero-point grid already uses"):
        RTNConfig(4, 32, symmetric=False, full_grid=True)


def test_a_full_grid_layer_stores_and_runs_its_codes():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    q = QuantLinear.from_linear(lin, RTNConfig(4, 32, full_grid=True))
    expected = rtn.quantize(lin.weight, 4, 32, True, full_grid=True)
    assert torch.equal(q.codes(), expected.codes)
    x = torch.randn(3, 64)
    with torch.no_grad():
        q.engine = "dequantize"
        exact = q(x)
        q.engine = "kernel"
        assert float((q(x) - exact).norm() / exact.norm()) < 1e-2
