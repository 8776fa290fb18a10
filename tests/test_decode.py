"""The course's decode loop computes what transformers computes, step by step, for float and quantized models."""

import types

import pytest
import torch

from course_utils import decode
from course_utils.quant import kernel_path, linear


def _ids(n=12, seed=0):
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed))


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("options", [{}, {"bias": True}, {"tied": True}, {"heads": 4, "kv_heads": 4}])
def test_prompt_logits_equal_transformers(tiny_llama, logits_of, options):
    model = tiny_llama(**options)
    ids = _ids()
    ref = logits_of(model, ids[None])[0]
    with torch.inference_mode():
        mine = decode.Decoder(model, max_tokens=32).forward(ids, 0)
    assert _rel(mine, ref) < 1e-5


def test_each_decode_step_equals_the_full_forward_at_that_position(tiny_llama, logits_of):
    """The static KV cache: step t, fed one token, gives the logits the whole sequence gives at t."""
    model = tiny_llama()
    ids = _ids(16)
    ref = logits_of(model, ids[None])[0]
    d = decode.Decoder(model, max_tokens=16)
    with torch.inference_mode():
        d.forward(ids[:10], 0)
        steps = torch.cat([d.forward(ids[t:t + 1], t) for t in range(10, 16)])
    assert _rel(steps, ref[10:]) < 1e-5
    with pytest.raises(ValueError, match="exceed the cache of 16"):
        d.forward(ids[:1], 16)


def test_greedy_tokens_equal_generate(tiny_llama):
    model = tiny_llama(seed=3)
    ids = _ids(8)
    expected = model.generate(ids[None], max_new_tokens=10, do_sample=False, min_new_tokens=10)[0, 8:].tolist()
    tokens, prefill, steps = decode.Decoder(model, max_tokens=32).greedy(ids, 10)
    assert tokens == expected
    assert prefill > 0 and len(steps) == 9


def test_a_quantized_model_decodes_through_its_kernels(tiny_llama, logits_of):
    model = tiny_llama()
    linear.quantize_model(model, linear.RTNConfig(4, 32))
    ids = _ids()
    kernel_path.set_engine(model, "dequantize")
    ref = logits_of(model, ids[None])[0]
    exact = decode.Decoder(model, max_tokens=32)
    assert exact.kernels == {"dequantize": 14, "fp32": 1}
    with torch.inference_mode():
        assert _rel(exact.forward(ids, 0), ref) < 1e-5
    kernel_path.set_engine(model, "auto")
    fast = decode.Decoder(model, dtype=torch.bfloat16, max_tokens=32, head="int8")
    assert fast.kernels == {"int4": 14, "int8": 1} and fast.head_label == "int8"
    with torch.inference_mode():
        assert 0 < _rel(fast.forward(ids, 0), ref) < 0.05


def test_a_prompt_after_the_first_is_refused_and_logits_score_like_a_model(tiny_llama, logits_of):
    model = tiny_llama()
    d = decode.Decoder(model, max_tokens=32)
    with torch.inference_mode():
        d.forward(_ids(4), 0)
        with pytest.raises(ValueError, match="only from position 0"):
            d.forward(_ids(3), 4)
        scored = decode.DecoderLogits(d)(input_ids=_ids(12)[None]).logits
    assert _rel(scored, logits_of(model, _ids(12)[None])) < 1e-5


def test_bytes_per_token_count_weights_head_norms_and_the_kv_cache(tiny_llama):
    model = tiny_llama(tied=True)
    d = decode.Decoder(model, max_tokens=32)
    weights = sum(p.numel() for n, p in model.named_parameters() if "proj" in n) * 4
    head, norms, row = 256 * 64 * 4, (2 * 2 + 1) * 64 * 4, 64 * 4
    assert d.bytes_per_token() == weights + head + norms + row
    assert d.bytes_per_token(10) - d.bytes_per_token() == 2 * 2 * 2 * 16 * 4 * 10  # k and v, layers, kv heads, head dim


def test_a_dequantizing_layer_reads_its_float_weight_but_stores_its_codes(tiny_llama):
    model = tiny_llama()
    linear.quantize_model(model, linear.RTNConfig(4, 32))
    kernel_path.set_engine(model, "dequantize")
    d = decode.Decoder(model, max_tokens=16)
    assert d.linear_bits_per_weight() == pytest.approx(4 + 16 / 32)  # packed codes and a float16 scale per group
    weights = sum(m.n_weights for m in d.matmuls)
    assert sum(m.nbytes for m in d.matmuls) == pytest.approx(weights * (4.5 / 8 + 2 * 4))


def test_speed_reports_each_step(tiny_llama):
    d = decode.Decoder(tiny_llama(), max_tokens=32)
    speed = d.speed(_ids(8), new_tokens=5, warmup_tokens=1)
    assert speed.new_tokens == 5 and speed.prompt_tokens == 8 and speed.decode_tokens_per_s > 0


def test_other_architectures_are_refused_with_the_way_out():
    fake = types.SimpleNamespace(config=types.SimpleNamespace(model_type="gpt2"))
    with pytest.raises(ValueError, match="decode_tokens_per_second"):
        decode.Decoder(fake)


def test_the_profile_splits_a_step_into_parts_that_add_up(tiny_llama):
    d = decode.Decoder(tiny_llama(), max_tokens=64)
    split = decode.profile_step(d, _ids(8), steps=4)
    parts = ("weight matmuls", "attention", "other operators", "between operators")
    assert set(split) == {*parts, "total", "unprofiled"}
    assert all(split[p] >= 0 for p in parts) and split["weight matmuls"] > 0 and split["attention"] > 0
    assert sum(split[p] for p in parts) == pytest.approx(split["total"], rel=0.05)


def test_the_fastest_decoder_leaves_other_libraries_layers_to_transformers(tiny_llama):
    from course_utils.quant import llm_int8

    model = tiny_llama()
    assert decode.fastest_decoder(model).dtype == torch.float32
    linear.quantize_model(model, linear.RTNConfig(4, 32))
    assert decode.fastest_decoder(model).dtype == torch.bfloat16  # the kernels' dtype
    other = tiny_llama()
    llm_int8.quantize_model(other, llm_int8.Int8Config())
    assert decode.fastest_decoder(other) is None
