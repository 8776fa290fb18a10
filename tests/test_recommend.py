"""recommend(): each worked scenario of lesson 11 pinned, with the numbers its reasoning rests on."""

import pytest

from course_utils import recommend as rec
from course_utils.recommend import recommend


def test_laptop_cpu_runs_an_8b_model_as_gguf_q4_k_m_at_memory_speed():
    r = recommend("cpu", memory_gb=16, params=8e9)
    assert r.method == "GGUF Q4_K_M" and r.file_format == "GGUF" and "llama.cpp" in r.engine
    assert r.bits_per_weight == pytest.approx(4.89, abs=0.01)          # 4.58 GiB of a 14.97 GiB F16 file
    assert r.tokens_per_s == pytest.approx(76.8 / 4.89, rel=0.01)      # DDR5-4800 dual channel / 4.9 GB of weights
    assert r.expected_loss_pct == pytest.approx(2.79, abs=0.01)        # 6.4071 / 6.2332 in llama.cpp's table
    assert any("Q4_0: expected loss 7.5 %" in a for a in r.alternatives)


def test_a_mac_gets_the_same_file_through_metal_and_its_bandwidth():
    r = recommend("apple", memory_gb=32, params=8e9, device="Apple M1")
    assert r.method == "GGUF Q4_K_M" and "Metal" in r.engine
    assert r.tokens_per_s == pytest.approx(68.25 / 4.89, rel=0.01)  # M1's 68.25 GB/s over the same 4.9 GB (4.89: rounded)
    # a stricter quality budget moves up the ladder, and costs speed
    strict = recommend("apple", memory_gb=32, params=8e9, device="Apple M1", max_loss_pct=0.5)
    assert strict.method == "GGUF Q6_K" and strict.tokens_per_s < r.tokens_per_s


def test_a_24_gb_consumer_gpu_serves_8b_as_awq_int4():
    r = recommend("consumer_gpu", memory_gb=24, params=8e9, kv_cache_gb=4)
    assert r.method.startswith("AWQ INT4") and "vLLM" in r.engine
    assert r.weight_gb == pytest.approx(4.125, abs=0.01)  # 8e9 x 4.125 bits (int4, g128 float16 scales) / 8
    assert r.tokens_per_s == pytest.approx(1008 / 4.125, rel=0.01)     # about 244 tokens/s, 3.9x BF16's 63
    assert any(a.startswith("BF16") and "63 tokens/s" in a for a in r.alternatives)
    # within 1 % loss the fastest acceptable format is FP8 (the RTX 4090 has FP8 tensor cores)
    assert recommend("consumer_gpu", 24, 8e9, kv_cache_gb=4, max_loss_pct=1.0).method == "FP8 W8A8"
    # an Ampere card has no FP8: 8-bit becomes INT8 W8A8
    assert recommend("consumer_gpu", 24, 8e9, device="RTX 3090", max_loss_pct=1.0).method.startswith("INT8 W8A8")


def test_an_80_gb_h100_serves_70b_only_at_4_bits():
    r = recommend("datacenter_gpu", memory_gb=80, params=70e9, kv_cache_gb=10)
    assert r.method.startswith("AWQ INT4")
    # 70e9 x 4.125 / 8 = 36.09 GB; with 20 % overhead and the 10 GB KV cache 53.3 GB, to the decimal written
    assert r.weight_gb == pytest.approx(36.1, abs=0.1) and r.memory_gb == pytest.approx(53.3, abs=0.1)
    assert r.tokens_per_s == pytest.approx(3350 / 36.09, rel=0.01)  # H100's 3350 GB/s over the weights
    assert any(a.startswith("BF16") and "needs 178.0 GB" in a for a in r.alternatives)
    assert any(a.startswith("FP8") and "needs 94.0 GB" in a for a in r.alternatives)


def test_qlora_fine_tuning_needs_a_gpu_and_fits_8b_in_24_gb():
    r = recommend("consumer_gpu", memory_gb=24, params=8e9, fine_tune=True)
    assert r.method.startswith("QLoRA") and "peft" in r.engine.lower() and "bitsandbytes" in r.engine
    # NF4 with double quantization, 4.127 bits: 4.13 GB for 8e9 weights, x 1.5 for adapters and optimizer: 6.19
    assert r.weight_gb == pytest.approx(4.13, abs=0.01) and r.memory_gb == pytest.approx(6.19, abs=0.01)
    with pytest.raises(ValueError, match="QLoRA fine-tuning needs an NVIDIA GPU"):
        recommend("apple", 64, 8e9, fine_tune=True)
    with pytest.raises(ValueError, match=r"models up to 11\.6B parameters fit"):
        recommend("consumer_gpu", 9, 70e9, fine_tune=True)


def test_batched_serving_turns_compute_bound_and_fp8_overtakes_weight_only_int4():
    small = recommend("datacenter_gpu", 80, 8e9, goal="throughput", batch_size=8, kv_cache_gb=30)
    large = recommend("datacenter_gpu", 80, 8e9, goal="throughput", batch_size=256, kv_cache_gb=30)
    assert small.method.startswith("AWQ INT4") and large.method == "FP8 W8A8"
    assert large.tokens_per_s == pytest.approx(256 / (8e9 / 3350e9), rel=0.01)   # FP8 still reads 8 GB per step
    assert any("AWQ INT4" in r and "intensity 993" in r and "ridge point of 295" in r and "compute-bound" in r
               for r in large.reasons)
    # the ideal roofline: INT4 at batch 256 is limited by BF16 compute
    assert rec.step_tokens_per_s(8e9, 4.125, 256, 3350, 989) == pytest.approx(989e12 / (2 * 8e9), rel=1e-6)


def test_impossible_budgets_and_bad_input_say_what_would_fit():
    with pytest.raises(ValueError, match=r"70B parameters do not fit in 8 GB .* models up to 10\.9B parameters fit as GGUF Q4_K_M"):
        recommend("cpu", 8, 70e9)
    with pytest.raises(ValueError, match="KV cache alone"):
        recommend("datacenter_gpu", 80, 8e9, kv_cache_gb=90)
    with pytest.raises(ValueError, match=r"unknown hardware 'gpu'; choose among"):
        recommend("gpu", 24, 8e9)
    with pytest.raises(ValueError, match="no datasheet bandwidth for 'Quantum 9000'"):
        recommend("consumer_gpu", 24, 8e9, device="Quantum 9000")
    for kwargs in ({"memory_gb": -1}, {"params": 0}, {"batch_size": 0}, {"max_loss_pct": -2}, {"kv_cache_gb": -1}):
        args = {"hardware_class": "cpu", "memory_gb": 16, "params": 8e9, **kwargs}
        with pytest.raises(ValueError):
            recommend(**args)
    with pytest.raises(ValueError, match="goal must be one of"):
        recommend("cpu", 16, 8e9, goal="fast")


def test_small_models_are_warned_about_and_slow_targets_explained():
    r = recommend("cpu", 16, 0.135e9)
    assert any("below 2B parameters" in x for x in r.reasons)
    slow = recommend("cpu", 16, 8e9, min_tokens_per_s=100)
    assert any("no candidate reaches 100 tokens/s" in x for x in slow.reasons)
