"""One call for the from-scratch quantizers, dispatched on the config, cached (course_utils.quant.methods)."""

import pytest
import torch

from course_utils.quant import awq, gptq, llm_int8, methods, nf4
from course_utils.quant.linear import QuantLinear, RTNConfig

from test_awq import CAL, logits, tiny_llama


def test_each_method_quantizes_a_copy_and_the_second_call_is_read_from_the_cache():
    model = tiny_llama()
    before = logits(model)
    for cfg in (RTNConfig(bits=4, group_size=32), gptq.GPTQConfig(bits=4, group_size=32), awq.AWQConfig(bits=4, group_size=32)):
        first, report, cached = methods.quantized_copy(model, cfg, "tiny", CAL)
        assert not cached and report.config == cfg and report.n_layers == 14
        assert report.n_tokens == (0 if cfg.method == "rtn" else CAL.numel())
        assert any(isinstance(m, QuantLinear) for m in first.modules())
        again, report2, cached2 = methods.quantized_copy(model, cfg, "tiny", CAL)
        assert cached2 and report2 == report
        assert torch.equal(logits(first), logits(again))
    assert torch.equal(logits(model), before), "the float model itself must not change"
    assert set(report2.alpha_by_group()) == set(awq.GROUP_LABELS)


def test_the_quick_methods_are_dispatched_too_and_not_cached():
    model = tiny_llama()
    for cfg, layer in ((llm_int8.Int8Config(), llm_int8.Int8Linear), (nf4.NF4Config(block_size=32), nf4.Linear4bitOwn)):
        m, report, cached = methods.quantized_copy(model, cfg, "tiny")
        assert not cached and report.n_layers == 14 and report.bytes_after < report.bytes_before
        assert sum(isinstance(x, layer) for x in m.modules()) == 14


def test_the_key_holds_the_model_name_and_the_calibration_tokens():
    model = tiny_llama()
    cfg = awq.AWQConfig(bits=4, group_size=32, clip=False)
    methods.quantized_copy(model, cfg, "tiny", CAL)
    assert not methods.quantized_copy(model, cfg, "another model", CAL)[2]
    assert not methods.quantized_copy(model, cfg, "tiny", CAL.flip(0))[2]
    # RTN needs no calibration: the key ignores it
    methods.quantized_copy(model, RTNConfig(bits=4, group_size=32), "tiny", CAL)
    assert methods.quantized_copy(model, RTNConfig(bits=4, group_size=32), "tiny")[2]


def test_bad_requests_say_what_is_wrong():
    model = tiny_llama()
    with pytest.raises(TypeError, match="no quantizer takes a dict"):
        methods.quantized_copy(model, {"bits": 4}, "tiny")
    with pytest.raises(ValueError, match="gptq needs calibration token ids"):
        methods.quantized_copy(model, gptq.GPTQConfig(), "tiny")
    with pytest.raises(ValueError, match="bits must be an integer from 2 to 8"):
        RTNConfig(bits=9)
