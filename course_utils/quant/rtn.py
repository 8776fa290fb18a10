"""Round-to-nearest (RTN) quantization of a weight matrix, with integer codes, scales and zero points.

A weight ``W`` of shape (out_features, in_features) is cut into groups along the input dimension
(``group_size`` columns, or one group per row = per channel, or one group for the whole tensor).
Each group gets a scale (and, asymmetric, a zero point) and each weight becomes an integer code:

- symmetric (absmax): ``scale = clip * max|w| / (2**(b-1) - 1)``, ``q = round(w / scale)`` in
  ``[-(2**(b-1) - 1), 2**(b-1) - 1]``, ``w ~ q * scale``;
- asymmetric (zero-point): ``scale = clip * (max w - min w) / (2**b - 1)``,
  ``z = round(-clip * min w / scale)``, ``q = clamp(round(w / scale) + z, 0, 2**b - 1)``, ``w ~ (q - z) * scale``.

The symmetric grid leaves one of the 2**b codes unused (-8 for 4 bits: 15 levels). ``full_grid=True``
uses it by llama.cpp's Q4_0 rule: ``scale = -clip * m / 2**(b-1)`` with ``m`` the group's value of largest
magnitude, sign kept, so that ``m`` lands on code ``-2**(b-1)`` exactly and the codes span
``[-2**(b-1), 2**(b-1) - 1]``; the scale is negative when ``m`` is positive. (llama.cpp's Q8_0 does not: it
uses ``max|w| / 127``.) The codes are not bit for bit llama.cpp's: it rounds halves up and multiplies by the
reciprocal of the scale, this module rounds halves to even and divides, so a few ties differ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from course_utils.quant.contract import check_finite

Granularity = int | str  # a group size, "channel" or "tensor"


@dataclass(frozen=True)
class QuantizedTensor:
    """Integer codes and the constants to turn them back into floats.

    ``codes``: (out, in) int16, signed for symmetric, 0..2**bits-1 for asymmetric.
    ``scales``: (out, n_groups) float32. ``zeros``: (out, n_groups) int16 or None (symmetric).
    ``group_size``: columns per group (``in`` for per channel and per tensor; per tensor repeats its
    single scale on every row).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bits: int
    group_size: int
    symmetric: bool

    def dequantize(self) -> torch.Tensor:
        """Float32 weight (out, in) reconstructed from codes, scales and zero points."""
        out, cols = self.codes.shape
        q = self.codes.float().view(out, cols // self.group_size, self.group_size)
        if self.zeros is not None:
            q = q - self.zeros.float().unsqueeze(-1)
        return (q * self.scales.unsqueeze(-1)).reshape(out, cols)


def check_bits(bits: int) -> None:
    """Raise ``ValueError`` unless ``bits`` is an integer from 2 to 8."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer from 2 to 8, got {bits!r}")


def resolve_group_size(granularity: Granularity, in_features: int) -> int:
    """Columns per group for ``granularity``: an int that divides ``in_features``, "channel" or "tensor".

    A group size that does not divide the input dimension is refused (not padded): the message lists
    the divisors that would work. "tensor" returns ``in_features`` too; per-tensor quantization also
    shares the scale across rows (see :func:`quantize`).
    """
    if granularity in ("channel", "tensor"):
        return in_features
    if isinstance(granularity, bool) or not isinstance(granularity, int) or granularity <= 0:
        raise ValueError(f"group size must be a positive int, 'channel' or 'tensor', got {granularity!r}")
    if in_features % granularity:
        divisors = [d for d in (16, 32, 48, 64, 96, 128, 192, 256) if in_features % d == 0]
        raise ValueError(
            f"group size {granularity} does not divide in_features={in_features}; this quantizer refuses "
            f"rather than pads. Use a divisor, e.g. {divisors or [in_features]}, or 'channel'"
        )
    return granularity


def _check_weight(weight: torch.Tensor) -> None:
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight (out_features, in_features), got shape {tuple(weight.shape)}")
    check_finite(weight, "the weight")


def quantize(
    weight: torch.Tensor,
    bits: int = 4,
    group_size: Granularity = 64,
    symmetric: bool = True,
    clip_ratio: float | torch.Tensor = 1.0,
    full_grid: bool = False,
) -> QuantizedTensor:
    """Round-to-nearest quantization of ``weight`` (out, in); see the module docstring for the formulas.

    ``clip_ratio`` (0 < r <= 1) shrinks each group's range before rounding: a float for all groups, or
    a tensor broadcastable to (out, n_groups) from :func:`search_clip_ratio`. ``full_grid``: symmetric
    codes on all 2**bits levels (see the module docstring); ``ValueError`` with ``symmetric=False``.
    """
    check_grid(symmetric, full_grid)
    check_bits(bits)
    _check_weight(weight)
    out, cols = weight.shape
    g = resolve_group_size(group_size, cols)
    w = weight.detach().float().reshape(out, cols // g, g)
    if group_size == "tensor":
        w = weight.detach().float().reshape(1, 1, -1)
    ratio = torch.as_tensor(clip_ratio, dtype=torch.float32, device=w.device)
    if symmetric and full_grid:
        half = 2 ** (bits - 1)
        extreme = w.gather(-1, w.abs().argmax(-1, keepdim=True)).squeeze(-1)
        scales = nonzero_scale(-extreme * ratio / half)
        codes = torch.round(w / scales.unsqueeze(-1)).clamp(-half, half - 1)
        zeros = None
    elif symmetric:
        qmax = 2 ** (bits - 1) - 1
        scales = (w.abs().amax(-1) * ratio / qmax).clamp(min=1e-12)
        codes = torch.round(w / scales.unsqueeze(-1)).clamp(-qmax, qmax)
        zeros = None
    else:
        qmax = 2**bits - 1
        lo = w.amin(-1).clamp(max=0) * ratio
        hi = w.amax(-1).clamp(min=0) * ratio
        scales = ((hi - lo) / qmax).clamp(min=1e-12)
        zeros = torch.round(-lo / scales).clamp(0, qmax)
        codes = (torch.round(w / scales.unsqueeze(-1)) + zeros.unsqueeze(-1)).clamp(0, qmax)
        zeros = zeros.to(torch.int16)
    codes = codes.reshape(out, cols).to(torch.int16)
    if group_size == "tensor":  # one scale for the whole tensor, stored once per row for uniformity
        scales = scales.reshape(1, 1).expand(out, 1)
        zeros = None if zeros is None else zeros.reshape(1, 1).expand(out, 1)
    return QuantizedTensor(codes, scales.float().contiguous(), zeros if zeros is None else zeros.contiguous(), bits, g, symmetric)


def check_grid(symmetric: bool, full_grid: bool) -> None:
    """``ValueError`` for ``full_grid`` without ``symmetric``: a zero-point grid already uses every code."""
    if full_grid and not symmetric:
        raise ValueError("full_grid applies to the symmetric grid; the zero-point grid already uses all 2**bits codes")


def code_range(bits: int, symmetric: bool, full_grid: bool = False) -> tuple[int, int]:
    """Smallest and largest code: symmetric ``(-(2**(b-1) - 1), 2**(b-1) - 1)``, or ``(-2**(b-1), ...)`` on
    the full grid; zero-point ``(0, 2**b - 1)``."""
    if not symmetric:
        return 0, 2**bits - 1
    half = 2 ** (bits - 1)
    return (-half if full_grid else -(half - 1)), half - 1


def nonzero_scale(scales: torch.Tensor) -> torch.Tensor:
    """``scales`` (of either sign) with magnitudes below 1e-12 set to 1e-12 (an all-zero group)."""
    return torch.where(scales.abs() < 1e-12, torch.full_like(scales, 1e-12), scales)


def fake_quantize(
    weight: torch.Tensor, bits: int = 4, group_size: Granularity = 64, symmetric: bool = True, clip_ratio: float | torch.Tensor = 1.0
) -> torch.Tensor:
    """``weight`` quantized and dequantized again (same shape and dtype): what the model will compute with."""
    return quantize(weight, bits, group_size, symmetric, clip_ratio).dequantize().to(weight.dtype)


def search_clip_ratio(
    weight: torch.Tensor,
    bits: int = 4,
    group_size: Granularity = 64,
    symmetric: bool = True,
    inputs: torch.Tensor | None = None,
    grid: int = 20,
    min_ratio: float = 0.5,
    full_grid: bool = False,
) -> torch.Tensor:
    """Best clip ratio per group, from ``grid`` ratios between ``min_ratio`` and 1.

    Without ``inputs`` the error is each group's squared weight error. With ``inputs`` (n, in) the error
    is the group's contribution to the output error ``||(W - W_q) X^T||^2``, a cheaper proxy that
    weighs each column by its input energy (diagonal of ``X^T X``). Returns (out, n_groups) float32.
    """
    check_bits(bits)
    _check_weight(weight)
    out, cols = weight.shape
    if group_size == "tensor":
        raise ValueError("clip search works per group or per channel, not per tensor")
    g = resolve_group_size(group_size, cols)
    w = weight.detach().float()
    energy = torch.ones(cols) if inputs is None else inputs.detach().float().reshape(-1, cols).pow(2).mean(0)
    energy = energy.to(w.device).view(1, cols // g, g)
    best_err = torch.full((out, cols // g), math.inf, device=w.device)
    best = torch.ones(out, cols // g, device=w.device)
    for r in torch.linspace(min_ratio, 1.0, grid).tolist():
        err = ((quantize(w, bits, g, symmetric, r, full_grid).dequantize() - w).view(out, cols // g, g).pow(2) * energy).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, r), best)
    return best
