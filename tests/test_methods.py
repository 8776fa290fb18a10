"""One call for the from-scratch quantizers, cached by configuration (course_utils.quant.methods)."""

import pytest
import torch

from course_utils.quant import awq, gptq, methods
from course_utils.quant.linear import QuantLinear, RTNConfig

from test_awq import CAL, logits, tiny_llama


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path))
    return tmp_path


def test_each_method_quantizes_a_copy_and_the_second_call_is_read_from_the_cache(cache):
    model = tiny_llama()
    before = logits(model)
    for method, cfg in (("rtn", RTNConfig(bits=4, group_size=32)),
                        ("gptq", gptq.GPTQConfig(bits=4, group_size=32)),
                        ("awq", awq.AWQConfig(bits=4, group_size=32))):
        first, extra, cached = methods.quantized_copy(model, method, cfg, "tiny", CAL)
        assert not cached and extra["seconds"] >= 0
        assert any(isinstance(m, QuantLinear) for m in first.modules())
        again, extra2, cached2 = methods.quantized_copy(model, method, cfg, "tiny", CAL)
        assert cached2 and extra2["seconds"] == extra["seconds"]
        assert torch.equal(logits(first), logits(again))
    assert torch.equal(logits(model), before), "the float model itself must not change"
    report = awq.AWQReport.from_dict(extra2["report"])
    assert report.config == awq.AWQConfig(bits=4, group_size=32)
    assert set(report.alpha_by_group()) == set(awq.GROUP_LABELS)


def test_the_key_holds_the_model_name_and_the_calibration_tokens(cache):
    model = tiny_llama()
    cfg = awq.AWQConfig(bits=4, group_size=32, clip=False)
    methods.quantized_copy(model, "awq", cfg, "tiny", CAL)
    assert not methods.quantized_copy(model, "awq", cfg, "another model", CAL)[2]
    assert not methods.quantized_copy(model, "awq", cfg, "tiny", CAL.flip(0))[2]
    # RTN needs no calibration: the key ignores it
    methods.quantized_copy(model, "rtn", RTNConfig(bits=4, group_size=32), "tiny", CAL)
    assert methods.quantized_copy(model, "rtn", RTNConfig(bits=4, group_size=32), "tiny")[2]


def test_bad_requests_say_what_is_wrong(cache):
    model = tiny_llama()
    with pytest.raises(ValueError, match="unknown method 'smoothquant'"):
        methods.quantized_copy(model, "smoothquant", RTNConfig(), "tiny")
    with pytest.raises(TypeError, match="takes a AWQConfig, got RTNConfig"):
        methods.quantized_copy(model, "awq", RTNConfig(), "tiny", CAL)
    with pytest.raises(ValueError, match="needs calibration token ids"):
        methods.quantized_copy(model, "gptq", gptq.GPTQConfig(), "tiny")
