"""Measuring speed honestly: benchmarks, memory bandwidth, decode tokens/s, speed of light, roofline.

Conventions used throughout: times in seconds, bandwidth in GB/s (1e9 bytes per second, as vendors
quote it), compute in GFLOP/s (1e9 floating-point operations per second), arithmetic intensity in
FLOP per byte. A multiply-add counts as two FLOPs.

Why these helpers exist: a decode step of a language model multiplies one activation row by every
weight matrix, so each weight byte is used for about one multiply-add. Such a step is limited by
how fast memory delivers bytes, not by arithmetic; ``speed_of_light_tokens_per_s`` turns that into
an upper bound on tokens per second, and the roofline helpers show where the limit changes.
"""

from __future__ import annotations

import inspect
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

# ------------------------------------------------------------------------------------ benchmarking


def _is_cuda(device: Any) -> bool:
    if device is None:
        return False
    return torch.device(device).type == "cuda"


def synchronize(device: Any = None) -> None:
    """Wait for queued GPU work on ``device`` to finish (no-op on CPU)."""
    if _is_cuda(device):
        torch.cuda.synchronize(torch.device(device))


@dataclass(frozen=True)
class BenchmarkResult:
    """Wall-clock times of repeated calls, in seconds. The median is the number to report."""

    samples_s: tuple[float, ...]

    def _quantile(self, q: float) -> float:
        ordered = sorted(self.samples_s)
        if len(ordered) == 1:
            return ordered[0]
        pos = q * (len(ordered) - 1)
        low = int(pos)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)

    @property
    def median_s(self) -> float:
        return statistics.median(self.samples_s)

    @property
    def q1_s(self) -> float:
        """First quartile (25th percentile)."""
        return self._quantile(0.25)

    @property
    def q3_s(self) -> float:
        """Third quartile (75th percentile)."""
        return self._quantile(0.75)

    @property
    def iqr_s(self) -> float:
        """Interquartile range: the spread of the middle half of the samples."""
        return self.q3_s - self.q1_s

    @property
    def min_s(self) -> float:
        return min(self.samples_s)

    @property
    def max_s(self) -> float:
        return max(self.samples_s)

    def __str__(self) -> str:
        return (
            f"median {self.median_s * 1e3:.3f} ms "
            f"(IQR {self.q1_s * 1e3:.3f}-{self.q3_s * 1e3:.3f} ms, n={len(self.samples_s)})"
        )


def benchmark(
    fn: Callable[[], Any], warmup: int = 3, repeat: int = 20, device: Any = None
) -> BenchmarkResult:
    """Time ``fn()`` ``repeat`` times after ``warmup`` untimed calls.

    On CUDA (``device`` a CUDA device) the GPU is synchronised before starting and after each call,
    so the time covers the queued work, not just its launch. Each sample is one call's wall time.
    """
    if repeat < 1:
        raise ValueError(f"repeat must be at least 1, got {repeat}")
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        synchronize(device)
        samples.append(time.perf_counter() - start)
    return BenchmarkResult(tuple(samples))


def benchmark_interleaved(
    fns: dict[str, Callable[[], Any]], rounds: int = 5, repeat: int = 4, warmup: int = 2, device: Any = None
) -> dict[str, BenchmarkResult]:
    """Time several functions in turns: ``rounds`` times, each function ``repeat`` calls in a row.

    On a shared machine the load changes from second to second; taking turns spreads those
    changes over all candidates instead of penalising whichever ran during a busy moment.
    Returns name -> ``BenchmarkResult`` with ``rounds * repeat`` samples each.
    """
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
    synchronize(device)
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].extend(benchmark(fn, warmup=0, repeat=repeat, device=device).samples_s)
    return {name: BenchmarkResult(tuple(values)) for name, values in samples.items()}


# ------------------------------------------------------------------------------- memory bandwidth


@dataclass(frozen=True)
class BandwidthResult:
    """A memory-read bandwidth probe: ``gbps`` (GB/s) from reading ``n_bytes`` per call."""

    gbps: float
    n_bytes: int
    device: str
    timing: BenchmarkResult

    def __float__(self) -> float:
        return self.gbps

    @classmethod
    def from_timing(cls, n_bytes: int, device: Any, timing: BenchmarkResult) -> BandwidthResult:
        return cls(gbps=n_bytes / timing.median_s / 1e9, n_bytes=n_bytes, device=str(device), timing=timing)


def default_probe_bytes(device: Any = "cpu") -> int:
    """A probe size far larger than the caches: 1 GiB.

    Large also for a second reason: on a shared machine a thread may wait a few milliseconds for a
    busy core, and a long read makes such a wait a small part of the measured time.
    """
    return 2**30


def read_probe(n_bytes: int | None = None, device: Any = "cpu") -> tuple[Callable[[], Any], int]:
    """A function that reads ``n_bytes`` of memory once (a float32 sum), and the bytes it reads."""
    n_bytes = n_bytes or default_probe_bytes(device)
    data = torch.ones(n_bytes // 4, dtype=torch.float32, device=device)
    return (lambda: data.sum()), data.numel() * 4


def measure_bandwidth(
    n_bytes: int | None = None, device: Any = "cpu", warmup: int = 2, repeat: int = 10
) -> BandwidthResult:
    """Measure memory-read bandwidth by summing a float32 tensor of ``n_bytes`` bytes.

    A sum does one addition per 4 bytes read, so it is limited by memory, not arithmetic. The
    tensor must be much larger than the last-level cache (default: ``default_probe_bytes``).
    Returns the median over ``repeat`` sums as GB/s (1e9 bytes/s).
    """
    device = str(torch.device(device))
    probe, n_read = read_probe(n_bytes, device)
    timing = benchmark(probe, warmup=warmup, repeat=repeat, device=device)
    return BandwidthResult.from_timing(n_read, device, timing)


def measure_matmul_gflops(
    size: int = 2048, dtype: torch.dtype = torch.float32, device: Any = "cpu", repeat: int = 5
) -> float:
    """Measured matrix-multiply rate in GFLOP/s for a (size x size) @ (size x size) product.

    A large square product does ``2 * size**3`` FLOPs on ``3 * size**2`` numbers, so it is
    limited by arithmetic; its rate is the practical compute roof of this device and dtype.
    """
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    timing = benchmark(lambda: a @ b, warmup=1, repeat=repeat, device=device)
    return 2 * size**3 / timing.median_s / 1e9


# ---------------------------------------------------------------------------------- speed of light


def speed_of_light_tokens_per_s(bytes_per_token: float, bandwidth_gbps: float) -> float:
    """Upper bound on decode tokens/s when every token must stream ``bytes_per_token`` from memory.

    tokens/s = bandwidth / bytes per token. Example: 1 GB per token at 100 GB/s -> 100 tokens/s.
    """
    if bytes_per_token <= 0 or bandwidth_gbps <= 0:
        raise ValueError("bytes_per_token and bandwidth_gbps must be positive")
    return bandwidth_gbps * 1e9 / bytes_per_token


@dataclass(frozen=True)
class MatmulCost:
    """FLOPs and bytes of an (m x k) @ (k x n) product with a (k x n) weight, each operand read once.

    ``m`` is the number of tokens processed together (1 for a decode step: a GEMV).
    """

    m: int
    k: int
    n: int
    flops: float
    weight_bytes: float
    activation_bytes: float
    output_bytes: float

    @property
    def total_bytes(self) -> float:
        return self.weight_bytes + self.activation_bytes + self.output_bytes

    @property
    def intensity(self) -> float:
        """Arithmetic intensity in FLOP per byte moved."""
        return self.flops / self.total_bytes


def matmul_cost(
    m: int, k: int, n: int, bytes_per_weight: float = 2.0, bytes_per_activation: float = 2.0
) -> MatmulCost:
    """FLOPs (2*m*k*n) and minimum bytes moved by an (m x k) @ (k x n) product.

    Bytes: the weight (k*n*bytes_per_weight), the input (m*k) and the output (m*n) activations
    (bytes_per_activation each). Scales of quantized weights are not counted here.
    """
    return MatmulCost(
        m=m,
        k=k,
        n=n,
        flops=2.0 * m * k * n,
        weight_bytes=float(k * n * bytes_per_weight),
        activation_bytes=float(m * k * bytes_per_activation),
        output_bytes=float(m * n * bytes_per_activation),
    )


def arithmetic_intensity(
    m: int, k: int, n: int, bytes_per_weight: float = 2.0, bytes_per_activation: float = 2.0
) -> float:
    """FLOP per byte of an (m x k) @ (k x n) product (see ``matmul_cost``).

    For a GEMV (m=1) with fp16 weights it is close to 1; it grows about linearly with m.
    """
    return matmul_cost(m, k, n, bytes_per_weight, bytes_per_activation).intensity


def attainable_gflops(intensity: float, peak_gflops: float, bandwidth_gbps: float) -> float:
    """Roofline: attainable GFLOP/s = min(peak compute, intensity x bandwidth)."""
    return min(peak_gflops, intensity * bandwidth_gbps)


def ridge_point(peak_gflops: float, bandwidth_gbps: float) -> float:
    """The intensity (FLOP/byte) above which a kernel can become compute-bound."""
    return peak_gflops / bandwidth_gbps


# ------------------------------------------------------------------------ decode speed (transformers)


@dataclass(frozen=True)
class DecodeSpeed:
    """Prefill and decode speed of one greedy generation.

    ``prefill_s``: one forward pass over the prompt's ``prompt_tokens`` tokens.
    ``step_s``: wall time of each single-token decode step that followed.
    """

    prompt_tokens: int
    prefill_s: float
    step_s: tuple[float, ...]

    @property
    def new_tokens(self) -> int:
        return len(self.step_s)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second over all decode steps (total steps / total time)."""
        return self.new_tokens / sum(self.step_s)

    @property
    def median_step_s(self) -> float:
        return statistics.median(self.step_s)


def _cache_keyword(model) -> str:
    """Name of the forward argument that takes the KV cache (``cache`` in recent transformers)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _returned_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def _greedy_run(model, input_ids: torch.Tensor, new_tokens: int, device: str) -> tuple[float, list[float]]:
    keyword = _cache_keyword(model)
    synchronize(device)
    start = time.perf_counter()
    out = model(input_ids=input_ids, use_cache=True)
    next_id = out.logits[:, -1:].argmax(dim=-1)
    synchronize(device)
    prefill = time.perf_counter() - start
    steps = []
    cache = _returned_cache(out)
    for _ in range(new_tokens):
        start = time.perf_counter()
        out = model(input_ids=next_id, use_cache=True, **{keyword: cache})
        cache = _returned_cache(out)
        next_id = out.logits[:, -1:].argmax(dim=-1)
        synchronize(device)
        steps.append(time.perf_counter() - start)
    return prefill, steps


def decode_tokens_per_second(
    model, tokenizer, prompt: str, new_tokens: int = 32, device: Any = None, warmup_tokens: int = 4
) -> DecodeSpeed:
    """Measure greedy generation of a transformers causal LM, prefill and decode separately.

    The prompt is run once as a whole (prefill), then ``new_tokens`` single-token steps reuse the
    KV cache (decode); each step picks the most likely token, whatever it is (end-of-text included),
    so every run does the same work. A short untimed run first warms up allocations and kernels.
    ``device`` defaults to the model's device.
    """
    device = str(device or next(model.parameters()).device)
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    with torch.inference_mode():
        if warmup_tokens:
            _greedy_run(model, input_ids, warmup_tokens, device)
        prefill, steps = _greedy_run(model, input_ids, new_tokens, device)
    return DecodeSpeed(prompt_tokens=int(input_ids.shape[1]), prefill_s=prefill, step_s=tuple(steps))
