"""Pack integer codes of 1 to 8 bits into bytes, and unpack them.

Codes are written as one little-endian bit stream: the first code fills the lowest bits of the first
byte. For 4 bits that means two codes per byte, the first in the low nibble; 3-bit codes straddle byte
boundaries (8 codes in 3 bytes). ``n`` codes of ``b`` bits take ``ceil(n * b / 8)`` bytes.
"""

from __future__ import annotations

import math

import torch


def packed_nbytes(n_codes: int, bits: int) -> int:
    """Bytes needed for ``n_codes`` codes of ``bits`` bits."""
    return math.ceil(n_codes * bits / 8)


def _check(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer from 1 to 8, got {bits!r}")


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ``codes`` (any shape, values in 0..2**bits-1) into a flat uint8 tensor.

    Works on runs of 8 codes, which fill exactly ``bits`` bytes: the run becomes one integer of
    ``8 * bits`` bits (code k at bit ``k * bits``), written out byte by byte, lowest first.
    """
    _check(bits)
    flat = codes.reshape(-1).to(torch.int64)
    if flat.numel() and (flat.min() < 0 or flat.max() >= 2**bits):
        raise ValueError(f"codes must lie in 0..{2**bits - 1} for {bits}-bit packing, got {int(flat.min())}..{int(flat.max())}")
    if bits == 8:
        return flat.to(torch.uint8)
    n = flat.numel()
    runs = torch.cat([flat, flat.new_zeros((-n) % 8)]).view(-1, 8)
    word = (runs << (torch.arange(8, device=flat.device) * bits)).sum(1)  # bits never overlap: sum = OR
    out = (word.unsqueeze(1) >> (torch.arange(bits, device=flat.device) * 8)) & 0xFF
    return out.reshape(-1)[: packed_nbytes(n, bits)].to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, n_codes: int) -> torch.Tensor:
    """The first ``n_codes`` codes of ``bits`` bits from ``packed`` (uint8), as a flat int16 tensor."""
    _check(bits)
    if packed.numel() < packed_nbytes(n_codes, bits):
        raise ValueError(f"{packed.numel()} bytes hold fewer than {n_codes} codes of {bits} bits")
    data = packed.reshape(-1)[: packed_nbytes(n_codes, bits)]
    if bits == 8:
        return data.to(torch.int16)
    if bits == 4:  # the common case: two codes per byte, low nibble first
        data = data.to(torch.int16)
        return torch.stack([data & 15, data >> 4], dim=1).reshape(-1)[:n_codes]
    data = torch.cat([data, data.new_zeros((-data.numel()) % bits)]).view(-1, bits).to(torch.int64)
    word = (data << (torch.arange(bits, device=data.device) * 8)).sum(1)  # one run of 8 codes
    codes = (word.unsqueeze(1) >> (torch.arange(8, device=data.device) * bits)) & (2**bits - 1)
    return codes.reshape(-1)[:n_codes].to(torch.int16)
