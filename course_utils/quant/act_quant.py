"""Activations in 8 bits: int8 or FP8 E4M3, one scale per tensor, per token or per channel.

A Linear's input ``x`` (tokens, in) changes with every prompt, so its scale is either fixed beforehand
from calibration text (*static*, one number per tensor) or computed from the tensor itself as it arrives
(*dynamic*, one number per token: the largest magnitude of each row). Both are cheap in a matmul, because
a scale per row of ``x`` (and per column of the output) factors out of the product's sum:
``y[t, o] = sx[t] * sw[o] * sum_j qx[t, j] * qw[o, j]``.

A scale per *channel* (per column ``j`` of ``x``) sits inside that sum, so no integer or FP8 matmul can
apply it afterwards: it is simulated here to show what it would buy (it isolates the outlier channels
of lesson 06), and is labelled so wherever it is used. SmoothQuant (:mod:`course_utils.quant.smoothquant`)
moves those per-channel magnitudes into the weights, where a per-channel scale is free.

(:func:`course_utils.quant.llm_int8.absmax_int8` is the int8 per-row/per-tensor case LLM.int8 uses, with
its own order of float operations that lesson 06 checks against bitsandbytes; this module adds FP8 and the
per-channel scale.) ``int8`` is symmetric, codes -127..127, ``scale = amax / 127``; ``fp8`` is E4M3 (largest 448),
``scale = amax / 448``, the scaled value rounded by torch's float8 cast (to nearest, ties to even).
"""

from __future__ import annotations

import torch

from course_utils.quant.contract import check_finite

DTYPES = {"int8": 127.0, "fp8": 448.0}  # the largest code of each, what amax maps to
GRANULARITIES = ("tensor", "token", "channel")


def check_dtype(dtype: str) -> float:
    """The largest code of ``dtype`` ("int8" or "fp8"); ``ValueError`` for another name."""
    if dtype not in DTYPES:
        raise ValueError(f"8-bit activations are int8 or fp8 (E4M3), got {dtype!r}")
    return DTYPES[dtype]


def absmax_scale(x: torch.Tensor, dtype: str = "int8", granularity: str = "token") -> torch.Tensor:
    """The scale of ``x`` (..., in) for ``dtype``: its largest magnitude over the tensor (shape ()), over each
    token's row (shape (..., 1)) or over each channel across all tokens (shape (in,)), divided by the
    largest code. A zero amax gives scale 1 (the values are zeros anyway)."""
    qmax = check_dtype(dtype)
    a = x.detach().float().abs()
    if granularity == "tensor":
        amax = a.amax()
    elif granularity == "token":
        amax = a.amax(-1, keepdim=True)
    elif granularity == "channel":
        amax = a.reshape(-1, a.shape[-1]).amax(0)
    else:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    return torch.where(amax > 0, amax / qmax, torch.ones_like(amax))


def quantize(x: torch.Tensor, scale: torch.Tensor, dtype: str = "int8") -> torch.Tensor:
    """The 8-bit codes of ``x / scale``: int8 (rounded half to even, clamped to +-127) or float8_e4m3fn
    (clamped to +-448, then cast). ``scale`` broadcasts against ``x``; a static scale smaller than the
    tensor needs is the clamp's business (values beyond it saturate)."""
    qmax = check_dtype(dtype)
    check_finite(x, "the activations")
    scaled = (x.float() / scale).clamp(-qmax, qmax)
    return scaled.round().to(torch.int8) if dtype == "int8" else scaled.to(torch.float8_e4m3fn)


def fake_quantize(x: torch.Tensor, dtype: str = "int8", granularity: str = "token",
                  scale: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` rounded to 8 bits and back, in ``x``'s dtype: what a W8A8 layer's matmul sees. ``scale``: a
    fixed (static) scale; default: :func:`absmax_scale` of ``x`` itself at ``granularity``."""
    s = absmax_scale(x, dtype, granularity) if scale is None else scale
    return (quantize(x, s, dtype).float() * s).to(x.dtype)
