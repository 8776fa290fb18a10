"""Timing sweeps of the weight-only GEMV kernels of :mod:`course_utils.kernels`, for lesson 3.

- :func:`time_gemv`: one packed weight, one input row ``(1, in_features)``, per-call seconds;
- :func:`gemv_sweep`: one seeded random weight ``(out_features, in_features)`` in several (format, input
  dtype) variants, timed in turns with a memory-read probe, so each gets a fraction of the speed of light;
- :func:`matmul_batch_sweep`: ``x @ W.T`` for ``x: (m, in_features)`` and several ``m``, from one
  row (memory-bound) to many (compute-bound).

Every sweep cycles through copies of the weight covering ``rotate_bytes`` (default 128 MiB, several times
CPU L3 and GPU L2 sizes), so calls read main memory, not a cache. GB/s are 1e9 bytes per second.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from course_utils.kernels import (
    DTYPE_NAMES,
    FLOAT_FORMATS,
    PackedWeight,
    gemv_input,
    kernel_support,
    pack_weight,
    variant_label,
)
from course_utils.timing import (
    BandwidthResult,
    BenchmarkResult,
    MatmulCost,
    benchmark,
    benchmark_interleaved,
    matmul_cost,
    read_probe,
)


def _copies(weight: PackedWeight, rotate_bytes: int) -> list[PackedWeight]:
    """``weight`` and enough clones of it to cover ``rotate_bytes`` (at least the weight itself)."""
    n_copies = max(1, math.ceil(rotate_bytes / weight.nbytes))
    return [weight] + [weight.clone() for _ in range(n_copies - 1)]


def _cycling_call(copies: list[PackedWeight], x: torch.Tensor) -> Callable[[], Any]:
    """A no-argument call of the next copy on ``x``, round and round (no autograd)."""
    cycle = itertools.cycle(copies)

    def call():
        with torch.inference_mode():
            return next(cycle)(x)

    return call


def _rotating_gemv(weight: PackedWeight, x: torch.Tensor | None, rotate_bytes: int) -> tuple[Callable[[], Any], int]:
    """A no-argument GEMV that cycles through copies of ``weight`` covering ``rotate_bytes``."""
    x = x if x is not None else gemv_input(weight.in_features, weight.act_dtype, weight.device)
    copies = _copies(weight, rotate_bytes)
    return _cycling_call(copies, x), len(copies)


def time_gemv(
    weight: PackedWeight,
    x: torch.Tensor | None = None,
    warmup: int = 3,
    repeat: int = 20,
    rotate_bytes: int = 128 * 2**20,
) -> BenchmarkResult:
    """Time one GEMV ``x @ W.T`` with a single input row; returns per-call seconds.

    A weight smaller than the caches would be served from cache after the first call. To time
    the memory, not the cache, calls cycle through enough copies of the weight to cover
    ``rotate_bytes`` (default 128 MiB, several times CPU L3 and GPU L2 sizes).
    """
    call, n_copies = _rotating_gemv(weight, x, rotate_bytes)
    return benchmark(call, warmup=max(warmup, n_copies), repeat=repeat, device=weight.device)


@dataclass(frozen=True)
class GemvTiming:
    """One format's GEMV: bytes streamed per call and the measured time."""

    label: str
    fmt: str
    act_dtype: str
    nbytes: int
    timing: BenchmarkResult

    @property
    def median_s(self) -> float:
        return self.timing.median_s

    @property
    def gbps(self) -> float:
        """Effective bandwidth: weight bytes streamed per second (GB/s)."""
        return self.nbytes / self.timing.median_s / 1e9


@dataclass(frozen=True)
class GemvSweep:
    """GEMV timings of one weight in several formats, and the read bandwidth measured alongside."""

    shape: tuple[int, int]
    device: str
    timings: list[GemvTiming]
    skipped: dict[str, str]
    bandwidth: BandwidthResult

    def by_label(self) -> dict[str, GemvTiming]:
        return {t.label: t for t in self.timings}

    def speed_of_light_fraction(self, label: str) -> float:
        """Effective GB/s of a GEMV over the measured read bandwidth (1.0 = as fast as a plain read)."""
        return self.by_label()[label].gbps / self.bandwidth.gbps


def gemv_sweep(
    out_features: int,
    in_features: int,
    variants: list[tuple[str, torch.dtype | None]],
    device: Any = "cpu",
    group_size: int = 128,
    rounds: int = 5,
    repeat: int = 4,
    rotate_bytes: int = 128 * 2**20,
    seed: int = 0,
) -> GemvSweep:
    """Time a GEMV of one seeded random weight in each (format, input dtype) of ``variants``.

    All variants and a memory-read probe (``timing.read_probe``) are timed in turns
    (``timing.benchmark_interleaved``), so a busy moment on a shared machine affects them alike.
    Variants this device cannot run are listed in ``skipped`` with the reason.
    Memory: about ``rotate_bytes`` per variant (at least one copy of the weight in that format).
    """
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(out_features, in_features, generator=gen) * 0.02).to(device)
    calls: dict[str, Callable[[], Any]] = {}
    sizes: dict[str, tuple[str, str, int]] = {}
    skipped: dict[str, str] = {}
    for fmt, act_dtype in variants:
        act = FLOAT_FORMATS.get(fmt, act_dtype or torch.bfloat16)
        label = variant_label(fmt, act)
        reason = kernel_support(fmt, device, act)
        if reason:
            skipped[label] = reason
            continue
        packed = pack_weight(weight, fmt, group_size=group_size, act_dtype=act)
        calls[label], _ = _rotating_gemv(packed, None, rotate_bytes)
        sizes[label] = (fmt, DTYPE_NAMES[act], packed.nbytes)
    del weight
    probe, probe_bytes = read_probe(None, device)
    calls["read probe"] = probe
    results = benchmark_interleaved(calls, rounds=rounds, repeat=repeat, warmup=2, device=device)
    timings = [GemvTiming(label, *sizes[label], results[label]) for label in sizes]
    bandwidth = BandwidthResult.from_timing(probe_bytes, device, results["read probe"])
    return GemvSweep((out_features, in_features), str(device), timings, skipped, bandwidth)


@dataclass(frozen=True)
class BatchTiming:
    """An (m x k) @ (k x n) product with a stored weight: m rows (tokens) at once."""

    m: int
    cost: MatmulCost
    timing: BenchmarkResult

    @property
    def gflops(self) -> float:
        """Achieved GFLOP/s (median time)."""
        return self.cost.flops / self.timing.median_s / 1e9


def matmul_batch_sweep(
    out_features: int,
    in_features: int,
    batch_sizes: list[int],
    dtype: torch.dtype = torch.bfloat16,
    device: Any = "cpu",
    rounds: int = 3,
    repeat: int = 3,
    rotate_bytes: int = 128 * 2**20,
    seed: int = 0,
) -> list[BatchTiming]:
    """Time ``x @ W.T`` for ``x: (m, in_features)``, ``m`` in ``batch_sizes``, with one float weight.

    With m = 1 this is a decode step's GEMV; as m grows, each weight byte serves m rows, so the
    arithmetic intensity grows about linearly with m until compute, not memory, is the limit.
    Batch sizes are timed in turns (``timing.benchmark_interleaved``); weights rotate as in
    ``time_gemv``.
    """
    fmt = DTYPE_NAMES[dtype]
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(out_features, in_features, generator=gen) * 0.02).to(device)
    copies = _copies(pack_weight(weight, fmt), rotate_bytes)
    del weight
    calls = {}
    for m in batch_sizes:
        x = torch.randn(m, in_features, generator=gen).to(device=device, dtype=dtype)
        calls[m] = _cycling_call(copies, x)
    results = benchmark_interleaved(calls, rounds=rounds, repeat=repeat, warmup=max(2, len(copies)), device=device)
    size = torch.finfo(dtype).bits // 8
    return [
        BatchTiming(m, matmul_cost(m, in_features, out_features, size, size), results[m]) for m in batch_sizes
    ]
