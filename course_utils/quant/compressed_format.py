"""The compressed-tensors checkpoint format ("pack-quantized"): what llm-compressor writes and vLLM serves,
written from a model of course ``QuantLinear`` layers.

A compressed-tensors checkpoint is an ordinary Hugging Face folder in which every quantized ``nn.Linear``
called ``NAME`` (weight ``(out, in)``, ``b``-bit integer codes) is replaced by:

- ``NAME.weight_packed``: int32 ``(out, ceil(in * b / 32))``: each row's codes as unsigned numbers
  ``q + 2**(b-1)`` (the signed code ``q`` lies in ``-2**(b-1)..2**(b-1)-1``), packed along the *input*
  dimension as a little-endian bit stream: code ``k`` at bit ``k * b`` (8 codes per word at 4 bits);
- ``NAME.weight_scale``: ``(out, n_groups)`` (one column per row for per-channel scales): float32 for a
  float32 model, float16 otherwise; both hold the course's float16 scales exactly, but a reader casts them
  to the dtype it loads the model in (compressed-tensors does), so a bfloat16 load rounds them;
- ``NAME.weight_zero_point`` (asymmetric grids only): int32 ``(ceil(out * b / 32), n_groups)``: the
  signed zero points, shifted and packed the same way, but along the *output* dimension;
- ``NAME.weight_shape``: int64 ``(2,)``, ``[out, in]``;
- ``NAME.bias`` if the layer has one.

The weight is ``w = (q - zero_point) * scale``, per group of ``group_size`` input columns. The course's
codes map onto it exactly: a symmetric code is already signed (zero point 0); an asymmetric code ``c`` in
``0..2**b-1`` with zero point ``z`` becomes ``q = c - 2**(b-1)`` and ``zero_point = z - 2**(b-1)``, so the
unsigned values packed are ``c`` and ``z`` themselves (:func:`gptq_layout.unsigned_codes` gives them for
both grids). Both the ±7 and the full -8..7 symmetric grids fit. Only 4 and 8 bits are written: the widths vLLM's
integer weight-only kernels serve (compressed-tensors packs other widths too, and its 3-bit layout changed
between versions).

``config.json`` carries ``quantization_config`` with ``quant_method`` "compressed-tensors", ``format``
"pack-quantized", one config group targeting every ``Linear`` (``num_bits``, ``type`` "int",
``symmetric``, ``strategy`` "group" or "channel", ``group_size``), and ``ignore`` naming the Linears kept in
float (the tied ``lm_head``). Act-order results of the course's GPTQ use static groups (a column's group
is ``column // group_size``), so they need no ``g_idx`` and are written like any other.

Functions: :func:`quantization_config`, :func:`pack_layer` (one layer's tensors) and
:func:`save_compressed_checkpoint` (a whole model). Checked in the tests against compressed-tensors' own
decompression: every weight comes back bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from course_utils.quant import checkpoint_folder
from course_utils.quant.gptq_layout import pack_along_first_dim, quant_linear_names, unsigned_codes

FORMAT = "pack-quantized"
PACKABLE_BITS = (4, 8)  # the widths vLLM's integer weight-only kernels serve


def quantization_config(bits: int, group_size: int, symmetric: bool, ignore: list[str]) -> dict:
    """The ``quantization_config`` of a pack-quantized checkpoint: one group of integer weights, no
    activation quantization; ``group_size`` -1 means one scale per row ("channel")."""
    from course_utils import __version__

    weights = {
        "num_bits": bits, "type": "int", "symmetric": symmetric, "dynamic": False, "actorder": None,
        "strategy": "channel" if group_size == -1 else "group", "group_size": None if group_size == -1 else group_size,
        "observer": None, "observer_kwargs": {}, "block_structure": None,  # no observer: the course chose the grid
    }
    return {
        "quant_method": "compressed-tensors",
        "format": FORMAT,
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                      "output_activations": None, "format": FORMAT}},
        "ignore": ignore,
        "kv_cache_scheme": None,
        "sparsity_config": {},
        "global_compression_ratio": None,
        "producer": f"course_utils {__version__}",
    }


def pack_layer(layer: nn.Module, scale_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """One ``QuantLinear``-like layer's tensors in the pack-quantized layout, by local name
    (``weight_packed``, ``weight_scale``, ``weight_shape``, ``weight_zero_point`` if asymmetric, ``bias``).
    ``scale_dtype``: float16 or float32 hold the course's float16 scales exactly; bfloat16 would round them."""
    if layer.bits not in PACKABLE_BITS:
        raise ValueError(f"the compressed-tensors writer packs {PACKABLE_BITS}-bit codes, got {layer.bits} bits")
    if scale_dtype == torch.bfloat16:
        raise ValueError("bfloat16 scales would round the layer's float16 scales; write float16 or float32")
    q, zeros = unsigned_codes(layer)  # (out, in), (out, n_groups)
    tensors = {
        "weight_packed": pack_along_first_dim(q.T, layer.bits).T.contiguous(),
        "weight_scale": layer.scales.detach().to(scale_dtype).contiguous(),
        "weight_shape": torch.tensor([layer.out_features, layer.in_features], dtype=torch.int64),
    }
    if not layer.symmetric:
        tensors["weight_zero_point"] = pack_along_first_dim(zeros, layer.bits).contiguous()
    if getattr(layer, "bias", None) is not None:
        tensors["bias"] = layer.bias.detach().contiguous()
    return {k: v.cpu() for k, v in tensors.items()}


def _float_linears(model: nn.Module) -> list[str]:
    """Names of the plain ``nn.Linear`` layers of ``model`` (kept in float: the checkpoint's ``ignore``)."""
    return [name for name, m in model.named_modules() if type(m) is nn.Linear]


def save_compressed_checkpoint(model: nn.Module, tokenizer, out_dir: str | Path) -> Path:
    """Write ``model`` (a transformers model whose quantized Linears are ``QuantLinear``) as a pack-quantized
    compressed-tensors checkpoint in ``out_dir``; returns it.

    All quantized layers must share bits, group size and symmetry. Scales are written in float32 for a
    float32 model and in float16 otherwise (both hold the layers' float16 scales exactly). Float tensors keep
    their dtype; a tied ``lm_head`` is written once, and every Linear left in float is named in ``ignore``.
    """
    layers = quant_linear_names(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} holds no QuantLinear layers; quantize it first")
    bits, group_size, symmetric = checkpoint_folder.common_grid(layers)
    float_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    scale_dtype = torch.float32 if float_dtype == torch.float32 else torch.float16
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        tensors.update({f"{name}.{k}": v for k, v in pack_layer(layer, scale_dtype).items()})
    tensors.update(checkpoint_folder.float_tensors(model, skip=set(layers)))
    qconfig = quantization_config(bits, group_size, symmetric, ignore=_float_linears(model))
    return checkpoint_folder.write(model, tokenizer, out_dir, tensors, qconfig)
