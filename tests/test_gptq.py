"""GPTQ from scratch: error feedback beats round-to-nearest, edge cases of the Hessian, act-order, and a
sequential run through a tiny Llama."""

import copy

import pytest
import torch
from torch import nn

from course_utils.quant.activations import InputStats
from course_utils.quant import gptq, layerwise, rtn
from course_utils.quant.linear import QuantLinear, RTNConfig, quantize_model


def correlated_inputs(n=1024, cols=256, seed=0, spread=1.0):
    """Inputs (n, cols) with correlated features whose energies vary by about exp(spread)."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.eye(cols) + 2 * torch.randn(cols, cols, generator=gen) / cols**0.5
    scale = torch.exp(spread * torch.randn(cols, generator=gen))
    return (torch.randn(n, cols, generator=gen) @ mix) * scale


def hessian_of(x):
    return 2 * x.T @ x / x.shape[0]


def output_error(w, q, x):
    """Mean over tokens of ||(W - Q) x||^2."""
    return float(((w - q) @ x.T).pow(2).sum() / x.shape[0])


W = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))


def test_hessian_running_mean_equals_one_big_batch():
    x = correlated_inputs(300, 32)
    h = InputStats(32, gram=True)
    for part in (x[:7], x[7:100], x[100:]):
        h.add(part.view(1, -1, 32))  # any leading shape: every row is a token
    assert h.n_tokens == 300
    torch.testing.assert_close(h.hessian, hessian_of(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.mean_square, x.square().mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.hessian.diagonal(), 2 * h.mean_square, rtol=1e-4, atol=1e-6)
    lin = nn.Linear(32, 8)
    h2 = InputStats(32, gram=True)
    handle = h2.attach(lin)
    lin(x[:50])
    handle.remove()
    lin(x[50:])  # not recorded any more
    torch.testing.assert_close(h2.hessian, hessian_of(x[:50]))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, 64, "channel"])
def test_gptq_beats_rtn_on_the_output_error(symmetric, group_size):
    x = correlated_inputs()
    result = gptq.gptq_quantize_weight(W, hessian_of(x), 4, group_size, symmetric)
    q_gptq = result.quantized.dequantize()
    q_rtn = rtn.fake_quantize(W, 4, group_size, symmetric)
    assert output_error(W, q_gptq, x) < 0.85 * output_error(W, q_rtn, x)
    # the reported loss is that output error: 1/2 tr(dW H dW^T) = ||dW X^T||^2 / n
    assert result.loss == pytest.approx(output_error(W, q_gptq, x), rel=1e-3)


def test_identity_hessian_gives_round_to_nearest():
    # H = I: the inverse Hessian is diagonal, so no error reaches another column and every column is
    # rounded on its own, on the grid of the untouched W: RTN, with the scales rounded to float16
    result = gptq.gptq_quantize_weight(W, torch.eye(256), 4, 64)
    q = rtn.quantize(W, 4, 64)
    scales16 = q.scales.half().float()
    by_hand = torch.round(W / scales16.repeat_interleave(64, dim=1)).clamp(-7, 7).to(torch.int16)
    assert torch.equal(result.quantized.codes, by_hand)
    assert torch.equal(result.quantized.scales, scales16)
    # float16 scales move only codes that sat on a rounding boundary
    assert (result.quantized.codes != q.codes).float().mean() < 0.002


def test_quantlinear_computes_with_exactly_the_weights_gptq_chose():
    x = correlated_inputs()
    for symmetric in (True, False):
        result = gptq.gptq_quantize_weight(W, hessian_of(x), 4, 64, symmetric, act_order=True)
        layer = QuantLinear(result.quantized, None)
        assert torch.equal(layer.dequantized_weight(), result.quantized.dequantize())
        assert torch.equal(result.dequantize(), result.quantized.dequantize())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_codes_stay_in_range(bits, symmetric):
    result = gptq.gptq_quantize_weight(W, hessian_of(correlated_inputs()), bits, 32, symmetric, act_order=bits == 3)
    codes = result.quantized.codes
    lo, hi = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    assert codes.dtype == torch.int16 and codes.min() >= lo and codes.max() <= hi
    assert torch.isfinite(result.quantized.scales).all() and (result.quantized.scales > 0).all()


def test_act_order_dequantizes_consistently_and_helps_when_column_importance_varies():
    x = correlated_inputs(spread=1.5)
    h = hessian_of(x)
    plain = gptq.gptq_quantize_weight(W, h, 4, 64)
    ordered = gptq.gptq_quantize_weight(W, h, 4, 64, act_order=True)
    assert torch.equal(ordered.perm, torch.argsort(h.diagonal(), descending=True, stable=True))
    assert torch.equal(ordered.g_idx, torch.arange(256) // 64)  # static groups: contiguous
    q = ordered.quantized
    assert torch.equal(gptq.dequantize(q.codes, q.scales, q.zeros, ordered.g_idx), q.dequantize())
    assert ordered.loss == pytest.approx(output_error(W, q.dequantize(), x), rel=1e-3)
    assert ordered.loss < plain.loss
    # g_idx-based dequantization handles a scattered grouping as well
    g_idx = torch.tensor([1, 0, 1, 0])
    codes, scales = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[10.0, 100.0]])
    assert gptq.dequantize(codes, scales, None, g_idx).tolist() == [[100.0, 20.0, 300.0, 40.0]]


def test_dead_feature_is_zeroed_with_a_warning_and_no_nan():
    x = correlated_inputs(512, 128)
    x[:, 5] = 0.0
    with pytest.warns(UserWarning, match="1 input feature"):
        result = gptq.gptq_quantize_weight(W[:, :128], hessian_of(x), 4, 32)
    assert result.dead == 1
    assert torch.isfinite(result.quantized.dequantize()).all()
    assert (result.quantized.dequantize()[:, 5] == 0).all()


def test_ill_conditioned_hessian_raises_the_damping_without_nan():
    x = correlated_inputs(512, 64)
    h = hessian_of(x)
    h -= 0.05 * h.diagonal().mean() * torch.eye(64)  # slightly indefinite: 1 % dampening is not enough
    with pytest.warns(UserWarning, match="used damp=0.1"):
        result = gptq.gptq_quantize_weight(W[:, :64], h, 4, 32)
    assert result.damp == pytest.approx(0.1)
    assert torch.isfinite(result.quantized.dequantize()).all()
    rank_two = torch.randn(64, 2) @ torch.randn(2, 64)
    with pytest.warns(UserWarning, match="damp"):  # rank 2 and no dampening at all
        result = gptq.gptq_quantize_weight(W[:, :64], rank_two @ rank_two.T, 4, 32, damp=0.0)
    assert result.damp > 0 and torch.isfinite(result.quantized.dequantize()).all()


def test_bad_arguments_are_refused():
    h = torch.eye(256)
    with pytest.raises(ValueError, match=r"does not divide in_features=256.*\[16, 32, 64, 128, 256\]"):
        gptq.gptq_quantize_weight(W, h, 4, 48)
    with pytest.raises(ValueError, match="bits"):
        gptq.gptq_quantize_weight(W, h, 9, 64)
    with pytest.raises(ValueError, match="per tensor"):
        gptq.gptq_quantize_weight(W, h, 4, "tensor")
    with pytest.raises(ValueError, match=r"\(256, 256\)"):
        gptq.gptq_quantize_weight(W, torch.eye(128), 4, 64)
    with pytest.raises(ValueError, match="not positive"):
        gptq.gptq_quantize_weight(W, -h, 4, 64)


def test_blocks_are_aligned_with_groups_and_the_block_size_does_not_change_the_result():
    assert [gptq.aligned_block_size(128, g) for g in (64, 48, 128, 576, 1536)] == [128, 96, 128, 96, 128]
    h = hessian_of(correlated_inputs())
    results = [gptq.gptq_quantize_weight(W, h, 4, 64, block_size=b) for b in (16, 64, 128, 1000)]
    losses = [r.loss for r in results]
    assert max(losses) == pytest.approx(min(losses), rel=1e-4)  # lazy batches: same algorithm, fewer passes


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).eval()


def test_linear_groups_and_captured_layer_inputs_of_a_llama():
    model = tiny_llama()
    ids = torch.randint(0, 256, (3, 16))
    inputs = layerwise.layer_inputs(model, model.model.layers[0], ids, batch_size=2)
    assert [h.shape for h, _ in inputs] == [(2, 16, 64), (1, 16, 64)]
    assert layerwise.linear_groups(model.model.layers[0], *inputs[0]) == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"],
    ]
    # running layer 0 on its captured inputs gives what the model feeds layer 1
    second = layerwise.layer_inputs(model, model.model.layers[1], ids, batch_size=2)
    with torch.no_grad():
        for (hidden, kwargs), (expected, _) in zip(inputs, second):
            torch.testing.assert_close(layerwise.run_layer(model.model.layers[0], hidden, kwargs), expected)


@pytest.mark.parametrize("true_sequential", [True, False])
def test_gptq_quantizes_a_tiny_llama_layer_by_layer(true_sequential):
    model = tiny_llama()
    reference = copy.deepcopy(model)
    calibration = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    config = gptq.GPTQConfig(4, 32, act_order=not true_sequential, true_sequential=true_sequential)
    report = gptq.quantize_model(model, config, calibration, progress=False, batch_size=3)
    layers = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert len(layers) == report.n_layers == 14 and set(layers) == set(report.losses)
    assert type(model.lm_head) is nn.Linear and report.n_tokens == 256 and report.notes == ()
    assert all(v >= 0 for v in report.losses.values()) and set(report.damp.values()) == {0.01}
    rounded = copy.deepcopy(reference)
    quantize_model(rounded, RTNConfig(4, 32))
    with torch.no_grad():
        ref, logits, logits_rtn = (m(input_ids=calibration).logits for m in (reference, model, rounded))
    assert torch.isfinite(logits).all()
    assert (logits - ref).pow(2).mean() < 0.7 * (logits_rtn - ref).pow(2).mean()  # about 0.4x here
    assert (logits_rtn - ref).pow(2).mean() < 0.1 * ref.var()
    assert config.label() == f"gptq int4 g32 sym{'' if true_sequential else ' act-order'}"
    with pytest.raises(ValueError, match="already quantized"):
        gptq.quantize_model(model, config, calibration, progress=False)


def test_model_level_checks():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"100 tokens .* fewer than the widest Linear input \(128"):
        gptq.quantize_model(model, calibration=torch.randint(0, 256, (2, 50)), progress=False)
    with pytest.raises(ValueError, match="token ids"):
        gptq.quantize_model(model, calibration=torch.randn(8, 32), progress=False)
    with pytest.raises(ValueError, match="does not divide"):
        gptq.quantize_model(model, gptq.GPTQConfig(group_size=48), torch.randint(0, 256, (8, 32)), progress=False)
    with pytest.raises(ValueError, match="model.model.layers"):
        gptq.quantize_model(nn.Sequential(nn.Linear(4, 4)), calibration=torch.randint(0, 4, (8, 32)), progress=False)
    assert all(type(m) is not QuantLinear for m in model.modules())  # refused before touching anything


@pytest.mark.slow
def test_gptq_beats_rtn_on_a_real_layer(default_model):
    from course_utils import data

    model, tokenizer = default_model
    calibration = data.calibration_batches(tokenizer, 4, 512)
    layer = model.model.layers[3]
    inputs = layerwise.layer_inputs(model, layer, calibration, batch_size=4)
    linear = layer.mlp.down_proj
    h = gptq._hessians(layer, [linear], inputs)[0]
    seen = []
    handle = linear.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        for hidden, kwargs in inputs:
            layerwise.run_layer(layer, hidden, kwargs)
    handle.remove()
    x = torch.cat(seen).reshape(-1, linear.in_features)
    torch.testing.assert_close(h.hessian, hessian_of(x), rtol=1e-3, atol=1e-3)
    result = gptq.gptq_quantize_weight(linear.weight, h.hessian, 4, 64)
    w = linear.weight.detach()
    ratio = output_error(w, result.quantized.dequantize(), x) / output_error(w, rtn.fake_quantize(w, 4, 64), x)
    assert ratio < 0.5  # about 0.26 on layer 3's down_proj


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_on_cuda_matches_cpu(act_order, symmetric):
    h = hessian_of(correlated_inputs())
    cpu = gptq.gptq_quantize_weight(W, h, 4, 64, symmetric, act_order)
    gpu = gptq.gptq_quantize_weight(W.cuda(), h.cuda(), 4, 64, symmetric, act_order)
    assert gpu.quantized.codes.is_cuda
    assert (gpu.quantized.codes.cpu() != cpu.quantized.codes).float().mean() < 0.01  # float sums differ a little
    assert gpu.loss == pytest.approx(cpu.loss, rel=0.02)


@pytest.mark.gpu
@needs_cuda
def test_gptq_quantizes_a_tiny_llama_on_cuda():
    model = tiny_llama().cuda()
    calibration = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    report = gptq.quantize_model(model, gptq.GPTQConfig(4, 32), calibration, progress=False)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == report.n_layers == 14 and all(m.packed.is_cuda for m in layers)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=calibration.cuda()).logits).all()
