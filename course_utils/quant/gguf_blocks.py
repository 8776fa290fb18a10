"""llama.cpp's block formats, written out in numpy: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K and Q6_K.

A GGUF tensor is a row-major sequence of *blocks*; each block holds a few float16 constants and the
packed integer codes of ``block_size`` consecutive weights of one row. The "legacy" formats use blocks
of 32 weights:

==========  ====================================  ===============================  ==========
type        block bytes                           weight                           bits/wt
==========  ====================================  ===============================  ==========
Q8_0        d (f16), 32 x int8                    ``d * q``                        8.5
Q4_0        d, 16 bytes of nibbles                ``d * (q - 8)``                  4.5
Q4_1        d, m (f16), 16 bytes of nibbles       ``d * q + m``                    5.0
Q5_0        d, 4 bytes of high bits, 16 nibbles   ``d * (q - 16)``                 5.5
Q5_1        d, m, high bits, nibbles              ``d * q + m``                    6.0
==========  ====================================  ===============================  ==========

The "K-quants" use super-blocks of 256 weights split into sub-blocks whose own scales are quantized:

- Q4_K: 8 sub-blocks of 32; super-block ``d`` and ``dmin`` (f16) and, per sub-block, a 6-bit scale
  and a 6-bit min packed into 12 bytes; weight ``d * sc * q - dmin * m``, q in 0..15: 4.5 bits/wt.
- Q6_K: 16 sub-blocks of 16; int8 scale per sub-block and one f16 ``d``; q in 0..63 split into
  4 low bits and 2 high bits: weight ``d * sc * (q - 32)``: 6.5625 bits/wt.

The legacy quantizers here reproduce llama.cpp's reference quantizers bit for bit (including the
order of float32 operations and the rounding rules; the tests compare with ``gguf.quants``). For the
K-quants, dequantization is exact; the quantizers are the plain version of the idea (one min/max or
absmax pass, then the sub-block scales rounded up to their bit width), while llama.cpp searches each
sub-block's scale and min to lower the error. Comparing the two errors is part of lesson 09.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from course_utils import memory
from course_utils.quant.contract import check_finite


@dataclass(frozen=True)
class BlockFormat:
    """A block format: weights per block, bytes per block, and whether this module can quantize it."""

    name: str
    block_size: int
    block_bytes: int

    @property
    def bits_per_weight(self) -> float:
        return memory.stored_bits_per_weight(self.block_bytes, self.block_size)


FORMATS: dict[str, BlockFormat] = {
    f.name: f
    for f in (
        BlockFormat("Q8_0", 32, 2 + 32),
        BlockFormat("Q4_0", 32, 2 + 16),
        BlockFormat("Q4_1", 32, 2 + 2 + 16),
        BlockFormat("Q5_0", 32, 2 + 4 + 16),
        BlockFormat("Q5_1", 32, 2 + 2 + 4 + 16),
        BlockFormat("Q4_K", 256, 2 + 2 + 12 + 128),
        BlockFormat("Q6_K", 256, 128 + 64 + 16 + 2),
    )
}


def block_format(name: str) -> BlockFormat:
    """The :class:`BlockFormat` called ``name`` (case-insensitive); ``ValueError`` lists the known ones."""
    key = name.upper()
    if key not in FORMATS:
        raise ValueError(f"unknown block format {name!r}; this module knows {', '.join(FORMATS)}")
    return FORMATS[key]


# ----------------------------------------------------------------------------------------- helpers


def _to_blocks(values: np.ndarray, fmt: BlockFormat, name: str) -> np.ndarray:
    """float32 (n_blocks, block_size) view of ``values``; each row of ``values`` must fill whole blocks."""
    values = np.asarray(values, dtype=np.float32)
    row = values.shape[-1] if values.ndim else 0
    if values.ndim == 0 or row % fmt.block_size:
        raise ValueError(
            f"tensor {name!r} has rows of {row} values, not a multiple of {fmt.name}'s block of "
            f"{fmt.block_size}; llama.cpp gives such tensors another type (see lesson 09)"
        )
    return values.reshape(-1, fmt.block_size)


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    """float32 (n, 1) -> its float16 encoding as (n, 2) bytes (little-endian, like GGUF)."""
    return x.astype("<f2").view(np.uint8).reshape(x.shape[0], 2)


def _f16_from(raw: np.ndarray) -> np.ndarray:
    """(n, 2) bytes -> float32 (n, 1)."""
    return np.ascontiguousarray(raw).view("<f2").astype(np.float32).reshape(-1, 1)


def round_away(x: np.ndarray) -> np.ndarray:
    """C's ``roundf``: halves go away from zero (numpy's ``round`` sends them to the even neighbour).

    Written as floor + (fraction >= 1/2) rather than ``floor(|x| + 0.5)``: adding 0.5 in float32 can
    itself round up (0.49999997 + 0.5 == 1.0), the comparison cannot.
    """
    a = np.abs(x)
    whole = np.floor(a)
    return np.sign(x) * (whole + (a - whole >= 0.5))


def _inverse(d: np.ndarray) -> np.ndarray:
    """``1 / d`` in float32, and 0 where ``d`` is 0 (an all-zero block)."""
    with np.errstate(divide="ignore"):
        return np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)


def _signed_absmax(blocks: np.ndarray) -> np.ndarray:
    """Per block, the value with the largest magnitude, sign kept (the first one on a tie)."""
    idx = np.abs(blocks).argmax(axis=-1)[:, None]
    return np.take_along_axis(blocks, idx, axis=-1)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """(n, 32) codes 0..15 -> (n, 16) bytes: code j in the low nibble of byte j, code j+16 in the high one."""
    q = q.astype(np.uint8)
    return (q[:, :16] & 0x0F) | (q[:, 16:] << 4)


def _unpack_nibbles(qs: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_pack_nibbles`: (n, 16) bytes -> (n, 32) codes."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _pack_high_bits(q: np.ndarray) -> np.ndarray:
    """Bit 4 of each of 32 codes -> 4 bytes (a little-endian uint32, bit j for code j)."""
    return np.packbits((q.astype(np.uint8) >> 4) & 1, axis=-1, bitorder="little")


def _unpack_high_bits(qh: np.ndarray) -> np.ndarray:
    return np.unpackbits(qh, axis=-1, bitorder="little")[:, :32]


# ---------------------------------------------------------------------------------- legacy formats


def _quantize_q8_0(b: np.ndarray) -> np.ndarray:
    d = np.abs(b).max(axis=-1, keepdims=True) / np.float32(127)
    q = round_away(b * _inverse(d)).astype(np.int8)
    return np.concatenate([_f16_bytes(d), q.view(np.uint8)], axis=-1)


def _dequantize_q8_0(raw: np.ndarray) -> np.ndarray:
    return _f16_from(raw[:, :2]) * raw[:, 2:].view(np.int8).astype(np.float32)


def _quantize_symmetric(b: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Q4_0/Q5_0 rule: the largest-magnitude value maps to code 0 (``-levels/2``); returns d and codes."""
    half = levels // 2
    d = _signed_absmax(b) / np.float32(-half)
    q = np.minimum(np.trunc(b * _inverse(d) + np.float32(half + 0.5)), levels - 1).astype(np.uint8)
    return d, q


def _quantize_affine(b: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_1/Q5_1 rule: min maps to code 0, max to ``levels-1``; returns d, m and codes."""
    lo, hi = b.min(axis=-1, keepdims=True), b.max(axis=-1, keepdims=True)
    d = (hi - lo) / np.float32(levels - 1)
    q = np.minimum(np.trunc((b - lo) * _inverse(d) + np.float32(0.5)), levels - 1).astype(np.uint8)
    return d, lo, q


def _quantize_q4_0(b: np.ndarray) -> np.ndarray:
    d, q = _quantize_symmetric(b, 16)
    return np.concatenate([_f16_bytes(d), _pack_nibbles(q)], axis=-1)


def _dequantize_q4_0(raw: np.ndarray) -> np.ndarray:
    return _f16_from(raw[:, :2]) * (_unpack_nibbles(raw[:, 2:]).astype(np.float32) - 8)


def _quantize_q4_1(b: np.ndarray) -> np.ndarray:
    d, m, q = _quantize_affine(b, 16)
    return np.concatenate([_f16_bytes(d), _f16_bytes(m), _pack_nibbles(q)], axis=-1)


def _dequantize_q4_1(raw: np.ndarray) -> np.ndarray:
    return _f16_from(raw[:, :2]) * _unpack_nibbles(raw[:, 4:]).astype(np.float32) + _f16_from(raw[:, 2:4])


def _quantize_q5_0(b: np.ndarray) -> np.ndarray:
    d, q = _quantize_symmetric(b, 32)
    return np.concatenate([_f16_bytes(d), _pack_high_bits(q), _pack_nibbles(q & 0x0F)], axis=-1)


def _five_bit_codes(raw: np.ndarray, start: int) -> np.ndarray:
    """Codes 0..31 from 4 bytes of high bits at ``start`` followed by 16 bytes of nibbles."""
    high = _unpack_high_bits(raw[:, start : start + 4])
    return (_unpack_nibbles(raw[:, start + 4 :]) | (high << 4)).astype(np.float32)


def _dequantize_q5_0(raw: np.ndarray) -> np.ndarray:
    return _f16_from(raw[:, :2]) * (_five_bit_codes(raw, 2) - 16)


def _quantize_q5_1(b: np.ndarray) -> np.ndarray:
    d, m, q = _quantize_affine(b, 32)
    return np.concatenate([_f16_bytes(d), _f16_bytes(m), _pack_high_bits(q), _pack_nibbles(q & 0x0F)], axis=-1)


def _dequantize_q5_1(raw: np.ndarray) -> np.ndarray:
    return _f16_from(raw[:, :2]) * _five_bit_codes(raw, 4) + _f16_from(raw[:, 2:4])


# ---------------------------------------------------------------------------------------- K-quants


def _unpack_q4_k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """12 bytes -> 8 six-bit scales and 8 six-bit mins (llama.cpp's ``get_scale_min_k4``)."""
    s = s.astype(np.uint8)
    sc = np.empty((s.shape[0], 8), np.uint8)
    mn = np.empty((s.shape[0], 8), np.uint8)
    sc[:, :4], mn[:, :4] = s[:, 0:4] & 63, s[:, 4:8] & 63
    sc[:, 4:] = (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)
    mn[:, 4:] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return sc, mn


def _pack_q4_k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_unpack_q4_k_scales`: 8 scales and 8 mins (0..63) -> 12 bytes."""
    sc, mn = sc.astype(np.uint8), mn.astype(np.uint8)
    out = np.empty((sc.shape[0], 12), np.uint8)
    out[:, 0:4] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return out


def _q4_k_codes(qs: np.ndarray) -> np.ndarray:
    """128 bytes -> 256 codes: each run of 32 bytes holds 64 weights, low nibbles first."""
    chunks = qs.reshape(-1, 4, 32)
    return np.concatenate([chunks & 0x0F, chunks >> 4], axis=-1).reshape(-1, 256)


def _dequantize_q4_k(raw: np.ndarray) -> np.ndarray:
    d, dmin = _f16_from(raw[:, 0:2]), _f16_from(raw[:, 2:4])
    sc, mn = _unpack_q4_k_scales(raw[:, 4:16])
    q = _q4_k_codes(raw[:, 16:]).reshape(-1, 8, 32).astype(np.float32)
    scale = d * sc.astype(np.float32)  # (n, 8): the float32 products llama.cpp forms first
    offset = dmin * mn.astype(np.float32)
    return (scale[..., None] * q - offset[..., None]).reshape(-1, 256)


def _quantize_q4_k(b: np.ndarray) -> np.ndarray:
    sub = b.reshape(-1, 8, 32)
    lo = np.minimum(sub.min(axis=-1), 0)  # the min is stored as a positive offset
    scale = (sub.max(axis=-1) - lo) / 15
    d = scale.max(axis=-1, keepdims=True) / 63
    dmin = -lo.min(axis=-1, keepdims=True) / 63
    # round the block constants to f16 first: the codes must be chosen for the stored values
    d, dmin = d.astype(np.float16).astype(np.float32), dmin.astype(np.float16).astype(np.float32)
    sc = np.clip(np.ceil(scale * _inverse(d)), 0, 63)  # rounded up: the block's extremes still fit
    mn = np.clip(round_away(-lo * _inverse(dmin)), 0, 63)
    step = (d * sc)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(step > 0, round_away((sub + (dmin * mn)[..., None]) / step), 0)
    q = np.clip(q, 0, 15).astype(np.uint8).reshape(-1, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_q4_k_scales(sc, mn), qs], axis=-1)


def _q6_k_codes(ql: np.ndarray, qh: np.ndarray) -> np.ndarray:
    """ql (128 bytes) + qh (64 bytes) -> 256 codes 0..63, in two halves of 128 weights.

    In each half, ql byte l holds weight l (low nibble) and l+64 (high nibble), byte l+32 holds
    l+32 and l+96; qh byte l holds the top two bits of weights l, l+32, l+64, l+96.
    """
    ql = ql.reshape(-1, 2, 64)
    qh = qh.reshape(-1, 2, 32)
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=-1)  # (n, 2, 128): weights 0..63 then 64..127
    high = np.concatenate([(qh >> shift) & 3 for shift in (0, 2, 4, 6)], axis=-1)  # (n, 2, 128)
    return (low | (high << 4)).reshape(-1, 256)


def _dequantize_q6_k(raw: np.ndarray) -> np.ndarray:
    q = _q6_k_codes(raw[:, :128], raw[:, 128:192]).astype(np.float32) - 32
    sc = raw[:, 192:208].view(np.int8).astype(np.float32)
    d = _f16_from(raw[:, 208:210])
    scale = d * sc  # (n, 16)
    return (scale[..., None] * q.reshape(-1, 16, 16)).reshape(-1, 256)


def _quantize_q6_k(b: np.ndarray) -> np.ndarray:
    sub = b.reshape(-1, 16, 16)
    scale = _signed_absmax(sub.reshape(-1, 16)).reshape(-1, 16) / -32
    d = np.abs(scale).max(axis=-1, keepdims=True) / 127
    d = d.astype(np.float16).astype(np.float32)
    sc = np.clip(np.sign(scale) * np.ceil(np.abs(scale) * _inverse(d)), -127, 127)  # up: extremes fit
    step = (d * sc)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(step != 0, round_away(sub / step), 0)
    q = (np.clip(q, -32, 31) + 32).astype(np.uint8).reshape(-1, 2, 4, 32)  # (n, half, quarter, 32)
    low = q & 0x0F
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=-1)
    qh = sum(((q[:, :, k] >> 4) & 3) << (2 * k) for k in range(4)).astype(np.uint8)
    return np.concatenate(
        [ql.reshape(-1, 128), qh.reshape(-1, 64), sc.astype(np.int8).view(np.uint8), _f16_bytes(d)], axis=-1
    )


_QUANTIZE = {
    "Q8_0": _quantize_q8_0, "Q4_0": _quantize_q4_0, "Q4_1": _quantize_q4_1, "Q5_0": _quantize_q5_0,
    "Q5_1": _quantize_q5_1, "Q4_K": _quantize_q4_k, "Q6_K": _quantize_q6_k,
}
_DEQUANTIZE = {
    "Q8_0": _dequantize_q8_0, "Q4_0": _dequantize_q4_0, "Q4_1": _dequantize_q4_1, "Q5_0": _dequantize_q5_0,
    "Q5_1": _dequantize_q5_1, "Q4_K": _dequantize_q4_k, "Q6_K": _dequantize_q6_k,
}


# ------------------------------------------------------------------------------------- public API


def quantize(values: np.ndarray, fmt: str, name: str = "tensor") -> np.ndarray:
    """Quantize a float array to ``fmt``: uint8 bytes of shape (*rows, row_len / block_size * block_bytes).

    That is the layout ``gguf.GGUFWriter.add_tensor(..., raw_dtype=...)`` and ``gguf.quants`` use.
    ``name`` appears in the errors raised when a row does not fill whole blocks or a value is NaN or inf.
    """
    f = block_format(fmt)
    values = np.asarray(values, dtype=np.float32)
    check_finite(torch.from_numpy(values), f"tensor {name!r}")
    blocks = _to_blocks(values, f, name)
    raw = _QUANTIZE[f.name](blocks).astype(np.uint8)
    return raw.reshape(*values.shape[:-1], values.shape[-1] // f.block_size * f.block_bytes)


def dequantize(raw: np.ndarray, fmt: str, name: str = "tensor") -> np.ndarray:
    """Float32 values from the bytes of a ``fmt`` tensor (shape (*rows, bytes per row))."""
    f = block_format(fmt)
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    if raw.shape[-1] % f.block_bytes:
        raise ValueError(f"tensor {name!r}: rows of {raw.shape[-1]} bytes are not whole {f.name} blocks of {f.block_bytes} bytes")
    values = _DEQUANTIZE[f.name](raw.reshape(-1, f.block_bytes))
    return values.reshape(*raw.shape[:-1], raw.shape[-1] // f.block_bytes * f.block_size)


def from_codes(codes: np.ndarray, d: np.ndarray, fmt: str) -> np.ndarray:
    """The bytes of a Q4_0 or Q8_0 tensor holding given integer codes and float16 block scales, exactly.

    ``codes``: (rows, row_len) signed integers (-8..7 for Q4_0, -128..127 for Q8_0); ``d``: (rows,
    row_len / 32) scales that float16 holds exactly (each block's weight is ``d * code``). Returns uint8
    (rows, row_len / 32 * block_bytes), which :func:`dequantize` turns back into ``d * code`` bit for bit.
    ``ValueError`` for a code outside the type's range or a scale float16 would round."""
    f = block_format(fmt)
    if f.name not in ("Q4_0", "Q8_0"):
        raise ValueError(f"from_codes writes Q4_0 or Q8_0 (scale times code), not {f.name}")
    codes = np.asarray(codes)
    rows, row_len = codes.shape
    if row_len % f.block_size or np.shape(d) != (rows, row_len // f.block_size):
        raise ValueError(f"codes {codes.shape} need rows of whole blocks of 32 and one scale per block, got d {np.shape(d)}")
    low, high = (-8, 7) if f.name == "Q4_0" else (-128, 127)
    if codes.min() < low or codes.max() > high:
        raise ValueError(f"{f.name} holds codes {low}..{high}; these span {codes.min()}..{codes.max()}")
    d = np.asarray(d, dtype=np.float32).reshape(-1, 1)
    if not np.array_equal(d.astype(np.float16).astype(np.float32), d):
        raise ValueError(f"{f.name} stores each block's scale as float16; these scales are not all float16 values")
    blocks = codes.reshape(-1, f.block_size)
    if f.name == "Q4_0":
        body = _pack_nibbles((blocks + 8).astype(np.uint8))
    else:
        body = blocks.astype(np.int8).view(np.uint8)
    raw = np.concatenate([_f16_bytes(d), body], axis=-1)
    return raw.reshape(rows, row_len // f.block_size * f.block_bytes)
