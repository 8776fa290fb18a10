"""The GPTQ checkpoint format: write a model of ``QuantLinear`` layers as a GPTQ checkpoint, and read one back.

A GPTQ checkpoint is an ordinary Hugging Face folder (``config.json``, ``model.safetensors``, tokenizer
files) in which every quantized ``nn.Linear`` called ``NAME`` (weight ``(out, in)``) is replaced by
four tensors:

- ``NAME.qweight``: int32 ``(in * bits / 32, out)``: the unsigned codes ``q`` (0..2**bits-1) of each
  output column, packed along the *input* dimension: a little-endian bit stream of 32-bit words,
  code ``k`` at bit ``k * bits`` (8 codes per word at 4 bits; at 3 bits a code may straddle two words);
- ``NAME.qzeros``: int32 ``(n_groups, out * bits / 32)``: the zero points, packed the same way along
  the *output* dimension;
- ``NAME.scales``: float16 ``(n_groups, out)``;
- ``NAME.g_idx``: int32 ``(in,)``: the group of each input column (``col // group_size`` for static
  groups; a permutation-derived index with act-order);
- ``NAME.bias`` if the layer has one (float16).

The weight is ``w[o, i] = (q[i, o] - z[g_idx[i], o]) * scale[g_idx[i], o]``. Symmetric quantization
stores the signed codes shifted by ``2**(bits-1)`` and a zero point of ``2**(bits-1)``.

Zero points on disk: ``checkpoint_format`` "gptq" (the classic layout of the GPTQ reference code and
AutoGPTQ, and what GPTQModel still writes) stores ``z - 1``; "gptq_v2" (GPTQModel's internal layout)
stores ``z``. GPTQModel converts between the two by subtracting or adding the constant that holds a 1 in
every field of the packed 32-bit word (``0x11111111`` at 4 bits), so an asymmetric zero point of 0
borrows from its neighbour on disk and is restored exactly on load; at 3 bits it shifts each field
modulo 8 instead. This module does the same, so its files load in GPTQModel and in transformers
(which loads GPTQ checkpoints through optimum and GPTQModel's layers).

``config.json`` carries ``quantization_config`` with the keys GPTQModel writes (``quant_method``,
``bits``, ``group_size``, ``desc_act``, ``sym``, ``lm_head``, ``checkpoint_format``, ``pack_dtype``,
``meta``...); the same dictionary goes to ``quantize_config.json``, which GPTQModel's own loader reads.

Functions: ``save_gptq_checkpoint`` (a model whose Linears are QuantLinear -> checkpoint folder),
``pack_layer``/``pack_model`` (the tensors only), ``read_gptq_checkpoint`` (folder -> codes, scales, zero
points per layer; GPTQModel's checkpoints too) and ``load_into_model`` (a checkpoint's layers as course
QuantLinear layers). Measured on the default model: RTN int4 g64 (sym and asym), int8, int3 and int2
exported here and reloaded through transformers give the in-memory perplexity within 0.1 %.

Supported widths: 2, 3, 4 and 8 bits (GPTQModel writes 5, 6 and 7 bits in a different, bit-plane
layout, which this module refuses rather than mis-writes).
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from course_utils.quant import rtn
from course_utils.quant.contract import set_module
from course_utils.quant.linear import QuantLinear

SUPPORTED_BITS = (2, 3, 4, 8)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
WORD_BITS = 32
QUANTIZE_CONFIG_FILE = "quantize_config.json"
_MASK32 = (1 << WORD_BITS) - 1


def _check_bits(bits: int) -> None:
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
    _check_bits(bits)
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
    _check_bits(bits)
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
    _check_format(checkpoint_format)
    z = zeros.to(torch.int64)
    if checkpoint_format == "gptq" and bits == 3:
        z = (z - 1) % 8
    packed = pack_along_first_dim(z.T, bits).T
    if checkpoint_format == "gptq" and bits != 3:
        packed = _to_int32(_to_uint(packed) - _field_ones(bits))
    return packed.contiguous()


def unpack_zeros(qzeros: torch.Tensor, bits: int, n_out: int, checkpoint_format: str = "gptq") -> torch.Tensor:
    """Zero points (n_groups, n_out) int32 from ``qzeros``; the inverse of :func:`pack_zeros`."""
    _check_format(checkpoint_format)
    packed = qzeros
    if checkpoint_format == "gptq" and bits != 3:
        packed = _to_int32(_to_uint(packed) + _field_ones(bits))
    z = unpack_along_first_dim(packed.T, bits, n_out).T
    if checkpoint_format == "gptq" and bits == 3:
        z = (z + 1) % 8
    return z.contiguous()


def _check_format(checkpoint_format: str) -> None:
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


def pack_layer(layer: nn.Module, g_idx: torch.Tensor | None = None, checkpoint_format: str = "gptq") -> GPTQTensors:
    """A course ``QuantLinear`` (codes(), scales (out, n_groups), zeros, bits, group_size, symmetric) in GPTQ layout.

    ``g_idx``: the group of each input column; default ``col // group_size``. With a custom ``g_idx``
    (act-order), ``scales``/``zeros`` column ``g`` still belong to group ``g``.
    """
    if not _is_quant_linear(layer):
        raise ValueError(f"expected a QuantLinear-like layer (codes(), scales, zeros, bits, group_size, symmetric), got {type(layer).__name__}")
    bits, out_f, in_f = layer.bits, layer.out_features, layer.in_features
    _check_bits(bits)
    codes = layer.codes().to(torch.int64)  # (out, in): signed if symmetric
    scales = layer.scales  # (out, n_groups)
    n_groups = scales.shape[1]
    mid = 2 ** (bits - 1)
    if layer.symmetric:
        q = codes + mid
        zeros = torch.full((out_f, n_groups), mid, dtype=torch.int64)
    else:
        if getattr(layer, "zeros", None) is None:
            raise ValueError("an asymmetric layer needs zero points (layer.zeros)")
        q, zeros = codes, layer.zeros.to(torch.int64)
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


# ------------------------------------------------------------------------------------ whole models


def quantization_config(bits: int, group_size: int, sym: bool, desc_act: bool = False,
                        checkpoint_format: str = "gptq", lm_head: bool = False, meta: dict | None = None) -> dict:
    """The ``quantization_config`` dictionary of a GPTQ checkpoint, with GPTQModel's keys."""
    _check_bits(bits)
    _check_format(checkpoint_format)
    from course_utils import __version__

    return {
        "bits": bits,
        "group_size": group_size,
        "desc_act": desc_act,
        "sym": sym,
        "lm_head": lm_head,
        "quant_method": "gptq",
        "checkpoint_format": checkpoint_format,
        "pack_dtype": "int32",
        "meta": {"quantizer": [f"course_utils:{__version__}"], **(meta or {})},
    }


def pack_model(model: nn.Module, g_idx: dict[str, torch.Tensor] | None = None,
               checkpoint_format: str = "gptq") -> dict[str, GPTQTensors]:
    """Every QuantLinear of ``model`` in GPTQ layout, by qualified module name."""
    g_idx = g_idx or {}
    layers = {name: m for name, m in model.named_modules() if _is_quant_linear(m)}
    if not layers:
        raise ValueError(f"{type(model).__name__} holds no QuantLinear layers; quantize it first "
                         "(course_utils.quant.linear.quantize_model or the GPTQ lesson's quantizer)")
    unknown = set(g_idx) - set(layers)
    if unknown:
        raise ValueError(f"g_idx given for modules that are not QuantLinear layers: {sorted(unknown)}")
    return {name: pack_layer(m, g_idx.get(name), checkpoint_format) for name, m in layers.items()}


def save_gptq_checkpoint(
    model: nn.Module,
    tokenizer,
    out_dir: str | Path,
    desc_act: bool = False,
    g_idx: dict[str, torch.Tensor] | None = None,
    checkpoint_format: str = "gptq",
    dtype: torch.dtype | None = None,
    meta: dict | None = None,
) -> Path:
    """Write ``model`` (a transformers model whose quantized Linears are QuantLinear) as a GPTQ checkpoint.

    ``bits``, ``group_size`` and ``sym`` are read from the layers (all must agree: this writer makes no
    per-layer "dynamic" overrides; layers with one group per row are written as ``group_size`` -1). ``desc_act`` and ``g_idx`` (per layer name, default ``col //
    group_size``) describe act-order. Float tensors (embeddings, norms, an unquantized ``lm_head``) keep
    their dtype unless ``dtype`` is given; a tied ``lm_head`` is not written twice. Writes
    ``model.safetensors``, ``config.json`` (with ``quantization_config``), ``quantize_config.json``,
    ``generation_config.json`` and the tokenizer; returns ``out_dir``.
    """
    from safetensors.torch import save_file

    packed = pack_model(model, g_idx, checkpoint_format)
    layers = dict(model.named_modules())
    # one group per row (per-channel scales) is group_size -1 in the format, whatever each layer's width
    settings = {(layers[n].bits, -1 if layers[n].group_size == layers[n].in_features else layers[n].group_size,
                 bool(layers[n].symmetric)) for n in packed}
    if len(settings) != 1:
        raise ValueError(f"all QuantLinear layers must share bits, group_size and symmetry, found {sorted(settings)}")
    (bits, group_size, sym), = settings
    qconfig = quantization_config(bits, group_size, sym, desc_act, checkpoint_format,
                                  lm_head=any(n == "lm_head" or n.endswith(".lm_head") for n in packed), meta=meta)

    tensors: dict[str, torch.Tensor] = {}
    for name, t in packed.items():
        tensors.update(t.tensors(name))
    seen: dict[int, str] = {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
        module_name = name.rpartition(".")[0]
        if module_name in packed:
            continue  # the QuantLinear's own buffers (packed codes, scales, zeros, bias) are written above
        if getattr(layers.get(module_name), "_non_persistent_buffers_set", None) and name.rpartition(".")[2] in layers[module_name]._non_persistent_buffers_set:
            continue  # e.g. rotary inv_freq: recomputed on load, not part of a checkpoint
        key = t.untyped_storage().data_ptr()
        if key in seen:  # tied weights (lm_head = embed_tokens): written once, under the first name
            continue
        seen[key] = name
        value = t.detach()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        tensors[name] = value.contiguous().cpu()

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg = copy.deepcopy(model.config)
    cfg.quantization_config = qconfig
    if dtype is not None:
        cfg.dtype = dtype
    cfg.save_pretrained(out_dir)
    (out_dir / QUANTIZE_CONFIG_FILE).write_text(json.dumps(qconfig, indent=2) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir


# ------------------------------------------------------------------------------------ reading


@dataclass
class GPTQCheckpoint:
    """A GPTQ checkpoint read from disk: its ``quantization_config``, each quantized layer, the other tensors."""

    config: dict
    layers: dict[str, GPTQTensors]
    other: dict[str, torch.Tensor] = field(repr=False)

    @property
    def bits(self) -> int:
        return int(self.config["bits"])

    @property
    def group_size(self) -> int:
        return int(self.config["group_size"])


def read_quantization_config(path: str | Path) -> dict:
    """``quantization_config`` of the checkpoint folder ``path`` (from config.json, else quantize_config.json)."""
    path = Path(path)
    cfg = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    qc = cfg.get("quantization_config")
    if qc is None and (path / QUANTIZE_CONFIG_FILE).is_file():
        qc = json.loads((path / QUANTIZE_CONFIG_FILE).read_text())
    if qc is None:
        raise ValueError(f"{path} holds no quantization_config: not a GPTQ checkpoint")
    return qc


def read_gptq_checkpoint(path: str | Path) -> GPTQCheckpoint:
    """Read every ``*.safetensors`` file of a GPTQ checkpoint folder into a :class:`GPTQCheckpoint`.

    Works for this module's files and for GPTQModel's (which may shard): layers are found by their
    ``.qweight`` tensors; sizes come from ``g_idx`` (in) and ``scales`` (out).
    """
    from safetensors.torch import load_file

    path = Path(path)
    qc = read_quantization_config(path)
    method = str(qc.get("quant_method", "gptq")).lower()
    fmt = str(qc.get("checkpoint_format", qc.get("format", "gptq"))).lower()
    if method != "gptq" or fmt not in CHECKPOINT_FORMATS:
        raise ValueError(f"{path}: quant_method={method!r}, checkpoint_format={fmt!r}; this reader handles GPTQ {CHECKPOINT_FORMATS}")
    bits = int(qc["bits"])
    _check_bits(bits)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no .safetensors file in {path}")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    prefixes = [k[: -len(".qweight")] for k in tensors if k.endswith(".qweight")]
    layers = {}
    for p in prefixes:
        scales, g_idx = tensors.pop(f"{p}.scales"), tensors.pop(f"{p}.g_idx")
        layers[p] = GPTQTensors(
            qweight=tensors.pop(f"{p}.qweight"), qzeros=tensors.pop(f"{p}.qzeros"), scales=scales, g_idx=g_idx,
            bias=tensors.pop(f"{p}.bias", None), bits=bits, in_features=g_idx.numel(), out_features=scales.shape[1],
            checkpoint_format=fmt,
        )
    return GPTQCheckpoint(qc, layers, tensors)


def load_into_model(model: nn.Module, checkpoint: GPTQCheckpoint | str | Path) -> int:
    """Put a course ``QuantLinear`` holding each layer of a GPTQ checkpoint into ``model`` (same architecture), in place.

    Lets the course's own tools inspect a checkpoint made elsewhere (GPTQModel's codes, scales and zero
    points). Needs static groups (``g_idx = col // group_size``); the other tensors of the checkpoint
    (embeddings, norms) are not touched. Returns the number of layers replaced.
    """
    ck = checkpoint if isinstance(checkpoint, GPTQCheckpoint) else read_gptq_checkpoint(checkpoint)
    modules = dict(model.named_modules())
    missing = [n for n in ck.layers if not isinstance(modules.get(n), nn.Linear)]
    if missing:
        raise ValueError(f"the model has no nn.Linear for these checkpoint layers: {missing[:5]}")
    for name, layer in ck.layers.items():
        old = modules[name]
        if (old.out_features, old.in_features) != (layer.out_features, layer.in_features):
            raise ValueError(f"{name}: checkpoint layer is {layer.out_features}x{layer.in_features}, "
                             f"the model's is {old.out_features}x{old.in_features}")
        bias = None if layer.bias is None else layer.bias.to(old.weight.dtype)
        new = QuantLinear(layer.to_quantized_tensor(), bias, dtype=old.weight.dtype).to(old.weight.device)
        set_module(model, name, new)
    return len(ck.layers)
