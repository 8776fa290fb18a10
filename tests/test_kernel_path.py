"""A quantized layer runs the kernel that fits it, on its own codes, and falls back (saying why, once) where none does."""

import warnings

import pytest
import torch
from torch import nn

from course_utils.quant import kernel_path, linear


def _layer(bits=4, group_size=32, symmetric=True, out_features=64, in_features=128, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lin = nn.Linear(in_features, out_features, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_features, in_features, generator=gen) * 0.05)
        lin.bias.copy_(torch.randn(out_features, generator=gen) * 0.01)
    return linear.QuantLinear.from_linear(lin, linear.RTNConfig(bits, group_size, symmetric))


def _x(rows=1, in_features=128, seed=1):
    return torch.randn(rows, in_features, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits,group,symmetric,expected", [
    (4, 32, True, "int4"), (4, 64, False, "int4"), (4, 16, True, "dequantize"), (3, 32, True, "dequantize"),
    (8, "channel", True, "int8"), (8, 32, True, "dequantize"), (8, "channel", False, "dequantize"),
])
def test_choice_follows_the_layout(bits, group, symmetric, expected):
    choice = kernel_path.choose(_layer(bits, group, symmetric))
    assert choice.kernel == expected
    assert bool(choice.reason) == (expected == "dequantize")


def test_the_reason_names_what_does_not_fit():
    assert "groups of 16" in kernel_path.choose(_layer(4, 16)).reason
    assert "3-bit" in kernel_path.choose(_layer(3, 32)).reason
    assert "one symmetric scale per output row" in kernel_path.choose(_layer(8, 32)).reason


@pytest.mark.parametrize("bits,group,symmetric", [(4, 32, True), (4, 64, False), (8, "channel", True)])
def test_kernel_equals_the_dequantized_matmul(bits, group, symmetric):
    """The kernel multiplies by the layer's own weight: its only differences are bf16 rounding of the input,
    the scales (and zeros) and the output, each at most 2^-8 relative, so the output is within a few percent
    of a percent. One code off (code - 7 for code - 8) moves each output by about a step times sum(x): ~50 %."""
    layer = _layer(bits, group, symmetric)
    x = _x()
    layer.engine = "dequantize"
    exact = layer(x)
    layer.engine = "kernel"
    fast = layer(x)
    assert layer._kernel[1].kernel == ("int8" if bits == 8 else "int4")
    rel = float((fast - exact).norm() / exact.norm())
    assert rel < 1e-2, rel
    assert fast.dtype == x.dtype and fast.shape == exact.shape


def test_auto_uses_the_kernel_for_a_decode_row_and_dequantizes_a_prompt():
    layer = _layer()
    prompt = _x(rows=kernel_path.KERNEL_MAX_ROWS + 1)
    layer.engine = "dequantize"
    exact_prompt, exact_row = layer(prompt), layer(prompt[:1])
    layer.engine = "auto"
    assert torch.equal(layer(prompt), exact_prompt)  # float32 reference numbers for long inputs
    assert not torch.equal(layer(prompt[:1]), exact_row)  # the bf16 kernel for one row


def test_a_fallback_is_said_once_and_the_run_goes_on(monkeypatch):
    monkeypatch.setattr(kernel_path, "_SAID", set())
    layers = [_layer(4, 16, seed=s) for s in range(3)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [layer(_x()) for layer in layers for _ in range(2)]
    said = [w for w in caught if issubclass(w.category, kernel_path.KernelFallbackWarning)]
    assert len(said) == 1 and "groups of 16" in str(said[0].message)
    assert all(torch.isfinite(o).all() for o in outs)


def test_layers_packed_together_give_their_outputs_side_by_side():
    q, k = _layer(seed=0), _layer(out_features=32, seed=1)
    packed = kernel_path.pack([q, k])
    x = _x().to(kernel_path.KERNEL_DTYPE)
    together = packed(x)
    apart = torch.cat([kernel_path.pack(q)(x), kernel_path.pack(k)(x)], dim=-1)
    assert torch.equal(together, apart)
    with pytest.raises(ValueError, match="share bits, group size"):
        kernel_path.pack([q, _layer(4, 64)])


def test_model_logits_on_the_kernel_path_stay_within_bf16_rounding(tiny_llama, logits_of):
    """Whole model: the kernel path moves the logits of the int4 model by no more than twice what casting
    the float model to bfloat16 moves the float logits (the kernels compute in bf16)."""
    model = tiny_llama()
    ref = logits_of(model)
    bf16_shift = float((logits_of(model.to(torch.bfloat16)).float() - ref).norm() / ref.norm())
    model.float()
    linear.quantize_model(model, linear.RTNConfig(4, 32))
    kernel_path.set_engine(model, "dequantize")
    exact = logits_of(model)
    kernel_path.set_engine(model, "kernel")
    fast = logits_of(model)
    assert kernel_path.summary(model) == {"int4": 14, "int8": 0, "dequantize": 0, "reasons": {}}
    shift = float((fast - exact).norm() / exact.norm())
    assert 0 < shift <= 2 * bf16_shift, (shift, bf16_shift)


def test_set_engine_refuses_unknown_names(tiny_llama):
    with pytest.raises(ValueError, match="engine must be one of"):
        kernel_path.set_engine(tiny_llama(), "fast")


def test_an_act_order_gptq_layer_runs_on_the_kernel_without_a_permutation():
    """The course's act-order keeps static groups (g_idx = column // group_size): the layer's groups are contiguous,
    so the kernel takes its codes as they are and computes the weight GPTQ chose."""
    from course_utils.quant import gptq

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=gen) * 0.05
    x = torch.randn(256, 128, generator=gen) * torch.linspace(0.1, 3, 128)
    result = gptq.gptq_quantize_weight(w, x.T @ x / 256, 4, 32, act_order=True)
    assert torch.equal(result.g_idx, torch.arange(128) // 32)
    layer = linear.QuantLinear(result.quantized, None)
    assert kernel_path.choose(layer).kernel == "int4"
    row = _x()
    layer.engine = "kernel"
    fast = layer(row)
    exact = row @ result.dequantize().T
    assert float((fast - exact).norm() / exact.norm()) < 1e-2
