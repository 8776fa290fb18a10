"""Microscaling 4-bit floats, from scratch: MXFP4 (OCP) and NVFP4 (NVIDIA).

Both formats store each weight as a 4-bit float E2M1 (1 sign bit, 2 exponent bits, 1 mantissa bit, no
infinity or NaN), whose magnitudes are 0, 0.5, 1, 1.5, 2, 3, 4 and 6, times a scale shared by a small
block of consecutive weights of a row. They differ in the block and in the scale:

=======  =====  ================================================  ===========================
format   block  scale                                             bits per weight
=======  =====  ================================================  ===========================
MXFP4    32     a power of two, one byte E8M0 (exponent, bias      4 + 8/32 = 4.25
                127; byte 255 is NaN)
NVFP4    16     an FP8 E4M3 number per block, times one FP32       4 + 8/16 = 4.5 (+ 32 bits
                number per tensor                                  per tensor)
=======  =====  ================================================  ===========================

MXFP4 (OCP Microscaling Formats specification v1.0, 2023): the block's scale is
``2**(floor(log2(amax)) - 2)`` (2 is the exponent of E2M1's largest value, 6 = 1.5 * 2**2), so the
largest magnitude lands in [4, 8) and values above 6 saturate to 6. An exponent below -127 (a block whose
largest magnitude is below 2**-125) takes E8M0's smallest scale 2**-127; an all-zero block too.

NVFP4 (as NVIDIA's Blackwell GPUs read it, and as compressed-tensors writes it): a tensor scale
``global = 448 * 6 / amax(tensor)`` (float32; 448 is E4M3's largest value) first stretches the
tensor so that its block scales use E4M3's whole range; each block scale is ``amax(block) / 6 * global``
rounded to E4M3; a weight is ``e2m1 * block_scale / global``.

Rounding an element to E2M1 (``rounding``):

- ``"even"``: to nearest, ties to the even mantissa (0.75 -> 1, 1.75 -> 2, 3.5 -> 4, 5 -> 4), a negative
  value that rounds to zero keeps its sign (-0): what compressed-tensors does, IEEE-style rounding;
- ``"llama.cpp"``: to nearest, ties toward the smaller magnitude (0.75 -> 0.5, 1.75 -> 1.5, 3.5 -> 3),
  and zero is always +0: what llama.cpp's (and ``gguf.quants``') MXFP4 quantizer does.

The two differ only on exact ties and on the sign of zero; the tests check each against its library.
There is no FP4 matmul on a CPU: :class:`MicroscaledLinear` rebuilds the float weight (it saves memory,
not time). Real FP4 speed needs a GPU with FP4 tensor cores (NVIDIA Blackwell).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from course_utils.quant import packing
from course_utils.quant.contract import QuantizedLayer, Report, check_finite, convert

# E2M1 in code order: bit 3 is the sign, bits 2-1 the exponent (bias 1), bit 0 the mantissa.
E2M1_VALUES: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                                  -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
E2M1_MAX = 6.0
E4M3_MAX = 448.0
E8M0_BIAS = 127
ROUNDINGS = ("even", "llama.cpp")


@dataclass(frozen=True)
class MicroFormat:
    """A microscaling format: ``block_size`` elements per scale, the scale's encoding ("e8m0" or "e4m3")
    and whether a float32 scale per tensor multiplies the block scales."""

    name: str
    block_size: int
    scale_encoding: str
    tensor_scale: bool

    @property
    def bits_per_weight(self) -> float:
        """Bits per weight: 4 for the element plus the 8-bit scale shared by a block (the tensor scale,
        32 bits for a whole tensor, is left out)."""
        return 4 + 8 / self.block_size


FORMATS: dict[str, MicroFormat] = {
    "mxfp4": MicroFormat("mxfp4", 32, "e8m0", False),
    "nvfp4": MicroFormat("nvfp4", 16, "e4m3", True),
}

_MIDPOINTS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])  # between consecutive E2M1 magnitudes


def get_format(name: str) -> MicroFormat:
    """The :class:`MicroFormat` called ``name`` ("mxfp4" or "nvfp4", case-insensitive)."""
    key = str(name).lower()
    if key not in FORMATS:
        raise ValueError(f"unknown microscaling format {name!r}; known: {', '.join(FORMATS)}")
    return FORMATS[key]


def _check_rounding(rounding: str) -> None:
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")


def e2m1_codes(scaled: torch.Tensor, rounding: str = "even") -> torch.Tensor:
    """The 4-bit E2M1 code (uint8, 0..15, same shape) of each value of ``scaled`` (values already divided
    by their block's scale), rounded to the nearest E2M1 value as ``rounding`` says, saturating at +-6."""
    _check_rounding(rounding)
    mag = scaled.abs().clamp(max=E2M1_MAX)
    mids = _MIDPOINTS.to(device=scaled.device, dtype=mag.dtype)
    code = torch.bucketize(mag, mids)  # a value exactly on a midpoint goes to the smaller magnitude
    if rounding == "even":
        on_tie = mag == mids[code.clamp(max=len(mids) - 1)]
        code = code + (on_tie & (code % 2 == 1)).long()  # an odd code has mantissa 1: take the even one
        negative = torch.signbit(scaled)
    else:
        negative = (scaled < 0) & (code > 0)
    return (code | (negative.long() << 3)).to(torch.uint8)


def e2m1_values(codes: torch.Tensor) -> torch.Tensor:
    """The float32 value of each E2M1 code (uint8, 0..15)."""
    return torch.tensor(E2M1_VALUES, device=codes.device)[codes.long()]


def _check_blocks(tensor: torch.Tensor, block_size: int) -> None:
    check_finite(tensor, "the tensor")
    if tensor.dim() == 0 or tensor.shape[-1] % block_size:
        width = tensor.shape[-1] if tensor.dim() else 1
        raise ValueError(f"a row of {width} values cannot be cut into blocks of {block_size}; "
                         f"this format defines blocks of {block_size} only and the course does not pad")


def e8m0_exponents(block_amax: torch.Tensor) -> torch.Tensor:
    """MXFP4's scale byte per block (uint8): ``floor(log2(amax)) - 2 + 127``, clamped to 0..254.

    ``floor(log2(amax))`` is computed exactly from the float's exponent (``torch.frexp``), not from a
    rounded logarithm. A zero block gets byte 0 (scale 2**-127)."""
    _, e = torch.frexp(block_amax.float())  # amax = m * 2**e with m in [0.5, 1): floor(log2 amax) = e - 1
    shared = torch.where(block_amax > 0, e - 1 - 2, torch.full_like(e, -E8M0_BIAS))
    return (shared.clamp(-E8M0_BIAS, E8M0_BIAS) + E8M0_BIAS).to(torch.uint8)


def e8m0_scales(exponents: torch.Tensor) -> torch.Tensor:
    """The float32 scale ``2**(byte - 127)`` of each E8M0 byte (255, NaN, is refused)."""
    if bool((exponents == 255).any()):
        raise ValueError("E8M0 byte 255 is NaN: a valid MXFP4 block never has it")
    return torch.ldexp(torch.ones(exponents.shape, device=exponents.device), exponents.long() - E8M0_BIAS)


def nvfp4_tensor_scale(tensor: torch.Tensor) -> torch.Tensor:
    """NVFP4's float32 scale per tensor, ``448 * 6 / amax`` (shape (1,)); 1 for an all-zero tensor.

    Computed as 2688 times the float32 reciprocal of amax, the order of operations compressed-tensors
    uses (a division by amax can differ from it in the last bit)."""
    amax = tensor.detach().float().abs().amax().clamp(min=torch.finfo(torch.float32).tiny)
    scale = amax.reciprocal() * (E4M3_MAX * E2M1_MAX)
    return torch.nan_to_num(scale, nan=1.0, posinf=1.0).reshape(1)


@dataclass(frozen=True)
class Microscaled:
    """A tensor (..., n) in MXFP4 or NVFP4: ``codes`` (..., n) uint8 E2M1 codes; ``scales`` (..., n / block):
    uint8 E8M0 bytes (MXFP4) or float8_e4m3fn (NVFP4); ``tensor_scale`` (1,) float32 (NVFP4) or None."""

    codes: torch.Tensor
    scales: torch.Tensor
    tensor_scale: torch.Tensor | None
    fmt: str
    dtype: torch.dtype = torch.float32

    def block_scales(self) -> torch.Tensor:
        """The float32 multiplier of each block (..., n / block): what an element's E2M1 value is times."""
        if get_format(self.fmt).scale_encoding == "e8m0":
            return e8m0_scales(self.scales)
        return self.scales.float() / self.tensor_scale

    def dequantize(self) -> torch.Tensor:
        """The tensor rebuilt: each element's E2M1 value times its block's scale, in ``dtype``."""
        block = get_format(self.fmt).block_size
        values = e2m1_values(self.codes).unflatten(-1, (-1, block))
        return (values * self.block_scales().unsqueeze(-1)).flatten(-2).to(self.dtype)

    def packed(self) -> torch.Tensor:
        """Codes two per byte, consecutive pairs, the first in the low nibble (compressed-tensors' layout)."""
        return packing.pack(self.codes.reshape(-1), 4)


def quantize(tensor: torch.Tensor, fmt: str = "mxfp4", rounding: str = "even") -> Microscaled:
    """``tensor`` (..., n) in MXFP4 or NVFP4, blocks of consecutive values along the last dimension.

    Refuses NaN and infinity, and a last dimension that the format's block does not divide."""
    f = get_format(fmt)
    _check_rounding(rounding)
    _check_blocks(tensor, f.block_size)
    x = tensor.detach().float()
    blocks = x.unflatten(-1, (-1, f.block_size))
    amax = blocks.abs().amax(-1)
    if f.scale_encoding == "e8m0":
        scales = e8m0_exponents(amax)
        multiplier, tensor_scale = e8m0_scales(scales), None
    else:
        tensor_scale = nvfp4_tensor_scale(x)
        scales = (amax / E2M1_MAX * tensor_scale).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)
        multiplier = scales.float() / tensor_scale
    safe = torch.where(multiplier > 0, multiplier, torch.ones_like(multiplier))  # a zero scale: all codes 0
    codes = e2m1_codes(blocks / safe.unsqueeze(-1), rounding).flatten(-2)
    return Microscaled(codes, scales, tensor_scale, f.name, tensor.dtype)


def to_gguf_mxfp4(q: Microscaled) -> torch.Tensor:
    """The GGUF MXFP4 blocks of ``q`` (n_blocks, 17) uint8: the E8M0 byte, then 16 bytes whose low nibble
    is the block's element j and high nibble its element j + 16 (llama.cpp's ``block_mxfp4``)."""
    if q.fmt != "mxfp4":
        raise ValueError(f"GGUF's MXFP4 blocks hold MXFP4, not {q.fmt}")
    codes = q.codes.reshape(-1, 32)
    return torch.cat([q.scales.reshape(-1, 1), codes[:, :16] | (codes[:, 16:] << 4)], dim=1)


# --------------------------------------------------------------------------- a microscaled Linear layer


class MicroscaledLinear(QuantizedLayer):
    """``nn.Linear`` replacement storing its weight (out, in) in MXFP4 or NVFP4, blocks along ``in``.

    Buffers: ``packed`` (uint8, two codes per byte), ``scales`` (uint8 E8M0 or float8_e4m3fn, (out, in /
    block)), ``tensor_scale`` (NVFP4). ``forward`` rebuilds the float weight and calls ``F.linear``: no
    CPU has an FP4 matmul, so the layer shows the format's quality and size, not its speed."""

    def __init__(self, linear: nn.Linear, fmt: str = "mxfp4", rounding: str = "even"):
        super().__init__()
        q = quantize(linear.weight.detach(), fmt, rounding)
        self.out_features, self.in_features = linear.weight.shape
        self.fmt, self.rounding, self.compute_dtype = q.fmt, rounding, linear.weight.dtype
        self.register_buffer("packed", q.packed())
        self.register_buffer("scales", q.scales)
        self.register_buffer("tensor_scale", q.tensor_scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def quantized(self) -> Microscaled:
        """The layer's weight as a :class:`Microscaled` tensor."""
        n = self.out_features * self.in_features
        codes = packing.unpack(self.packed, 4, n).view(self.out_features, self.in_features)
        return Microscaled(codes, self.scales, self.tensor_scale, self.fmt, self.compute_dtype)

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight (out, in) this layer computes with."""
        return self.quantized().dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.fmt}, rounding={self.rounding}"


@dataclass(frozen=True)
class MicroscaleConfig:
    """MXFP4 or NVFP4 for every Linear (``fmt``), with ``rounding`` "even" or "llama.cpp" (see the module)."""

    method: ClassVar[str] = "microscaling"
    needs_calibration: ClassVar[bool] = False

    fmt: str = "mxfp4"
    rounding: str = "even"

    def __post_init__(self):
        get_format(self.fmt)
        _check_rounding(self.rounding)

    def label(self) -> str:
        """Short name such as ``mxfp4`` or ``nvfp4 llama.cpp``."""
        return self.fmt + ("" if self.rounding == "even" else f" {self.rounding}")

    @property
    def bits_per_weight(self) -> float:
        return get_format(self.fmt).bits_per_weight


def quantize_model(model: nn.Module, config: MicroscaleConfig = MicroscaleConfig(), calibration: torch.Tensor | None = None,
                   skip: tuple[str, ...] = ("lm_head",)) -> Report:
    """Replace every ``nn.Linear`` (except names containing a ``skip`` entry) by :class:`MicroscaledLinear`,
    in place. ``calibration`` is not used. Returns a :class:`~course_utils.quant.contract.Report`."""
    make = lambda linear: MicroscaledLinear(linear, config.fmt, config.rounding)  # noqa: E731
    return convert(model, config, make, skip)[1]

