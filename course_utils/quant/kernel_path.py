"""Which matmul a quantized layer runs: a real weight-only kernel, or dequantize-and-matmul.

A :class:`~course_utils.quant.linear.QuantLinear` stores codes and scales. It can multiply by them in
two ways:

- **kernel**: hand its codes and scales, repacked once, to a kernel that reads the packed bits and
  dequantizes in registers (:mod:`course_utils.kernels`: torch's int4 kernel for groups of input columns,
  its int8 kernel for one scale per output row). The bytes streamed per call are the quantized ones, so a
  decode step gets faster. These kernels run in bfloat16: the activations and the scales are rounded to
  bfloat16 (8 bits of precision; the course's scales are float16, 11 bits), and so is the output; a zero
  point z becomes the bf16 offset (8 - z) * scale. A scale's rounding is shared by its whole group, so the
  kernel computes with a slightly different quantized weight than the one GPTQ or AWQ optimised. The result
  differs from the dequantized float32 matmul by about what casting a float model to bfloat16 changes
  (tested in ``tests/test_kernel_path.py``);
- **dequantize**: rebuild the float weight from the codes at every call and multiply in the layer's float
  dtype. Exact to the course's weights, but each call writes and reads a full float weight: it saves memory,
  not time.

Which one a layer uses is its ``engine``: ``"auto"`` (the default) runs the kernel for inputs of at most
:data:`KERNEL_MAX_ROWS` rows (decoding: one row per sequence) and dequantizes for longer ones (a prompt or an
evaluation batch), so that the perplexities and KL divergences the lessons measure keep the course's float32
reference numbers (it is not the faster choice for every length: dequantizing costs about as much as ten int4
decode steps); ``"kernel"`` always uses the kernel where one fits; ``"dequantize"`` never does.
:class:`course_utils.decode.Decoder` packs its own copies and runs the kernel for the prompt too. Where no kernel fits (3 bits, int8 in groups, a group size that does
not divide the kernel's tiles, a device without the operator), the layer dequantizes and the reason is said
once per reason (:class:`KernelFallbackWarning`) and counted by :func:`summary`.

This module owns the choice; lessons, :mod:`course_utils.decode` and the bench ask it.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from course_utils import kernels

KERNEL_DTYPE = torch.bfloat16  # the dtype torch's CPU int4/int8 kernels are fast in (lesson 03 times the others)
KERNEL_MAX_ROWS = 16  # "auto": kernel for inputs of at most this many rows
ENGINES = ("auto", "kernel", "dequantize")


class KernelFallbackWarning(UserWarning):
    """A quantized layer dequantizes because no kernel fits it (said once per reason)."""


@dataclass(frozen=True)
class Choice:
    """What a layer runs on a device: ``kernel`` is ``"int4"``, ``"int8"`` or ``"dequantize"``; ``reason``
    says why there is no kernel (empty when there is one)."""

    kernel: str
    reason: str = ""


def choose(layer: nn.Module, device: Any = "cpu") -> Choice:
    """The kernel that fits ``layer`` (a ``QuantLinear``) on ``device``, or ``"dequantize"`` and why.

    int4: 4-bit codes in groups that divide ``in_features`` (torch's CPU kernel takes groups of 32, 64, ...
    up to 256; CUDA needs compute capability 8.0). int8: 8-bit symmetric codes with one scale per output row
    (the kernel has no groups). Other layers dequantize.
    """
    out_features, in_features, bits = layer.out_features, layer.in_features, layer.bits
    if bits == 4:
        fmt = "int4"
        if layer.group_size not in (32, 64, 128, 256) or in_features % layer.group_size:
            return Choice("dequantize", f"the int4 kernel takes groups of 32, 64, 128 or 256 columns; "
                                        f"this layer has groups of {layer.group_size}")
    elif bits == 8:
        fmt = "int8"
        if layer.group_size != in_features or not layer.symmetric:
            return Choice("dequantize", "the int8 kernel takes one symmetric scale per output row; this layer has "
                                        + ("zero points" if not layer.symmetric else f"groups of {layer.group_size}"))
    else:
        return Choice("dequantize", f"no {bits}-bit weight-only kernel in torch (4 and 8 bits have one)")
    reason = kernels.kernel_support(fmt, device, KERNEL_DTYPE)
    if reason is None and fmt == "int4":
        reason = _int4_shape_problem(out_features, in_features, device)
    return Choice("dequantize", reason) if reason else Choice(fmt)


def _int4_shape_problem(out_features: int, in_features: int, device: Any) -> str:
    cuda = torch.device(device).type == "cuda"
    rows, cols = (8, 32) if cuda else (16, 2)
    if out_features % rows or in_features % cols:
        return (f"the int4 kernel needs out_features a multiple of {rows} and in_features of {cols}; "
                f"this layer is {out_features} x {in_features}")
    return ""


def _kernel_operands(layer: nn.Module, device: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes (out, in), scales and zeros (out, groups, float32) of ``layer`` in the kernel's convention.

    Symmetric codes q (weight q * s) become q + 8 with zero 0; zero-point codes q with integer zero z
    (weight (q - z) * s) stay q, with zero (8 - z) * s: the int4 kernel computes (code - 8) * scale + zero.
    For int8 (symmetric only) the codes stay signed and the zeros are unused."""
    codes = layer.codes().to(device)
    scales = layer.scales.to(device).float()
    if layer.bits == 8:
        return codes, scales, torch.zeros_like(scales)
    if layer.zeros is None:
        return codes + 8, scales, torch.zeros_like(scales)
    return codes, scales, (8 - layer.zeros.to(device).float()) * scales


def pack(layers: nn.Module | list[nn.Module], device: Any = "cpu") -> kernels.PackedWeight:
    """``layers`` (one ``QuantLinear``, or several sharing the input, stacked along the output) with their own
    codes and scales, in the layout of the kernel :func:`choose` picked.

    Several layers must share bits, group size, symmetry and ``in_features`` (e.g. a layer's q, k and v
    projections): one kernel call then computes all their outputs, concatenated. ``ValueError`` when no
    kernel fits or the layers differ."""
    layers = layers if isinstance(layers, list) else [layers]
    first = layers[0]
    choices = {choose(layer, device) for layer in layers}
    if len(choices) != 1 or next(iter(choices)).kernel == "dequantize":
        raise ValueError(f"no single kernel fits these layers: {sorted(c.reason or c.kernel for c in choices)}")
    signature = {(layer.bits, layer.group_size, layer.symmetric, layer.in_features) for layer in layers}
    if len(signature) != 1:
        raise ValueError(f"layers packed together must share bits, group size, symmetry and inputs, got {signature}")
    codes, scales, zeros = (torch.cat(parts) for parts in zip(*(_kernel_operands(layer, device) for layer in layers)))
    common = dict(out_features=codes.shape[0], in_features=first.in_features, act_dtype=KERNEL_DTYPE,
                  device=str(torch.device(device)))
    if first.bits == 8:
        return kernels.PackedWeight(
            fmt="int8", tensors={"weight": codes.to(torch.int8).contiguous(),
                                 "scales": scales[:, 0].to(KERNEL_DTYPE).contiguous()},
            kernel="torch._weight_int8pack_mm", **common)
    scales_and_zeros = torch.stack([scales.T, zeros.T], dim=-1).to(KERNEL_DTYPE).contiguous()  # (groups, out, 2)
    return kernels.int4_packed(codes.to(torch.int32).contiguous(), scales_and_zeros, first.group_size, keep_codes=False,
                               **common)


_SAID: set[str] = set()


def _say_once(reason: str) -> None:
    if reason not in _SAID:
        _SAID.add(reason)
        warnings.warn(f"a quantized layer dequantizes at every call (slow): {reason}", KernelFallbackWarning,
                      stacklevel=4)


def kernel_for(layer: nn.Module, rows: int, device: Any) -> kernels.PackedWeight | None:
    """The packed weight ``layer`` multiplies ``rows`` input rows with on ``device``, or ``None`` to dequantize.

    Packs on first use and keeps the result on the layer (``layer._kernel``), keyed on the device and on the
    versions of the codes and scales, so an in-place change repacks; it is not a buffer, so it is not saved
    with the model, and ``QuantLinear`` drops it when moved or copied. It adds the kernel's copy of the weight
    (packed codes, a bf16 scale and zero per group) to the layer's own."""
    engine = getattr(layer, "engine", "auto")
    if engine == "dequantize" or (engine == "auto" and rows > KERNEL_MAX_ROWS):
        return None
    key = (str(torch.device(device)), layer.packed._version, layer.scales._version)
    cached = getattr(layer, "_kernel", None)
    if cached is None or cached[0] != key:
        choice = choose(layer, device)
        packed = None if choice.kernel == "dequantize" else pack(layer, device)
        object.__setattr__(layer, "_kernel", (key, choice, packed))
        cached = layer._kernel
    if cached[2] is None:
        _say_once(cached[1].reason)
    return cached[2]


def run(packed: kernels.PackedWeight, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x: (..., in_features)`` times the packed weight (plus ``bias``), in bfloat16, returned in ``x``'s dtype."""
    y = packed(x.reshape(-1, x.shape[-1]).to(packed.act_dtype)).to(x.dtype)
    y = y.view(*x.shape[:-1], packed.out_features)
    return y if bias is None else y + bias.to(x.dtype)


def set_engine(model: nn.Module, engine: str) -> None:
    """Set the ``engine`` (``"auto"``, ``"kernel"``, ``"dequantize"``) of every quantized layer of ``model``."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    for module in model.modules():
        if hasattr(module, "engine") and hasattr(module, "codes"):
            module.engine = engine


def summary(model: nn.Module, device: Any = None) -> dict[str, Any]:
    """How many quantized layers of ``model`` run each kernel on ``device`` (default: where they are) at a
    decode step, and the reasons of the ones that dequantize (no kernel fits, or ``engine="dequantize"``):
    ``{"int4": 210, "int8": 0, "dequantize": 0, "reasons": {reason: count}}``."""
    counts: Counter = Counter()
    reasons: Counter = Counter()
    for module in model.modules():
        if hasattr(module, "engine") and hasattr(module, "codes"):
            where = device if device is not None else module.packed.device
            choice = Choice("dequantize", "set to dequantize") if module.engine == "dequantize" else choose(module, where)
            counts[choice.kernel] += 1
            if choice.reason:
                reasons[choice.reason] += 1
    return {**{k: counts.get(k, 0) for k in ("int4", "int8", "dequantize")}, "reasons": dict(reasons)}
