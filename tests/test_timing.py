"""Benchmarks, bandwidth probe, speed of light, arithmetic intensity and roofline helpers."""

import time

import pytest
import torch

from course_utils import timing


def test_speed_of_light_hand_worked():
    # 1 GB per token at 100 GB/s: 100 tokens/s
    assert timing.speed_of_light_tokens_per_s(1e9, 100) == pytest.approx(100.0)
    # a 70e9-parameter model in FP16 (140 GB) at 3350 GB/s: 23.9 tokens/s
    assert timing.speed_of_light_tokens_per_s(140e9, 3350) == pytest.approx(23.93, abs=0.01)
    with pytest.raises(ValueError):
        timing.speed_of_light_tokens_per_s(0, 100)


def test_gemv_and_gemm_intensity():
    # GEMV, fp16 weights and activations: 2*k*n FLOPs over 2*k*n (+ tiny) bytes: about 1 FLOP/byte
    gemv = timing.matmul_cost(1, 4096, 4096, bytes_per_weight=2)
    assert gemv.flops == 2 * 4096 * 4096
    assert gemv.total_bytes == 2 * 4096 * 4096 + 2 * 4096 + 2 * 4096
    assert gemv.intensity == pytest.approx(1.0, rel=1e-3)
    # int4 weights: twice the FLOPs per byte; fp32: half
    assert timing.arithmetic_intensity(1, 4096, 4096, 0.5) == pytest.approx(4.0, rel=1e-2)
    assert timing.arithmetic_intensity(1, 4096, 4096, 4, 4) == pytest.approx(0.5, rel=1e-3)
    # square GEMM n=4096 in fp16: 2n^3 / (3 * 2n^2) = n/3
    assert timing.arithmetic_intensity(4096, 4096, 4096) == pytest.approx(4096 / 3)


def test_roofline():
    # ridge at 1000 GFLOP/s / 100 GB/s = 10 FLOP/byte
    assert timing.ridge_point(1000, 100) == 10
    assert timing.attainable_gflops(1, 1000, 100) == 100  # memory-bound
    assert timing.attainable_gflops(50, 1000, 100) == 1000  # compute-bound


def test_benchmark_of_a_sleep():
    result = timing.benchmark(lambda: time.sleep(0.01), warmup=1, repeat=5)
    assert len(result.samples_s) == 5
    assert 0.01 <= result.median_s < 0.05
    assert result.min_s <= result.q1_s <= result.median_s <= result.q3_s <= result.max_s
    assert result.iqr_s >= 0
    assert "ms" in str(result)


def test_benchmark_quartiles_hand_worked():
    result = timing.BenchmarkResult((4.0, 1.0, 3.0, 2.0, 5.0))
    assert (result.min_s, result.q1_s, result.median_s, result.q3_s, result.max_s) == (1, 2, 3, 4, 5)
    with pytest.raises(ValueError):
        timing.benchmark(lambda: None, repeat=0)


def test_interleaved_benchmark_collects_every_sample():
    calls = {"a": 0, "b": 0}

    def bump(name):
        calls[name] += 1

    results = timing.benchmark_interleaved(
        {"a": lambda: bump("a"), "b": lambda: bump("b")}, rounds=3, repeat=2, warmup=1
    )
    assert {name: len(r.samples_s) for name, r in results.items()} == {"a": 6, "b": 6}
    assert calls == {"a": 7, "b": 7}


def test_bandwidth_probe_is_plausible():
    result = timing.measure_bandwidth(n_bytes=64 * 2**20, repeat=5)
    assert result.n_bytes == 64 * 2**20
    # any machine of the last 15 years reads faster than 1 GB/s; none reads 64 MiB at 10 TB/s
    assert 1 < result.gbps < 10_000
    assert float(result) == result.gbps


def test_matmul_gflops_is_plausible():
    gflops = timing.measure_matmul_gflops(size=256, repeat=3)
    assert 0.1 < gflops < 1e6


def test_decode_speed_on_a_tiny_model():
    """Prefill and decode are timed separately; one step per new token."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )
    model = LlamaForCausalLM(config).eval()

    class Tokenizer:
        def __call__(self, text, return_tensors="pt"):
            class Encoded:
                input_ids = torch.tensor([[ord(c) % 64 for c in text]])

            return Encoded()

    speed = timing.decode_tokens_per_second(model, Tokenizer(), "hello world", new_tokens=5)
    assert speed.prompt_tokens == 11
    assert speed.new_tokens == 5
    assert speed.prefill_s > 0 and all(s > 0 for s in speed.step_s)
    assert speed.decode_tokens_per_s == pytest.approx(5 / sum(speed.step_s))
    assert speed.prefill_tokens_per_s == pytest.approx(11 / speed.prefill_s)
