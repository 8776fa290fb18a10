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
    torch.manual_seed(0)
    lin = torch.nn.Linear(576, 384)
    x = torch.randn(2, 16, 576)
    x[..., 7] *= 30
    with torch.no_grad():
        ref, theirs = lin(x), bnb.linear8bit(lin, 6.0)(x)
        ours = llm_int8.Int8Linear(lin, 6.0)(x)
    rel = lambda a, b: float((a - b).norm() / b.norm())
    assert rel(ours, theirs) < 0.01
    assert rel(ours, ref) < 0.01 and rel(theirs, ref) < 0.01


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
def test_load_quantized_default_model_nf4():
    model, _ = bnb.load_quantized(bnb.BnbSetting(4, "nf4"), "default", "cpu")
    assert bnb.quantized_layer_count(model) == 7 * model.config.num_hidden_layers
    with pytest.raises(ValueError, match="already quantized"):
        llm_int8.quantize_model(model)


def test_cpu_fast_paths_reports_two_flags():
    paths = bnb.cpu_fast_paths()
    assert set(paths) == {"fused 4-bit gemv (AVX512-BF16)", "int8 matmul (AVX512)"}
    assert all(isinstance(v, bool) for v in paths.values())
