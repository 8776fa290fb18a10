"""One call for the from-scratch quantizers, dispatched on the config, cached (course_utils.quant.methods)."""

import copy

import pytest
import torch

from course_utils.quant import awq, gptq, llm_int8, methods, nf4
from course_utils.quant.linear import QuantLinear, RTNConfig, quantize_model

pytestmark = pytest.mark.usefixtures("one_cpu_thread")  # tiny models: see conftest


def test_each_method_quantizes_a_copy_and_the_second_call_is_read_from_the_cache(tiny_llama, tiny_calibration, logits_of):
    model = tiny_llama()
    before = logits_of(model)
    for cfg in (RTNConfig(bits=4, group_size=32), gptq.GPTQConfig(bits=4, group_size=32), awq.AWQConfig(bits=4, group_size=32)):
        first, report, cached = methods.quantized_copy(model, cfg, "tiny", tiny_calibration)
        assert not cached and report.config == cfg and report.n_layers == 14
        assert report.n_tokens == (0 if cfg.method == "rtn" else tiny_calibration.numel())
        assert sum(isinstance(m, QuantLinear) for m in first.modules()) == 14
        again, report2, cached2 = methods.quantized_copy(model, cfg, "tiny", tiny_calibration)
        assert cached2 and report2 == report
        assert torch.equal(logits_of(first), logits_of(again))
    assert torch.equal(logits_of(model), before), "the float model itself must not change"
    assert set(report2.alpha_by_group()) == set(awq.GROUP_LABELS)
    # the copy is what the method's own quantize_model makes of the model with that config
    direct = copy.deepcopy(model)
    quantize_model(direct, RTNConfig(bits=4, group_size=32))
    assert torch.equal(logits_of(methods.quantized_copy(model, RTNConfig(bits=4, group_size=32), "tiny")[0]), logits_of(direct))


def test_the_quick_methods_are_dispatched_too_and_not_cached(tiny_llama):
    model = tiny_llama()
    shapes = [lin.weight.shape for name, lin in model.named_modules() if type(lin) is torch.nn.Linear and name != "lm_head"]
    float_bytes = sum(4 * o * i for o, i in shapes)  # float32 weights, no biases in this Llama
    # what each layer stores instead: int8 codes + one float32 scale per row; 4-bit codes two per byte +
    # one float32 absmax per block of 32 weights
    stored = {"llm_int8": sum(o * i + 4 * o for o, i in shapes), "nf4": sum(o * i // 2 + 4 * (o * i // 32) for o, i in shapes)}
    for cfg, layer in ((llm_int8.Int8Config(), llm_int8.Int8Linear), (nf4.NF4Config(block_size=32), nf4.Linear4bitOwn)):
        m, report, cached = methods.quantized_copy(model, cfg, "tiny")
        assert not cached and report.n_layers == 14 and report.config == cfg
        assert report.bytes_after == report.bytes_before - float_bytes + stored[cfg.method]
        assert sum(isinstance(x, layer) for x in m.modules()) == 14


def test_the_key_holds_the_model_name_and_the_calibration_tokens(tiny_llama, tiny_calibration):
    model = tiny_llama()
    cfg = awq.AWQConfig(bits=4, group_size=32, clip=False)
    methods.quantized_copy(model, cfg, "tiny", tiny_calibration)
    assert not methods.quantized_copy(model, cfg, "another model", tiny_calibration)[2]
    assert not methods.quantized_copy(model, cfg, "tiny", tiny_calibration.flip(0))[2]
    # RTN needs no calibration: the key ignores it
    methods.quantized_copy(model, RTNConfig(bits=4, group_size=32), "tiny", tiny_calibration)
    assert methods.quantized_copy(model, RTNConfig(bits=4, group_size=32), "tiny")[2]


def test_bad_requests_say_what_is_wrong(tiny_llama):
    model = tiny_llama()
    with pytest.raises(TypeError, match="no quantizer takes a dict"):
        methods.quantized_copy(model, {"bits": 4}, "tiny")
    with pytest.raises(ValueError, match="gptq needs calibration token ids"):
        methods.quantized_copy(model, gptq.GPTQConfig(), "tiny")
    with pytest.raises(ValueError, match="bits must be an integer from 2 to 8"):
        RTNConfig(bits=9)
