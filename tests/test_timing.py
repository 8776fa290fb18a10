"""Benchmarks, bandwidth probe, speed of light, arithmetic intensity and roofline helpers."""

import time
from types import SimpleNamespace

import pytest
import torch

from course_utils import timing


def test_speed_of_light_hand_worked():
    # 1 GB per token at 100 GB/s: 100 tokens/s
    assert timing.speed_of_light_tokens_per_s(1e9, 100) == pytest.approx(100.0)
    # a 70e9-parameter model in FP16 (140 GB) at 3350 GB/s: 23.9 tokens/s
    assert timing.speed_of_light_tokens_per_s(140e9, 3350) == pytest.approx(23.93, abs=0.01)  # 23.928..., to 2 decimals
    with pytest.raises(ValueError):
        timing.speed_of_light_tokens_per_s(0, 100)


def test_gemv_and_gemm_intensity():
    # GEMV, fp16 weights and activations: 2*k*n FLOPs over 2*k*n (+ tiny) bytes: about 1 FLOP/byte
    gemv = timing.matmul_cost(1, 4096, 4096, bytes_per_weight=2)
    assert gemv.flops == 2 * 4096 * 4096
    assert gemv.total_bytes == 2 * 4096 * 4096 + 2 * 4096 + 2 * 4096
    assert gemv.intensity == pytest.approx(1.0, rel=1e-3)  # the 16 KiB of activations: 0.1 % below 1
    # int4 weights: twice the FLOPs per byte; fp32: half
    # the activations' 16 KiB, next to 8 MiB of int4 weights, lower it below 4 by 0.2 %
    assert timing.arithmetic_intensity(1, 4096, 4096, 0.5) == pytest.approx(4.0, rel=1e-2)
    assert timing.arithmetic_intensity(1, 4096, 4096, 4, 4) == pytest.approx(0.5, rel=1e-3)
    # square GEMM n=4096 in fp16: 2n^3 / (3 * 2n^2) = n/3
    assert timing.arithmetic_intensity(4096, 4096, 4096) == pytest.approx(4096 / 3)


def test_roofline():
    # ridge at 1000 GFLOP/s / 100 GB/s = 10 FLOP/byte
    assert timing.ridge_point(1000, 100) == 10
    assert timing.attainable_gflops(1, 1000, 100) == 100  # memory-bound
    assert timing.attainable_gflops(50, 1000, 100) == 1000  # compute-bound


class FakeClock:
    """Stands in for the ``time`` module inside ``timing``: ``perf_counter`` reads a clock that only moves
    when ``sleep`` (or ``advance``) is called, so every duration the code measures is known exactly."""

    def __init__(self, start=1000.0):
        self.now = start
        self.reads = 0

    def perf_counter(self):
        self.reads += 1
        return self.now

    def sleep(self, seconds):
        self.now += seconds

    advance = sleep


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(timing, "time", fake)
    return fake


def test_benchmark_times_each_call_and_not_the_warmup(clock):
    durations = iter([5.0, 5.0, 0.010, 0.030, 0.020, 0.050, 0.040])  # two warmup calls, then five timed ones
    result = timing.benchmark(lambda: clock.sleep(next(durations)), warmup=2, repeat=5)
    assert result.samples_s == pytest.approx((0.010, 0.030, 0.020, 0.050, 0.040), abs=1e-12)
    assert result.median_s == pytest.approx(0.030)
    # linear interpolation between order statistics: q1 at position 1 of 0..4, q3 at position 3
    assert (result.q1_s, result.q3_s) == pytest.approx((0.020, 0.040)) and result.iqr_s == pytest.approx(0.020)
    assert str(result) == "median 30.000 ms (IQR 20.000-40.000 ms, n=5)"


def test_benchmark_of_a_real_sleep_is_never_shorter_than_the_sleep():
    # a lower bound only: time.sleep waits at least its argument; a busy machine only makes it longer
    result = timing.benchmark(lambda: time.sleep(0.01), warmup=1, repeat=3)
    assert len(result.samples_s) == 3 and result.min_s >= 0.01


def test_benchmark_quartiles_hand_worked():
    result = timing.BenchmarkResult((4.0, 1.0, 3.0, 2.0, 5.0))
    assert (result.min_s, result.q1_s, result.median_s, result.q3_s, result.max_s) == (1, 2, 3, 4, 5)
    assert result.iqr_s == 2
    # six samples: the median between the middle two, q1 at position 1.25 and q3 at 3.75 of 0..5
    even = timing.BenchmarkResult((1.0, 2.0, 4.0, 8.0, 16.0, 32.0))
    assert (even.median_s, even.q1_s, even.q3_s) == (6.0, 2.5, 14.0) and even.iqr_s == 11.5
    single = timing.BenchmarkResult((0.7,))
    assert (single.q1_s, single.median_s, single.q3_s, single.iqr_s) == (0.7, 0.7, 0.7, 0.0)
    with pytest.raises(ValueError):
        timing.benchmark(lambda: None, repeat=0)


def test_interleaved_benchmark_collects_every_sample(clock):
    calls = {"a": 0, "b": 0}

    def bump(name, seconds):
        calls[name] += 1
        clock.sleep(seconds)

    results = timing.benchmark_interleaved(
        {"a": lambda: bump("a", 0.001), "b": lambda: bump("b", 0.003)}, rounds=3, repeat=2, warmup=1
    )
    assert {name: len(r.samples_s) for name, r in results.items()} == {"a": 6, "b": 6}
    assert calls == {"a": 7, "b": 7}
    # each sample is its own function's call, whichever ran in between
    assert results["a"].samples_s == pytest.approx((0.001,) * 6) and results["b"].samples_s == pytest.approx((0.003,) * 6)


def test_bandwidth_is_the_bytes_read_over_the_median_time(clock, monkeypatch):
    n_bytes = 4 * 2**20
    durations = iter([0.0, 0.0] + [0.002, 0.001, 0.004, 0.001, 0.002])  # two warmups, five timed sums
    calls = []
    real_probe = timing.read_probe

    def probe(n, device):
        read, n_read = real_probe(n, device)
        calls.append(n_read)

        def timed():
            value = read()
            clock.sleep(next(durations))
            return value

        return timed, n_read

    monkeypatch.setattr(timing, "read_probe", probe)
    result = timing.measure_bandwidth(n_bytes=n_bytes, warmup=2, repeat=5)
    assert calls == [n_bytes] and result.n_bytes == n_bytes
    assert result.timing.median_s == pytest.approx(0.002)
    assert result.gbps == pytest.approx(n_bytes / 0.002 / 1e9) and float(result) == result.gbps


def test_the_read_probe_reads_every_byte_once():
    read, n_read = timing.read_probe(n_bytes=4 * 1000 + 3)  # whole float32 values only
    assert n_read == 4000 and float(read()) == 1000.0  # a sum of 1000 ones: each value read exactly once


def test_matmul_gflops_is_the_flop_count_over_the_median_time(clock, monkeypatch):
    size = 64
    products = []
    durations = iter([0.0, 0.004, 0.001, 0.002])  # one warmup, three timed products

    real_matmul = torch.Tensor.__matmul__

    def timed_matmul(a, b):
        out = real_matmul(a, b)
        products.append(tuple(out.shape))
        clock.sleep(next(durations))
        return out

    monkeypatch.setattr(torch.Tensor, "__matmul__", timed_matmul)
    gflops = timing.measure_matmul_gflops(size=size, repeat=3)
    assert products == [(size, size)] * 4
    # 2 * size**3 FLOPs (a multiply-add counts two) over the median of 4, 1 and 2 ms
    assert gflops == pytest.approx(2 * size**3 / 0.002 / 1e9)


def test_decode_speed_times_prefill_and_each_step_separately(clock, tiny_llama):
    """Prefill and decode are timed separately; one step per new token, each fed one token (the KV cache)."""
    model = tiny_llama()
    seen = []

    def cost(module, args, kwargs):  # each forward pass takes 10 ms plus 1 ms per token it is given
        n = kwargs["input_ids"].shape[1]
        seen.append(n)
        clock.advance(0.010 + 0.001 * n)

    model.register_forward_pre_hook(cost, with_kwargs=True)

    class Tokenizer:
        def __call__(self, text, return_tensors="pt"):
            return SimpleNamespace(input_ids=torch.tensor([[ord(c) % 256 for c in text]]))

    speed = timing.decode_tokens_per_second(model, Tokenizer(), "hello world", new_tokens=5, warmup_tokens=2)
    assert seen == [11, 1, 1] + [11, 1, 1, 1, 1, 1]  # the warmup run, then the measured one
    assert speed.prompt_tokens == 11 and speed.new_tokens == 5
    assert speed.prefill_s == pytest.approx(0.010 + 0.011)
    assert speed.step_s == pytest.approx((0.011,) * 5)
    assert speed.decode_tokens_per_s == pytest.approx(5 / 0.055)
    assert speed.prefill_tokens_per_s == pytest.approx(11 / 0.021)
    assert speed.median_step_s == pytest.approx(0.011)
