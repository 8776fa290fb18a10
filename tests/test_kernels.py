"""The weight-only GEMV kernels compute the matmul of the weight they claim to store; their timing sweeps run."""

import pytest
import torch

from course_utils import kernel_sweeps, kernels


def _weight(out_features=96, in_features=256, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(out_features, in_features, generator=gen) * 0.05


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "fp16"])
def test_float_formats_cast_the_weight(fmt):
    w = _weight()
    packed = kernels.pack_weight(w, fmt)
    x = kernels.gemv_input(w.shape[1], packed.act_dtype)
    assert packed.nbytes == w.numel() * {"fp32": 4, "bf16": 2, "fp16": 2}[fmt]
    assert _rel(packed(x), x.float() @ packed.dequantize().T) < 1e-2
    assert _rel(packed.dequantize(), w) < 5e-3


@pytest.mark.parametrize("act_dtype", [torch.bfloat16, torch.float32])
def test_int8_kernel_equals_dequantized_matmul(act_dtype):
    w = _weight()
    packed = kernels.pack_weight(w, "int8", act_dtype=act_dtype)
    assert packed.tensors["weight"].dtype == torch.int8
    assert packed.nbytes == w.numel() + w.shape[0] * torch.finfo(act_dtype).bits // 8
    # the stored weight is within half a step (max|w| / 127 / 2) of the original, row by row
    step = w.abs().amax(dim=1, keepdim=True) / 127
    assert ((packed.dequantize() - w).abs() <= 0.51 * step + 1e-6).all()
    x = kernels.gemv_input(w.shape[1], act_dtype, seed=1)
    tolerance = 1e-5 if act_dtype == torch.float32 else 1e-2  # bf16 output rounding
    assert _rel(packed(x), x.float() @ packed.dequantize().T) < tolerance


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
    tolerance = 1e-5 if act_dtype == torch.float32 else 1e-2
    assert _rel(packed(x), x.float() @ packed.dequantize().T) < tolerance
    # 16 levels over each group's range: error at most about half a step
    ranges = w.reshape(w.shape[0], groups, group_size)
    step = (ranges.amax(-1) - ranges.amin(-1)) / 15
    err = (packed.dequantize() - w).reshape_as(ranges).abs().amax(-1)
    assert (err <= 0.5 * step * 1.1 + 1e-3 * step.max()).all()


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


def test_time_gemv_and_sweep():
    w = _weight(256, 512)
    timing = kernel_sweeps.time_gemv(kernels.pack_weight(w, "int8"), repeat=3, rotate_bytes=2**20)
    assert len(timing.samples_s) == 3 and timing.median_s > 0
    sweep = kernel_sweeps.gemv_sweep(256, 512, [("fp32", None), ("int4", torch.bfloat16)], rounds=2, repeat=2, rotate_bytes=2**20)
    labels = [t.label for t in sweep.timings]
    assert labels == ["fp32", "int4 (bf16 input)"]
    assert sweep.by_label()["fp32"].nbytes == 256 * 512 * 4
    assert sweep.bandwidth.gbps > 0
    assert sweep.speed_of_light_fraction("fp32") > 0


def test_batch_sweep_costs():
    rows = kernel_sweeps.matmul_batch_sweep(64, 128, [1, 4], dtype=torch.float32, rounds=1, repeat=2)
    assert [r.m for r in rows] == [1, 4]
    assert rows[1].cost.flops == 2 * 4 * 64 * 128
    assert all(r.gflops > 0 for r in rows)


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
