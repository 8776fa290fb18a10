"""8-bit activations, SmoothQuant and W8A8 layers: values by hand, the real 8-bit matmuls against float."""

import copy

import pytest
import torch

from course_utils.quant import act_quant, methods, smoothquant, w8a8

pytestmark = pytest.mark.usefixtures("one_cpu_thread")  # tiny models: see conftest


# ------------------------------------------------------------------------------------ activations


def test_scales_by_granularity():
    x = torch.tensor([[1.0, -254.0], [0.5, 2.0], [0.0, 0.0]])
    assert float(act_quant.absmax_scale(x, "int8", "tensor")) == 2.0  # 254 / 127
    assert act_quant.absmax_scale(x, "int8", "token").reshape(-1).tolist() == pytest.approx([2.0, 2 / 127, 1.0])  # zero row: 1
    assert act_quant.absmax_scale(x, "fp8", "channel").tolist() == pytest.approx([1 / 448, 254 / 448])
    with pytest.raises(ValueError, match="granularity"):
        act_quant.absmax_scale(x, "int8", "group")
    with pytest.raises(ValueError, match="int8 or fp8"):
        act_quant.absmax_scale(x, "int4", "token")


def test_int8_codes_round_half_to_even_and_saturate():
    x = torch.tensor([0.5, 1.5, 2.5, -2.5, 300.0, -300.0])
    assert act_quant.quantize(x, torch.tensor(1.0), "int8").tolist() == [0, 2, 2, -2, 127, -127]


def test_fp8_codes_are_torch_e4m3_and_saturate_at_448():
    x = torch.tensor([1.0, 1.0625, 17.0, 1000.0, -1000.0])  # 1.0625 is halfway between 1 and 1.125: to even
    q = act_quant.quantize(x, torch.tensor(1.0), "fp8")
    assert q.dtype == torch.float8_e4m3fn and q.float().tolist() == [1.0, 1.0, 16.0, 448.0, -448.0]


def test_an_outlier_channel_costs_per_tensor_and_per_token_scales_not_per_channel():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=g)
    x[:, 7] *= 60  # one outlier channel, as in lesson 06
    err = {k: float((act_quant.fake_quantize(x, "int8", k) - x)[:, torch.arange(32) != 7].norm())
           for k in act_quant.GRANULARITIES}
    assert err["channel"] * 20 < err["token"] <= err["tensor"] * 1.0001  # the other channels lose their bits


def test_non_finite_activations_are_refused():
    with pytest.raises(ValueError, match="activations holds 1 NaN"):
        act_quant.quantize(torch.tensor([1.0, float("nan")]), torch.tensor(1.0))


# ------------------------------------------------------------------------------------ SmoothQuant


def test_smoothing_factor_by_hand():
    act = torch.tensor([16.0, 1.0, 4.0])
    w1 = torch.tensor([[1.0, -4.0, 0.0], [0.25, 1.0, 0.0]])
    w2 = torch.tensor([[-4.0, 1.0, 0.0]])
    s = smoothquant.smoothing_factors(act, [w1, w2], alpha=0.5)
    assert s.tolist() == [2.0, 0.5, 4.0]  # sqrt(16 / 4), sqrt(1 / 4), and a dead weight column keeps max|X|
    assert smoothquant.smoothing_factors(act, [w1, w2], alpha=1.0).tolist() == act.tolist()
    assert smoothquant.smoothing_factors(act, [w1, w2], alpha=0.0)[:2].tolist() == [0.25, 0.25]
    ranged = smoothquant.smoothing_factors(act, [w1, w2], alpha=0.5, statistic="range")
    assert torch.allclose(ranged[:2], s[:2] / 2 ** 0.5)


def test_smoothing_down_proj_through_up_proj_keeps_the_float_model(tiny_llama, tiny_calibration, logits_of):
    model = tiny_llama()
    smoothed = copy.deepcopy(model)
    record = smoothquant.smooth_model(smoothed, tiny_calibration, alpha=0.5, groups=smoothquant.GROUPS)
    assert torch.allclose(logits_of(smoothed), logits_of(model), atol=1e-4, rtol=1e-4)
    assert "model.layers.1.down" in record.outlier_ratio_after
    assert not torch.equal(smoothed.model.layers[1].mlp.up_proj.weight, model.model.layers[1].mlp.up_proj.weight)
    with pytest.raises(ValueError, match="smooths some of"):
        w8a8.W8A8Config(smooth_alpha=0.5, smooth_groups=("o",))
    assert w8a8.W8A8Config(smooth_alpha=0.5, smooth_groups=smoothquant.GROUPS).label() == "w8a8 int8 token sq0.5+qkv+gate_up+down"


@pytest.mark.parametrize("alpha", [-0.1, 1.5, True, "0.5"])
def test_alpha_outside_zero_one_is_refused(alpha):
    with pytest.raises(ValueError, match="between 0 and 1"):
        smoothquant.check_alpha(alpha)
    with pytest.raises(ValueError, match="between 0 and 1"):
        w8a8.W8A8Config(smooth_alpha=alpha)


def test_smoothing_keeps_the_float_model_and_flattens_its_inputs(tiny_llama, tiny_calibration, logits_of):
    model = tiny_llama()
    with torch.no_grad():  # give the first norm an outlier channel, as real models have
        model.model.layers[0].input_layernorm.weight[5] = 40.0
    smoothed = copy.deepcopy(model)
    record = smoothquant.smooth_model(smoothed, tiny_calibration, alpha=0.5)
    assert torch.allclose(logits_of(smoothed), logits_of(model), atol=1e-4, rtol=1e-4)
    key = "model.layers.0.qkv"
    assert record.outlier_ratio_before[key] > 10 and record.outlier_ratio_after[key] < record.outlier_ratio_before[key] / 3
    after = smoothquant.group_statistics(smoothed, tiny_calibration)[key]
    assert float(after.max() / after.median()) == pytest.approx(record.outlier_ratio_after[key], rel=1e-3)
    with pytest.raises(ValueError, match="already quantized"):
        q = copy.deepcopy(model)
        methods.quantize(q, w8a8.W8A8Config())
        smoothquant.smooth_model(q, tiny_calibration)


# ------------------------------------------------------------------------------------ W8A8 layers


@pytest.mark.parametrize("dtype", ["int8", "fp8"])
def test_real_8bit_matmul_equals_the_simulated_one(dtype):
    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(96, 40, bias=True)
    x = torch.randn(3, 5, 96, generator=g)
    real = w8a8.W8A8Linear(linear, dtype)
    assert real.engine == ("torch._int_mm" if dtype == "int8" else "torch._scaled_mm")  # torch 2.13 on a CPU has both
    sim = w8a8.W8A8Linear(linear, dtype, engine="simulated")
    with torch.no_grad():
        y_real, y_sim, y_float = real(x), sim(x), linear(x)
    assert y_real.shape == (3, 5, 40)
    assert torch.allclose(y_real, y_sim, rtol=1e-5, atol=1e-5)  # the same codes; only the float sum's order differs
    err = float((y_real - y_float).norm() / y_float.norm())
    assert 0 < err < (0.02 if dtype == "int8" else 0.08)  # measured: 0.7 % (int8) and 3.6 % (fp8, 3 mantissa bits)


def test_static_scale_saturates_what_calibration_did_not_see():
    linear = torch.nn.Linear(16, 8, bias=False)
    layer = w8a8.W8A8Linear(linear, "int8", input_scale=torch.tensor(1 / 127))  # calibrated for |x| <= 1
    x = torch.full((1, 16), 3.0)
    assert torch.allclose(layer(x), linear(torch.ones(1, 16)), rtol=0.02, atol=1e-3)


@pytest.mark.parametrize("cfg", [
    w8a8.W8A8Config("int8", "token"),
    w8a8.W8A8Config("fp8", "tensor"),
    w8a8.W8A8Config("int8", "tensor", smooth_alpha=0.5),
])
def test_a_model_in_w8a8(tiny_llama, tiny_calibration, logits_of, cfg):
    model = tiny_llama()
    qmodel, report, cached = methods.quantized_copy(model, cfg, "tiny", tiny_calibration)
    assert not cached and report.n_layers == 14 and report.engine in ("torch._int_mm", "torch._scaled_mm")
    assert (report.smoothing is not None) == (cfg.smooth_alpha is not None)
    assert report.n_tokens == (tiny_calibration.numel() if cfg.needs_calibration else 0)
    ref, out = logits_of(model), logits_of(qmodel)
    assert 0 < float((out - ref).norm() / ref.norm()) < 0.1
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    static = 4 if cfg.activations == "tensor" else 0  # one float32 input scale per layer
    saved = sum(m.weight.numel() * 3 - m.out_features * 4 - static for m in linears)  # 1 byte a weight + a scale a row
    assert report.bytes_before - report.bytes_after == saved


def test_calibration_is_required_when_the_config_reads_it(tiny_llama):
    with pytest.raises(ValueError, match="needs calibration"):
        w8a8.quantize_model(tiny_llama(), w8a8.W8A8Config("int8", "tensor"))
    assert not w8a8.W8A8Config("fp8", "token").needs_calibration
    assert w8a8.W8A8Config("fp8", "token", smooth_alpha=0.8).label() == "w8a8 fp8 token sq0.8"
