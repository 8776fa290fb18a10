"""The weight-only GEMV kernels compute the matmul of the weight they claim to store; their timing sweeps run."""

import pytest
import torch

from course_utils import kernel_sweeps, kernels


def _weight(out_features=96, in_features=256, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(out_features, in_features, generator=gen) * 0.05


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def _unit_roundoff(dtype):
    """Largest relative error of rounding a real number to ``dtype``: half its machine epsilon, 2^-p for p bits
    of precision (float32 2^-24, float16 2^-11, bfloat16 2^-8)."""
    return torch.finfo(dtype).eps / 2


def _assert_is_the_matmul(y, x, weight):
    """``y`` is ``x @ weight.T`` up to the rounding of a float32 dot product and of the output to its dtype.

    Each of the k float32 multiply-adds of a dot product rounds once, so a sum in any order is within
    gamma_k = k * 2^-24 / (1 - k * 2^-24) of the exact one, relative to sum |x_i| |w_i| (the standard bound);
    the kernel and the float32 reference each are, so they differ by at most twice that (k + 2 terms: the
    int formats multiply by a scale and add a zero as well). An output stored in bf16 or fp16 then rounds
    once more, by at most its unit roundoff. Elementwise, no margin needed: a convention one code off
    (code - 7 for code - 8) moves an output by a step times sum_i x_i, several times the bf16 bound here and
    thousands of times the float32 one."""
    ref = x.float() @ weight.T
    k = weight.shape[1]
    gamma = (k + 2) * 2**-24 / (1 - (k + 2) * 2**-24)
    magnitude = x.float().abs() @ weight.abs().T
    u = 0.0 if y.dtype == torch.float32 else _unit_roundoff(y.dtype)
    bound = u * ref.abs() + (1 + u) * 2 * gamma * magnitude
    excess = (y.float() - ref).abs() - bound
    assert (excess <= 0).all(), f"{int((excess > 0).sum())} outputs off by up to {float(excess.max()):.3g} beyond the bound"


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "fp16"])
def test_float_formats_cast_the_weight(fmt):
    w = _weight()
    packed = kernels.pack_weight(w, fmt)
    x = kernels.gemv_input(w.shape[1], packed.act_dtype)
    assert packed.nbytes == w.numel() * {"fp32": 4, "bf16": 2, "fp16": 2}[fmt]
    _assert_is_the_matmul(packed(x), x, packed.dequantize())
    # the stored weight is the original rounded once: within the format's unit roundoff of each value
    # (fp32: exact), and half a subnormal step for the values below fp16's smallest normal (6e-5)
    dtype = kernels.FLOAT_FORMATS[fmt]
    tiny = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps / 2
    assert ((packed.dequantize() - w).abs() <= _unit_roundoff(dtype) * w.abs() + tiny).all()
    assert torch.equal(packed.dequantize(), w.to(dtype).float())  # round to nearest, as .to() does


@pytest.mark.parametrize("act_dtype", [torch.bfloat16, torch.float32])
def test_int8_kernel_equals_dequantized_matmul(act_dtype):
    w = _weight()
    packed = kernels.pack_weight(w, "int8", act_dtype=act_dtype)
    assert packed.tensors["weight"].dtype == torch.int8
    assert packed.nbytes == w.numel() + w.shape[0] * torch.finfo(act_dtype).bits // 8
    # the stored step is max|w| / 127 of its row, rounded to the input dtype (float32: as computed)
    step = packed.tensors["scales"].float()[:, None]
    exact_step = w.abs().amax(dim=1, keepdim=True) / 127
    assert ((step - exact_step).abs() <= _unit_roundoff(act_dtype) * exact_step).all()
    # every weight is within half a stored step of the original: the code is round(w / step), and the bf16
    # step is at most 2^-8 from max|w| / 127, too little to push the largest |w| past code 127.5; the
    # float32 division and product each add at most 2^-24 of |w| <= 127.5 steps: 2^-16 of a step covers both
    assert ((packed.dequantize() - w).abs() <= (0.5 + 2**-16) * step).all()
    x = kernels.gemv_input(w.shape[1], act_dtype, seed=1)
    _assert_is_the_matmul(packed(x), x, packed.dequantize())


@pytest.mark.parametrize("act_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_kernel_equals_dequantized_matmul(act_dtype, group_size):
    """Checks the (code - 8) * scale + zero convention of PyTorch's int4 kernel."""
    w = _weight()
    packed = kernels.pack_weight(w, "int4", group_size=group_size, act_dtype=act_dtype)
    codes = packed.codes
    assert codes.min() >= 0 and codes.max() <= 15
    groups = w.shape[1] // group_size
    assert packed.tensors["scales_and_zeros"].shape == (groups, w.shape[0], 2)
    x = kernels.gemv_input(w.shape[1], act_dtype, seed=2)
    _assert_is_the_matmul(packed(x), x, packed.dequantize())
    # 16 levels over each group's range: the stored step is (max - min) / 15 rounded to the input dtype,
    # and the stored zero (the value of code 8) min + 8 steps, rounded too
    ranges = w.reshape(w.shape[0], groups, group_size)
    low, high = ranges.amin(-1), ranges.amax(-1)
    u = _unit_roundoff(act_dtype)
    scale, zero = packed.tensors["scales_and_zeros"].float().unbind(-1)
    scale, zero = scale.T, zero.T  # (out, groups)
    assert ((scale - (high - low) / 15).abs() <= u * (high - low) / 15).all()
    assert ((zero - (low + 8 * scale)).abs() <= u * (low + 8 * scale).abs()).all()
    # inside the grid zero - 8 steps .. zero + 7 steps every weight is within half a step; the rounded zero
    # and step can leave the group's ends outside it by at most u * |zero| + 15 * u * (max - min) / 15 <=
    # u * (|zero| + 16 steps) (far less than half a step here); the float32 arithmetic adds a few 2^-24 of
    # the values (16 steps + |zero|)
    err = (packed.dequantize() - w).reshape_as(ranges).abs().amax(-1)
    slack = 4 * 2**-24 * (16 * scale + zero.abs())
    assert (err <= torch.maximum(0.5 * scale, u * (zero.abs() + 16 * scale)) + slack).all()


def test_int4_convention_by_hand():
    """One group of 32 codes 0..15 (twice): weight = (code - 8) * scale + zero."""
    codes = torch.arange(32, dtype=torch.int32).remainder(16).repeat(16, 1)  # (16, 32)
    packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
    scale, zero = 0.5, 1.0
    scales_and_zeros = torch.tensor([scale, zero]).repeat(1, 16, 1).to(torch.float32)  # (1, 16, 2)
    x = torch.zeros(1, 32)
    x[0, 0] = 1.0  # picks code 0 -> (0 - 8) * 0.5 + 1 = -3
    x[0, 15] = 1.0  # code 15 -> (15 - 8) * 0.5 + 1 = 4.5
    y = torch._weight_int4pack_mm_for_cpu(x, packed, 32, scales_and_zeros)
    assert torch.allclose(y, torch.full((1, 16), -3.0 + 4.5))


def test_group_size_must_divide():
    with pytest.raises(ValueError, match="does not divide"):
        kernels.pack_weight(_weight(in_features=96), "int4", group_size=64)


def test_int4_shape_rules_are_explained():
    with pytest.raises(ValueError, match="multiple of 16"):
        kernels.pack_weight(_weight(out_features=40), "int4", group_size=64)


def test_unknown_format_is_reported():
    assert "unknown format" in kernels.kernel_support("int3", "cpu")
    with pytest.raises(RuntimeError, match="cannot run"):
        kernels.pack_weight(_weight(), "int3")


class _FakeClock:
    """Stands in for the ``time`` module inside ``course_utils.timing``: ``perf_counter`` reads a clock that
    moves only by what the patched kernels below add, so every time the sweeps measure is known."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    """A fake clock, and every GEMV (a ``PackedWeight`` call) taking a scripted time on it.

    ``clock.gbps[fmt]``: a GEMV in ``fmt`` takes its weight bytes / (that many GB/s); ``clock.gflops``: a
    float32 matmul of m rows takes 2 * m * n * k FLOPs / (that many GFLOP/s) instead, when set. Each call is
    logged as (fmt, id of the weight tensor, rows of x)."""
    from course_utils import timing

    fake = _FakeClock()
    fake.gbps, fake.gflops, fake.calls = {"fp32": 20.0, "int8": 10.0, "int4": 5.0}, None, []
    real_call = kernels.PackedWeight.__call__

    def timed_call(self, x):
        out = real_call(self, x)
        fake.calls.append((self.fmt, id(self.tensors["weight"]), x.shape[0]))
        if fake.gflops is not None:
            fake.now += 2 * x.shape[0] * self.out_features * self.in_features / (fake.gflops * 1e9)
        else:
            fake.now += self.nbytes / (fake.gbps[self.fmt] * 1e9)
        return out

    monkeypatch.setattr(timing, "time", fake)
    monkeypatch.setattr(kernels.PackedWeight, "__call__", timed_call)
    return fake


def test_time_gemv_cycles_through_copies_and_times_each_call(clock):
    w = _weight(256, 512)
    packed = kernels.pack_weight(w, "int8")  # 256 * 512 codes + 256 bf16 scales
    timing = kernel_sweeps.time_gemv(packed, warmup=1, repeat=3, rotate_bytes=4 * packed.nbytes)
    # 4 copies cover rotate_bytes: the warm-up calls each of them once (warmup is raised to the copy count)
    weights = [weight for _, weight, _ in clock.calls]
    assert len(weights) == 4 + 3 and len(set(weights)) == 4 and weights[4:] == weights[:3]  # round and round
    assert timing.samples_s == pytest.approx((packed.nbytes / 10e9,) * 3, rel=1e-9)  # at the scripted 10 GB/s


def test_gemv_sweep_gives_bytes_over_the_median_time_and_its_fraction_of_the_probe(clock, monkeypatch):
    probe_reads = []

    def probe(n_bytes, device):
        n_read = 2**20

        def read():
            probe_reads.append(n_read)
            clock.now += n_read / 40e9  # the probe reads at 40 GB/s

        return read, n_read

    monkeypatch.setattr(kernel_sweeps, "read_probe", probe)
    sweep = kernel_sweeps.gemv_sweep(256, 512, [("fp32", None), ("int4", torch.bfloat16)], group_size=128,
                                     rounds=2, repeat=3, rotate_bytes=2**20)
    assert [t.label for t in sweep.timings] == ["fp32", "int4 (bf16 input)"] and sweep.skipped == {}
    fp32, int4 = sweep.by_label()["fp32"], sweep.by_label()["int4 (bf16 input)"]
    # fp32: 4 bytes a weight; int4: half a byte, plus a bf16 scale and zero per group of 128 per row
    assert fp32.nbytes == 256 * 512 * 4 and int4.nbytes == 256 * 512 // 2 + 256 * (512 // 128) * 2 * 2
    assert len(fp32.timing.samples_s) == len(int4.timing.samples_s) == 2 * 3 and len(probe_reads) == 2 + 2 * 3
    assert fp32.gbps == pytest.approx(20.0, rel=1e-9) and int4.gbps == pytest.approx(5.0, rel=1e-9)
    assert sweep.bandwidth.gbps == pytest.approx(40.0, rel=1e-9) and sweep.bandwidth.n_bytes == 2**20
    assert sweep.speed_of_light_fraction("fp32") == pytest.approx(20 / 40)
    assert sweep.speed_of_light_fraction("int4 (bf16 input)") == pytest.approx(5 / 40)


def test_gemv_timing_is_bytes_over_the_median_sample():
    from course_utils.timing import BenchmarkResult

    t = kernel_sweeps.GemvTiming("int8 (bf16 input)", "int8", "bf16", 3_000_000, BenchmarkResult((0.001, 0.004, 0.002)))
    assert t.median_s == 0.002 and t.gbps == pytest.approx(3e6 / 0.002 / 1e9)  # 1.5 GB/s: the median, not the mean


def test_batch_sweep_counts_2mnk_flops_over_the_median_time(clock):
    clock.gflops = 50.0
    rows = kernel_sweeps.matmul_batch_sweep(64, 128, [1, 4], dtype=torch.float32, rounds=1, repeat=2, rotate_bytes=2**20)
    assert [r.m for r in rows] == [1, 4]
    # x: (m, 128) @ W.T: (128, 64): 2 * m * n * k FLOPs (a multiply-add is two); float32: 4-byte operands
    assert [r.cost.flops for r in rows] == [2 * 1 * 64 * 128, 2 * 4 * 64 * 128]
    assert rows[1].cost.total_bytes == 4 * (64 * 128 + 4 * 128 + 4 * 64)
    assert {m for _, _, m in clock.calls} == {1, 4} and all(len(r.timing.samples_s) == 2 for r in rows)
    assert [r.gflops for r in rows] == pytest.approx([50.0, 50.0], rel=1e-9)
    assert rows[1].timing.median_s == pytest.approx(4 * rows[0].timing.median_s, rel=1e-9)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fmt", ["fp16", "int8", "int4"])
def test_cuda_kernels_match_dequantized_matmul(fmt):
    w = _weight(256, 512).cuda()
    reason = kernels.kernel_support(fmt, "cuda")
    if reason:
        pytest.skip(reason)
    packed = kernels.pack_weight(w, fmt, group_size=64)
    x = kernels.gemv_input(512, packed.act_dtype, "cuda", seed=3)
    assert _rel(packed(x), x.float() @ packed.dequantize().T) < 1e-2
