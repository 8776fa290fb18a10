"""How a GPTQ checkpoint stores one Linear: codes and zero points packed into int32 words, fp16 scales, g_idx.

For a Linear ``NAME`` with weight ``(out, in)``, a GPTQ checkpoint holds ``NAME.qweight`` (int32
``(in * bits / 32, out)``: the unsigned codes of each output column packed along the *input* dimension, a
little-endian bit stream of 32-bit words, code ``k`` at bit ``k * bits``), ``NAME.qzeros`` (int32
``(n_groups, out * bits / 32)``, packed along the output dimension), ``NAME.scales`` (float16 ``(n_groups,
out)``) and ``NAME.g_idx`` (int32 ``(in,)``). :class:`GPTQTensors` holds them and turns them back into codes,
zero points and the float weight; :func:`pack_layer` makes them from a course ``QuantLinear``. The rest of
the checkpoint (config, files, reading a folder) is :mod:`course_utils.quant.gptq_format`'s; the layout's
details (zero points stored minus one, 3-bit codes straddling words) are in its docstring.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from course_utils.quant import rtn

SUPPORTED_BITS = (2, 3, 4, 8)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
WORD_BITS = 32
_MASK32 = (1 << WORD_BITS) - 1


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(
            f"the GPTQ format here packs {SUPPORTED_BITS}-bit codes, got bits={bits!r} "
            "(5-7 bits use GPTQModel's separate bit-plane layout, which this writer does not produce)"
        )


def packed_words(n_codes: int, bits: int) -> int:
    """32-bit words that hold ``n_codes`` codes of ``bits`` bits: ``ceil(n * bits / 32)``."""
    return math.ceil(n_codes * bits / WORD_BITS)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 values in 0..2**32-1 -> the int32 with the same 32 bits (two's complement)."""
    words = words & _MASK32
    return (words - ((words >> 31) << 32)).to(torch.int32)


def _to_uint(words: torch.Tensor) -> torch.Tensor:
    """int32 words -> int64 values 0..2**32-1 (the same bits, read as unsigned)."""
    return words.to(torch.int64) & _MASK32


def pack_along_first_dim(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ``codes`` (n, m) along dim 0 into int32 words (ceil(n * bits / 32), m).

    Column ``j`` becomes a little-endian bit stream: code ``k`` at bits ``k*bits .. k*bits+bits-1`` of
    the stream, word ``w`` holding stream bits ``32w .. 32w+31``. This is GPTQ's ``qweight`` layout
    (with ``codes`` = the transposed (in, out) codes); ``qzeros`` is the same along dim 1.
    """
    check_bits(bits)
    if codes.dim() != 2:
        raise ValueError(f"expected 2-D codes, got shape {tuple(codes.shape)}")
    c = codes.to(torch.int64)
    if c.numel() and (c.min() < 0 or c.max() >= 2**bits):
        raise ValueError(f"codes must lie in 0..{2**bits - 1} for {bits}-bit packing, got {int(c.min())}..{int(c.max())}")
    n, m = c.shape
    c = torch.cat([c, c.new_zeros((-n) % WORD_BITS, m)]).view(-1, WORD_BITS, m)  # runs of 32 codes = `bits` words
    words = []
    for w in range(bits):
        acc = torch.zeros(c.shape[0], m, dtype=torch.int64, device=c.device)
        for k in range(WORD_BITS):
            shift = bits * k - WORD_BITS * w  # where code k's lowest bit lands in word w
            if shift >= WORD_BITS or shift <= -bits:
                continue
            acc |= (c[:, k] << shift) if shift >= 0 else (c[:, k] >> -shift)
        words.append(acc & _MASK32)
    packed = torch.stack(words, dim=1).reshape(-1, m)[: packed_words(n, bits)]
    return _to_int32(packed)


def unpack_along_first_dim(packed: torch.Tensor, bits: int, n_codes: int) -> torch.Tensor:
    """The first ``n_codes`` codes of each column of ``packed`` (int32 words, dim 0): (n_codes, m) int32."""
    check_bits(bits)
    if packed.dim() != 2:
        raise ValueError(f"expected 2-D packed words, got shape {tuple(packed.shape)}")
    if packed.shape[0] < packed_words(n_codes, bits):
        raise ValueError(f"{packed.shape[0]} words per column hold fewer than {n_codes} codes of {bits} bits")
    m = packed.shape[1]
    p = _to_uint(packed)
    p = torch.cat([p, p.new_zeros((-p.shape[0]) % bits, m)]).view(-1, bits, m)
    mask = 2**bits - 1
    codes = []
    for k in range(WORD_BITS):
        w, shift = divmod(bits * k, WORD_BITS)
        value = p[:, w] >> shift
        if shift + bits > WORD_BITS:  # the code straddles into the next word (3 bits)
            value = value | (p[:, w + 1] << (WORD_BITS - shift))
        codes.append(value & mask)
    return torch.stack(codes, dim=1).reshape(-1, m)[:n_codes].to(torch.int32)


def _field_ones(bits: int) -> int:
    """The 32-bit word with a 1 in every ``bits``-bit field (0x11111111 at 4 bits)."""
    return sum(1 << (bits * k) for k in range(WORD_BITS // bits))


def pack_zeros(zeros: torch.Tensor, bits: int, checkpoint_format: str = "gptq") -> torch.Tensor:
    """GPTQ ``qzeros`` (n_groups, ceil(out * bits / 32)) int32 from zero points ``zeros`` (n_groups, out).

    "gptq" (v1) stores ``z - 1`` the way GPTQModel writes it: word-wise subtraction of ``0x11..1``
    for 2, 4 and 8 bits, field-wise modulo ``2**bits`` for 3 bits. "gptq_v2" stores ``z``.
    """
    check_format(checkpoint_format)
    z = zeros.to(torch.int64)
    if checkpoint_format == "gptq" and bits == 3:
        z = (z - 1) % 8
    packed = pack_along_first_dim(z.T, bits).T
    if checkpoint_format == "gptq" and bits != 3:
        packed = _to_int32(_to_uint(packed) - _field_ones(bits))
    return packed.contiguous()


def unpack_zeros(qzeros: torch.Tensor, bits: int, n_out: int, checkpoint_format: str = "gptq") -> torch.Tensor:
    """Zero points (n_groups, n_out) int32 from ``qzeros``; the inverse of :func:`pack_zeros`."""
    check_format(checkpoint_format)
    packed = qzeros
    if checkpoint_format == "gptq" and bits != 3:
        packed = _to_int32(_to_uint(packed) + _field_ones(bits))
    z = unpack_along_first_dim(packed.T, bits, n_out).T
    if checkpoint_format == "gptq" and bits == 3:
        z = (z + 1) % 8
    return z.contiguous()


def check_format(checkpoint_format: str) -> None:
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format must be one of {CHECKPOINT_FORMATS}, got {checkpoint_format!r}")


# ------------------------------------------------------------------------------------ one layer


@dataclass
class GPTQTensors:
    """One layer in the GPTQ layout (the tensors as stored) plus its sizes.

    ``qweight`` int32 (in*bits/32, out), ``qzeros`` int32 (n_groups, out*bits/32), ``scales`` float16
    (n_groups, out), ``g_idx`` int32 (in,), ``bias`` float16 (out,) or None.
    """

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor
    bias: torch.Tensor | None
    bits: int
    in_features: int
    out_features: int
    checkpoint_format: str = "gptq"

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """``{prefix.qweight: ..., prefix.qzeros: ..., ...}`` as written to safetensors."""
        out = {f"{prefix}.qweight": self.qweight, f"{prefix}.qzeros": self.qzeros,
               f"{prefix}.scales": self.scales, f"{prefix}.g_idx": self.g_idx}
        if self.bias is not None:
            out[f"{prefix}.bias"] = self.bias
        return out

    def codes(self) -> torch.Tensor:
        """Unsigned codes (out, in) int32 in the usual weight orientation."""
        return unpack_along_first_dim(self.qweight, self.bits, self.in_features).T.contiguous()

    def zeros(self) -> torch.Tensor:
        """Zero points (n_groups, out) int32 (the true ``z``, whatever the on-disk convention)."""
        return unpack_zeros(self.qzeros, self.bits, self.out_features, self.checkpoint_format)

    def dequantize(self) -> torch.Tensor:
        """Float32 weight (out, in): ``(q - z[g_idx]) * scale[g_idx]`` column by column."""
        g = self.g_idx.long()
        q = self.codes().float()  # (out, in)
        z = self.zeros().float()[g].T  # (out, in)
        s = self.scales.float()[g].T
        return (q - z) * s

    def to_quantized_tensor(self) -> rtn.QuantizedTensor:
        """The layer as the course's :class:`rtn.QuantizedTensor` (needs static groups: g_idx = col // group_size).

        Symmetric (every zero point ``2**(bits-1)``): signed codes and ``zeros=None``; otherwise unsigned
        codes and the zero points.
        """
        n_groups = self.scales.shape[0]
        group_size = self.in_features // n_groups
        static = torch.arange(self.in_features, dtype=torch.int32) // group_size
        if self.in_features % n_groups or not torch.equal(self.g_idx.to(torch.int32), static):
            raise ValueError("this layer's g_idx is not col // group_size (act-order without static groups); "
                             "the course's QuantLinear keeps groups contiguous, so use dequantize() instead")
        codes, zeros = self.codes(), self.zeros().T.contiguous()  # (out, in), (out, n_groups)
        mid = 2 ** (self.bits - 1)
        if bool((zeros == mid).all()):
            return rtn.QuantizedTensor((codes - mid).to(torch.int16), self.scales.float().T.contiguous(), None,
                                       self.bits, group_size, True)
        return rtn.QuantizedTensor(codes.to(torch.int16), self.scales.float().T.contiguous(), zeros.to(torch.int16),
                                   self.bits, group_size, False)


def _is_quant_linear(module: nn.Module) -> bool:
    return all(hasattr(module, a) for a in ("codes", "scales", "bits", "group_size", "symmetric", "in_features", "out_features"))


def quant_linear_names(model: nn.Module) -> dict[str, nn.Module]:
    """The layers of ``model`` that hold codes and scales the way ``QuantLinear`` does, by qualified name."""
    return {name: m for name, m in model.named_modules() if _is_quant_linear(m)}


def unsigned_codes(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """A QuantLinear-like layer's codes (out, in) and zero points (out, n_groups) as unsigned int64
    (0..2**bits-1), the form packed formats store: symmetric codes shifted by ``2**(bits-1)``, with that
    as their zero point; asymmetric codes and zero points as they are. ``w = (q - z) * scale`` either way."""
    codes = layer.codes().to(torch.int64)  # (out, in): signed if symmetric
    n_groups, mid = layer.scales.shape[1], 2 ** (layer.bits - 1)
    if layer.symmetric:
        return codes + mid, torch.full((layer.out_features, n_groups), mid, dtype=torch.int64)
    if getattr(layer, "zeros", None) is None:
        raise ValueError("an asymmetric layer needs zero points (layer.zeros)")
    return codes, layer.zeros.to(torch.int64)


def pack_layer(layer: nn.Module, g_idx: torch.Tensor | None = None, checkpoint_format: str = "gptq") -> GPTQTensors:
    """A course ``QuantLinear`` (codes(), scales (out, n_groups), zeros, bits, group_size, symmetric) in GPTQ layout.

    ``g_idx``: the group of each input column; default ``col // group_size``. With a custom ``g_idx``
    (act-order), ``scales``/``zeros`` column ``g`` still belong to group ``g``.
    """
    if not _is_quant_linear(layer):
        raise ValueError(f"expected a QuantLinear-like layer (codes(), scales, zeros, bits, group_size, symmetric), got {type(layer).__name__}")
    bits, out_f, in_f = layer.bits, layer.out_features, layer.in_features
    check_bits(bits)
    scales = layer.scales  # (out, n_groups)
    n_groups = scales.shape[1]
    q, zeros = unsigned_codes(layer)
    if g_idx is None:
        if in_f % layer.group_size or in_f // layer.group_size != n_groups:
            raise ValueError(f"group_size {layer.group_size} and {n_groups} scale groups do not tile in_features={in_f}")
        g_idx = torch.arange(in_f, dtype=torch.int32) // layer.group_size
    g_idx = torch.as_tensor(g_idx).to(torch.int32).flatten()
    if g_idx.numel() != in_f or int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups:
        raise ValueError(f"g_idx must hold {in_f} group indices in 0..{n_groups - 1}")
    bias = getattr(layer, "bias", None)
    return GPTQTensors(
        qweight=pack_along_first_dim(q.T, bits).contiguous(),
        qzeros=pack_zeros(zeros.T, bits, checkpoint_format),
        scales=scales.T.to(torch.float16).contiguous(),
        g_idx=g_idx.contiguous(),
        bias=None if bias is None else bias.detach().to(torch.float16).contiguous(),
        bits=bits, in_features=in_f, out_features=out_f, checkpoint_format=checkpoint_format,
    )
