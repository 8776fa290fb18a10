"""The bitsandbytes adapter, and the from-scratch quantizers cross-checked against bitsandbytes on CPU."""

import pytest
import torch

from course_utils.backends import bnb
from course_utils.quant import llm_int8, nf4

needs_bnb = pytest.mark.skipif(bnb.available()["bitsandbytes"] is not None, reason="bitsandbytes is not installed")


@needs_bnb
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_own_4bit_codes_and_absmax_equal_bitsandbytes(quant_type):
    torch.manual_seed(0)
    w = torch.randn(96, 576) * 0.05
    own = nf4.quantize_4bit(w, 64, quant_type)
    packed, state = bnb.quantize_4bit(w, 64, quant_type)
    assert torch.equal(nf4.to_bnb_layout(own.codes), packed.flatten())
    assert torch.equal(own.absmax, state.absmax)
    assert torch.equal(nf4.levels(quant_type), state.code.float())


@needs_bnb
def test_double_quant_with_the_bnb_table_matches_all_but_near_ties():
    torch.manual_seed(0)
    w = torch.randn(256, 576) * 0.05
    own = nf4.quantize_4bit(w, 64)
    _, state = bnb.quantize_4bit(w, 64, "nf4", double_quant=True)
    dq = nf4.double_quantize(own.absmax, 256, state.state2.code)
    assert torch.equal(dq.absmax2, state.state2.absmax)
    assert abs(dq.offset - float(state.offset)) < 1e-6
    differ = dq.codes != state.absmax
    assert differ.float().mean() < 0.01
    assert ((dq.codes.int() - state.absmax.int()).abs() <= 1).all()  # neighbours only


@needs_bnb
def test_own_llm_int8_matches_linear8bitlt():
    """The same vector-wise int8 and outlier split as bitsandbytes, except which values set a token's scale.

    bitsandbytes casts the input and the weight to fp16 before quantizing; here both already are fp16 values,
    so that cast changes nothing and both quantize the same numbers."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(576, 384)
    with torch.no_grad():
        lin.weight.copy_(lin.weight.half().float())
        lin.bias.copy_(lin.bias.half().float())
    x = torch.randn(2, 16, 576)
    x[..., 7] *= 30  # feature 7 is an outlier feature: most of its values reach the threshold 6
    x = x.half().float()
    bnb_layer, layer = bnb.linear8bit(lin, 6.0), llm_int8.Int8Linear(lin, 6.0)
    # the same int8 weight: codes, and bitsandbytes' row absmax (SCB, until the first call moves it) / 127
    assert torch.equal(bnb_layer.weight.data, layer.weight_codes)
    assert torch.equal(bnb_layer.weight.SCB / 127, layer.weight_scale[:, 0])
    with torch.no_grad():
        ref, theirs, ours = lin(x), bnb_layer(x), layer(x)
    tokens, ours, theirs, ref = x.reshape(-1, 576), ours.reshape(-1, 384), theirs.reshape(-1, 384), ref.reshape(-1, 384)
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731

    # Both take feature 7 out and quantize the rest per token. A token's scale is its largest |value| outside
    # the outlier features (the paper's definition, ours); bitsandbytes zeroes only the values that reach the
    # threshold before taking that maximum, so a token whose feature 7 stays below 6 but above every other
    # value gets a larger scale there (coarser codes). Elsewhere the two do the same arithmetic, except that
    # bitsandbytes multiplies the int32 sums by 6.200124e-05 where 1 / 127**2 = 6.2000124e-05: 1.8e-5 too
    # large; 2^-15 (3.1e-5) leaves room for float32 roundings (2^-24 each) and none for an activation code
    # one step off (a step times a weight column: at least 4e-4 of a token's output here).
    others = torch.cat([tokens[:, :7], tokens[:, 8:]], dim=1).abs().amax(dim=1)
    below = tokens[:, 7].abs()
    larger_scale_in_bnb = (below < 6.0) & (below > others)
    assert 0 < int(larger_scale_in_bnb.sum()) < len(tokens)  # the input has tokens of both kinds
    for t in range(len(tokens)):
        if larger_scale_in_bnb[t]:
            assert rel(ours[t], theirs[t]) > 2**-10 and rel(ours[t], ref[t]) < rel(theirs[t], ref[t]), t
        else:
            assert rel(ours[t], theirs[t]) < 2**-15, t

    # against the float layer: every code is within half a step of its value (a step: the row's absmax / 127,
    # the weight's per output feature, the activation's per token over the non-outlier features), so each
    # output is off by at most sum_i |x_i| * w_step / 2 + x_step / 2 * sum_(i not outlier) |w_i|
    outlier = llm_int8.outlier_columns(tokens, 6.0)
    regular = tokens.clone()
    regular[:, outlier] = 0
    x_step = regular.abs().amax(dim=1, keepdim=True) / 127  # (tokens, 1)
    w_step = layer.weight_scale.T  # (1, out)
    w_stored = layer.weight_codes.float() * layer.weight_scale
    kept = torch.ones(576)
    kept[outlier] = 0
    worst = tokens.abs().sum(1, keepdim=True) * w_step / 2 + x_step / 2 * (w_stored.abs() @ kept)[None, :]
    assert ((ours - ref).abs() <= worst).all()
    # and the errors are what independent roundings give: uniform over a step, variance step^2 / 12, so the
    # expected squared error of an output is sum_i x_i^2 w_step^2 / 12 + x_step^2 / 12 * sum_(kept) w_i^2;
    # over 32 x 384 outputs the measured root-mean-square is within a few % of it (1.00 with this seed)
    expected = (tokens**2).sum(1, keepdim=True) * w_step**2 / 12 + x_step**2 / 12 * (w_stored**2 @ kept)[None, :]
    assert 0.9 < float((ours - ref).norm() / expected.sum().sqrt()) < 1.1


def test_available_reports_like_every_adapter():
    status = bnb.available()
    assert set(status) == {"bitsandbytes"}
    assert status["bitsandbytes"] is None or "pip install bitsandbytes" in status["bitsandbytes"]


@needs_bnb
def test_int8_layer_holds_back_the_cast_note_and_leaves_the_logger_as_it_was(caplog):
    import logging

    log = logging.getLogger("bitsandbytes.autograd._functions")
    level = log.level
    layer = bnb.linear8bit(torch.nn.Linear(64, 32), 6.0)
    with caplog.at_level(logging.WARNING, logger=log.name), torch.no_grad():
        layer(torch.randn(2, 64))
        assert not [r for r in caplog.records if "will be cast" in r.getMessage()]
        assert log.level == logging.WARNING  # as caplog set it, not left at ERROR
    assert log.level == level


def test_cuda_only_feature_on_cpu_says_what_to_use():
    with pytest.raises(bnb.BnbUnavailableError, match="on the CPU use torch.optim.AdamW"):
        bnb.require_cuda("paged optimizers", "cpu")
    with pytest.raises(ValueError, match="unknown feature"):
        bnb.require_cuda("warp drive", "cpu")


@needs_bnb
def test_bnb_setting_labels_and_configs():
    s = bnb.BnbSetting(4, "nf4", double_quant=True)
    assert s.label() == "bnb nf4 + double quant"
    assert s.to_config().bnb_4bit_use_double_quant
    with pytest.raises(ValueError, match="nf4/fp4"):
        bnb.BnbSetting(4, "int4").to_config()


@needs_bnb
@pytest.mark.slow
def test_load_quantized_default_model_nf4():
    model, _ = bnb.load_quantized(bnb.BnbSetting(4, "nf4"), "default", "cpu")
    assert bnb.quantized_layer_count(model) == 7 * model.config.num_hidden_layers
    with pytest.raises(ValueError, match="already quantized"):
        llm_int8.quantize_model(model)


@needs_bnb
@pytest.mark.parametrize("capability, bf16_helper", [("AVX512", True), ("AVX512", False), ("AVX2", True), ("DEFAULT", None)])
def test_cpu_fast_paths_follow_the_instruction_set(monkeypatch, capability, bf16_helper):
    """The int8 path is PyTorch's AVX512 capability; the 4-bit gemv is bitsandbytes' AVX512-BF16 check
    (False when this bitsandbytes has no such helper: ``None`` here)."""
    import bitsandbytes.functional

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    if bf16_helper is None:
        monkeypatch.delattr(bitsandbytes.functional, "has_avx512bf16", raising=False)
    else:
        monkeypatch.setattr(bitsandbytes.functional, "has_avx512bf16", lambda: bf16_helper)
    assert bnb.cpu_fast_paths() == {"fused 4-bit gemv (AVX512-BF16)": bool(bf16_helper),
                                    "int8 matmul (AVX512)": capability == "AVX512"}
