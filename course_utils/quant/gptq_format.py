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
``pack_model`` (the tensors only; one layer's layout is :mod:`course_utils.quant.gptq_layout`), ``read_gptq_checkpoint`` (folder -> codes, scales, zero
points per layer; GPTQModel's checkpoints too) and ``load_into_model`` (a checkpoint's layers as course
QuantLinear layers). Measured on the default model: RTN int4 g64 (sym and asym), int8, int3 and int2
exported here and reloaded through transformers give the in-memory perplexity within 0.1 %.

Supported widths: 2, 3, 4 and 8 bits (GPTQModel writes 5, 6 and 7 bits in a different, bit-plane
layout, which this module refuses rather than mis-writes).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from course_utils.quant import checkpoint_folder
from course_utils.quant.contract import set_module
from course_utils.quant.gptq_layout import CHECKPOINT_FORMATS, GPTQTensors, check_bits, check_format, pack_layer, quant_linear_names
from course_utils.quant.linear import QuantLinear

QUANTIZE_CONFIG_FILE = "quantize_config.json"


# ------------------------------------------------------------------------------------ whole models


def quantization_config(bits: int, group_size: int, sym: bool, desc_act: bool = False,
                        checkpoint_format: str = "gptq", lm_head: bool = False, meta: dict | None = None) -> dict:
    """The ``quantization_config`` dictionary of a GPTQ checkpoint, with GPTQModel's keys."""
    check_bits(bits)
    check_format(checkpoint_format)
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
    layers = quant_linear_names(model)
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
    packed = pack_model(model, g_idx, checkpoint_format)
    bits, group_size, sym = checkpoint_folder.common_grid(quant_linear_names(model))
    qconfig = quantization_config(bits, group_size, sym, desc_act, checkpoint_format,
                                  lm_head=any(n == "lm_head" or n.endswith(".lm_head") for n in packed), meta=meta)

    tensors: dict[str, torch.Tensor] = {}
    for name, t in packed.items():
        tensors.update(t.tensors(name))
    tensors.update(checkpoint_folder.float_tensors(model, skip=set(packed), dtype=dtype))
    out_dir = checkpoint_folder.write(model, tokenizer, out_dir, tensors, qconfig, dtype)
    (out_dir / QUANTIZE_CONFIG_FILE).write_text(json.dumps(qconfig, indent=2) + "\n")
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
    check_bits(bits)
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
