"""4-bit NormalFloat (NF4) and 4-bit float (FP4) with blockwise absmax, and double quantization.

A tensor is read as one flat sequence (row-major) and cut into blocks of ``block_size`` values (64 by
default). Each block keeps its largest magnitude ``absmax`` (float32); each value becomes the 4-bit
code of the level nearest to ``value / absmax`` in a table of 16 levels in [-1, 1]:

- NF4 (QLoRA): the levels are quantiles of a standard normal distribution, rescaled so that the
  largest is 1, with an exact zero (:func:`nf4_levels_from_normal` derives them);
- FP4: a 4-bit float (1 sign, 2 exponent, 1 mantissa bit) rescaled so that its largest value is 1.

Double quantization stores the absmax constants themselves in 8 bits (blocks of 256, after
subtracting their mean), which takes them from 32/64 = 0.5 to about 0.127 bits per parameter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from course_utils.formats import FP4_LEVELS, NF4_LEVELS
from course_utils.quant import packing
from course_utils.quant.contract import QuantizedLayer, Report, check_finite, convert

QUANT_TYPES = ("nf4", "fp4")



def nf4_levels_from_normal(offset: float = 0.9677083) -> torch.Tensor:
    """Derive the 16 NF4 levels (float32, ascending) from quantiles of a standard normal N(0, 1).

    8 positive levels are the normal quantiles at 8 equally spaced probabilities from ``offset`` down
    to (not including) 0.5; 7 negative levels likewise with 7 probabilities; plus an exact 0. The
    ``offset`` (about 1 - 1/(2*15) + a little) keeps the outermost quantile finite. Dividing by the
    largest magnitude puts the levels in [-1, 1].
    """
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    pos = normal.icdf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -normal.icdf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([pos, neg, torch.zeros(1, dtype=torch.float64)]).sort().values
    return (levels / levels.abs().max()).float()


def levels(quant_type: str) -> torch.Tensor:
    """The 16 levels of ``quant_type`` ("nf4" or "fp4") in code order, float32 (code i -> levels[i])."""
    if quant_type == "nf4":
        return torch.tensor(NF4_LEVELS, dtype=torch.float32)
    if quant_type == "fp4":
        return torch.tensor(FP4_LEVELS, dtype=torch.float32)
    raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")


def check_block_size(n_values: int, block_size: int, what: str = "tensor") -> None:
    """Raise ``ValueError`` unless ``block_size`` is a positive int dividing ``n_values``."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive integer such as 64, got {block_size!r}")
    if n_values % block_size:
        fits = [b for b in (32, 64, 128, 256) if n_values % b == 0]
        raise ValueError(
            f"block size {block_size} does not divide the {what}'s {n_values} values; this quantizer refuses "
            f"rather than pads. Use a block size that divides it, e.g. {fits or [n_values]}"
        )


def nearest_code(scaled: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index (int64) of the nearest entry of ``table`` for each value of ``scaled``.

    Works on the sorted table: a value exactly halfway between two levels goes to the lower one.
    ``table`` may be in any order (FP4's code order is not ascending); the index refers to it.
    """
    order = torch.argsort(table)
    ordered = table[order]
    midpoints = (ordered[:-1] + ordered[1:]) / 2
    return order[torch.bucketize(scaled, midpoints)]


@dataclass(frozen=True)
class Blockwise4bit:
    """A tensor in 4 bits: ``codes`` (n,) uint8 in 0..15, flat row-major; ``absmax`` (n / block_size,)
    float32; the original ``shape`` and ``dtype``; ``block_size``; ``quant_type`` ("nf4" or "fp4")."""

    codes: torch.Tensor
    absmax: torch.Tensor
    shape: tuple[int, ...]
    block_size: int
    quant_type: str
    dtype: torch.dtype = torch.float32

    def dequantize(self) -> torch.Tensor:
        """The tensor rebuilt as ``levels[code] * absmax`` of its block, in ``shape`` and ``dtype``."""
        table = levels(self.quant_type).to(self.codes.device)
        values = table[self.codes.long()].view(-1, self.block_size) * self.absmax.view(-1, 1)
        return values.view(self.shape).to(self.dtype)

    def packed(self) -> torch.Tensor:
        """Codes packed two per byte with :mod:`course_utils.quant.packing` (first code in the low nibble)."""
        return packing.pack(self.codes, 4)


def quantize_4bit(tensor: torch.Tensor, block_size: int = 64, quant_type: str = "nf4") -> Blockwise4bit:
    """Blockwise absmax quantization of ``tensor`` (any shape) to NF4 or FP4 codes.

    Each block of ``block_size`` consecutive values (row-major) is divided by its absmax (as a
    multiplication by the float32 reciprocal, clamped to [-1, 1]) and each value gets the code of the
    nearest level. An all-zero block keeps absmax 0 and decodes to zeros.
    """
    table = levels(quant_type)
    check_finite(tensor, "the tensor")
    check_block_size(tensor.numel(), block_size)
    blocks = tensor.detach().float().reshape(-1, block_size)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).clamp(-1, 1)
    codes = nearest_code(scaled.reshape(-1), table.to(tensor.device)).to(torch.uint8)
    return Blockwise4bit(codes, absmax, tuple(tensor.shape), block_size, quant_type, tensor.dtype)


def to_bnb_layout(codes: torch.Tensor) -> torch.Tensor:
    """Pack codes two per byte the way bitsandbytes stores them: first code in the *high* nibble."""
    c = codes.reshape(-1).to(torch.uint8)
    if c.numel() % 2:
        c = torch.cat([c, c.new_zeros(1)])
    return (c[0::2] << 4) | c[1::2]


# ------------------------------------------------------------------------------- double quantization


def int8_levels() -> torch.Tensor:
    """The default table for the absmax constants: 255 evenly spaced levels k/127, k = -127..127."""
    return torch.arange(-127, 128, dtype=torch.float32) / 127


@dataclass(frozen=True)
class DoubleQuant:
    """Absmax constants stored in 8 bits: ``codes`` (n,) uint8 indexing ``table``; ``absmax2`` (n / block,)
    float32, one per block of ``block_size`` constants; ``offset``: the mean subtracted first."""

    codes: torch.Tensor
    absmax2: torch.Tensor
    offset: float
    block_size: int
    table: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        """The absmax constants (n,) float32, approximately."""
        values = self.table[self.codes.long()].view(-1, self.block_size) * self.absmax2.view(-1, 1)
        return values.reshape(-1) + self.offset


def double_quantize(absmax: torch.Tensor, block_size: int = 256, table: torch.Tensor | None = None) -> DoubleQuant:
    """Quantize the first-level ``absmax`` constants (n,) to 8-bit codes in blocks of ``block_size``.

    The mean is subtracted (the constants are all positive, so centring them uses both signs of the
    8-bit range), each block is divided by its own absmax and rounded to the nearest entry of
    ``table`` (at most 256 entries in [-1, 1]; default :func:`int8_levels`; bitsandbytes uses its
    8-bit "dynamic" table, which can be passed here to reproduce it).
    """
    table = int8_levels() if table is None else table.float()
    if table.numel() > 256:
        raise ValueError(f"an 8-bit code can index at most 256 levels, the table has {table.numel()}")
    check_block_size(absmax.numel(), block_size, "absmax vector")
    offset = float(absmax.float().mean())
    blocks = (absmax.float() - offset).reshape(-1, block_size)
    absmax2 = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax2.clamp(min=1e-38)).unsqueeze(1)).clamp(-1, 1)
    codes = nearest_code(scaled.reshape(-1), table).to(torch.uint8)
    return DoubleQuant(codes, absmax2, offset, block_size, table)


# --------------------------------------------------------------------------- a 4-bit Linear layer


class Linear4bitOwn(QuantizedLayer):
    """``nn.Linear`` replacement storing its weight (out, in) as packed 4-bit codes + absmax per block.

    Buffers: ``packed`` (uint8, two codes per byte), ``absmax`` (float32) or, with double
    quantization, ``absmax_codes`` (uint8) + ``absmax2`` (float32) + ``absmax_offset``. ``forward``
    rebuilds the float weight and calls ``F.linear``: it saves memory, not time.
    """

    def __init__(self, linear: nn.Linear, quant_type: str = "nf4", block_size: int = 64, double_quant: bool = False):
        super().__init__()
        q = quantize_4bit(linear.weight.detach(), block_size, quant_type)
        self.out_features, self.in_features = linear.weight.shape
        self.quant_type, self.block_size, self.double_quant = quant_type, block_size, double_quant
        self.compute_dtype = linear.weight.dtype
        self.register_buffer("packed", q.packed())
        dq_block = 256 if q.absmax.numel() % 256 == 0 else q.absmax.numel()
        if double_quant:
            dq = double_quantize(q.absmax, dq_block)
            self.register_buffer("absmax_codes", dq.codes)
            self.register_buffer("absmax2", dq.absmax2)
            self.register_buffer("absmax_offset", torch.tensor(dq.offset))
            self.dq_block = dq_block
        else:
            self.register_buffer("absmax", q.absmax)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def block_absmax(self) -> torch.Tensor:
        """The absmax per block (float32), decoded from 8 bits when double-quantized."""
        if not self.double_quant:
            return self.absmax
        dq = DoubleQuant(self.absmax_codes, self.absmax2, float(self.absmax_offset), self.dq_block, int8_levels())
        return dq.dequantize()

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight (out, in) this layer computes with."""
        n = self.out_features * self.in_features
        codes = packing.unpack(self.packed, 4, n)
        q = Blockwise4bit(codes, self.block_absmax(), (self.out_features, self.in_features), self.block_size,
                          self.quant_type, self.compute_dtype)
        return q.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.quant_type}, "
                f"block_size={self.block_size}, double_quant={self.double_quant}")


@dataclass(frozen=True)
class NF4Config:
    """Blockwise 4-bit for every Linear: ``quant_type`` ("nf4" or "fp4"), ``block_size`` weights per
    absmax, ``double_quant`` (the absmax constants in 8 bits)."""

    method: ClassVar[str] = "nf4"
    needs_calibration: ClassVar[bool] = False

    quant_type: str = "nf4"
    block_size: int = 64
    double_quant: bool = False

    def __post_init__(self):
        levels(self.quant_type)
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size <= 0:
            raise ValueError(f"block_size must be a positive integer such as 64, got {self.block_size!r}")

    def label(self) -> str:
        """Short name such as ``nf4 b64 dq``."""
        return f"{self.quant_type} b{self.block_size}{' dq' if self.double_quant else ''}"


def quantize_model(model: nn.Module, config: NF4Config = NF4Config(), calibration: torch.Tensor | None = None,
                   skip: tuple[str, ...] = ("lm_head",)) -> Report:
    """Replace every ``nn.Linear`` (except names containing a ``skip`` entry) by :class:`Linear4bitOwn`, in place.

    ``calibration`` is not used. Returns a :class:`~course_utils.quant.contract.Report`. Refuses a model
    that is already quantized (by this course's quantizers, by bitsandbytes or by transformers).
    """
    make = lambda linear: Linear4bitOwn(linear, config.quant_type, config.block_size, config.double_quant)  # noqa: E731
    return convert(model, config, make, skip)[1]
