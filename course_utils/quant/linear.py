"""A Linear layer that stores packed integer codes and dequantizes them on the fly, and a model converter.

``QuantLinear`` holds, as buffers: ``packed`` (uint8 bit stream of the codes, see
:mod:`course_utils.quant.packing`), ``scales`` (float16, one per group), ``zeros`` (uint8, asymmetric
only) and the float ``bias``. Its resident size is therefore what the theory says: ``bits`` per weight
plus 16 bits per group for the scale (and 8 for the zero point). ``forward`` rebuilds the float weight
and calls ``F.linear``: it saves memory, not time (lesson 03 shows kernels that save time).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from course_utils.models import model_bytes
from course_utils.quant import packing, rtn


@dataclass(frozen=True)
class RTNConfig:
    """How to quantize each Linear: ``bits`` (2-8), ``group_size`` (int, "channel" or "tensor"),
    ``symmetric`` (absmax) or zero-point, and ``clip`` (search a clip ratio per group)."""

    bits: int = 4
    group_size: rtn.Granularity = 64
    symmetric: bool = True
    clip: bool = False

    def label(self) -> str:
        """Short name such as ``int4 g64 sym``."""
        g = self.group_size if isinstance(self.group_size, str) else f"g{self.group_size}"
        return f"int{self.bits} {g} {'sym' if self.symmetric else 'asym'}{' clip' if self.clip else ''}"


class QuantLinear(nn.Module):
    """Drop-in replacement for ``nn.Linear`` with weights stored as packed ``bits``-bit codes."""

    def __init__(self, q: rtn.QuantizedTensor, bias: torch.Tensor | None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.out_features, self.in_features = q.codes.shape
        self.bits, self.group_size, self.symmetric = q.bits, q.group_size, q.symmetric
        self.compute_dtype = dtype
        offset = 0 if q.zeros is not None else 2 ** (q.bits - 1)  # signed codes stored unsigned
        self.register_buffer("packed", packing.pack(q.codes.to(torch.int64) + offset, q.bits))
        self.register_buffer("scales", q.scales.to(torch.float16))
        self.register_buffer("zeros", None if q.zeros is None else q.zeros.to(torch.uint8))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: RTNConfig, inputs: torch.Tensor | None = None) -> "QuantLinear":
        """Quantize an ``nn.Linear`` (weight (out, in)) with ``config``; ``inputs`` (n, in) guide the clip search."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"QuantLinear.from_linear needs an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        ratio = rtn.search_clip_ratio(w, config.bits, config.group_size, config.symmetric, inputs) if config.clip else 1.0
        q = rtn.quantize(w, config.bits, config.group_size, config.symmetric, ratio)
        return cls(q, linear.bias, dtype=w.dtype)

    def codes(self) -> torch.Tensor:
        """The integer codes, (out, in) int16 (signed for symmetric)."""
        n = self.out_features * self.in_features
        codes = packing.unpack(self.packed, self.bits, n).view(self.out_features, self.in_features)
        return codes if self.zeros is not None else codes - 2 ** (self.bits - 1)

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight (out, in) this layer computes with."""
        q = rtn.QuantizedTensor(
            self.codes(), self.scales.float(), None if self.zeros is None else self.zeros.to(torch.int16),
            self.bits, self.group_size, self.symmetric,
        )
        return q.dequantize().to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, group_size={self.group_size}, symmetric={self.symmetric}"


def theoretical_bits_per_weight(bits: int, group_size: int, symmetric: bool, scale_bits: int = 16) -> float:
    """Stored bits per weight: the code, plus one scale (and one 8-bit zero point) per group."""
    return bits + (scale_bits + (0 if symmetric else 8)) / group_size


@dataclass(frozen=True)
class QuantReport:
    """What ``quantize_model`` did: layers replaced, model bytes before/after, packed theory, seconds."""

    n_layers: int
    bytes_before: int
    bytes_after: int
    bytes_theory: int
    seconds: float

    @property
    def ratio(self) -> float:
        return self.bytes_before / self.bytes_after


def linear_layers(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> dict[str, nn.Linear]:
    """Every plain ``nn.Linear`` in ``model`` by qualified name (not subclasses such as bitsandbytes'
    layers), except those whose name contains a ``skip`` entry."""
    return {n: m for n, m in model.named_modules() if type(m) is nn.Linear and not any(s in n for s in skip)}


def replace_linears(
    model: nn.Module,
    make: Callable[[nn.Linear], nn.Module],
    skip: tuple[str, ...] = ("lm_head",),
    only: list[str] | None = None,
) -> dict[str, tuple[nn.Linear, nn.Module]]:
    """Put ``make(linear)`` in place of each target Linear layer of ``model``, in place.

    Targets: every plain Linear except names containing a ``skip`` entry, or exactly the names in
    ``only`` (each must be an ``nn.Linear``). Returns ``{name: (old layer, new layer)}``; raises
    ``ValueError`` for a non-Linear name in ``only`` or when there is nothing to replace. Every
    from-scratch quantizer of the course converts a model through this one function.
    """
    modules = dict(model.named_modules())
    if only is not None:
        wrong = [n for n in only if not isinstance(modules.get(n), nn.Linear)]
        if wrong:
            raise ValueError(f"only Linear layers can be quantized; not Linear (or missing): {wrong}")
        targets = {n: modules[n] for n in only}
    else:
        targets = linear_layers(model, skip)
    if not targets:
        raise ValueError(f"no nn.Linear layers to quantize in {type(model).__name__} (skip={skip})")
    replaced = {}
    for name, linear in targets.items():
        parent, _, child = name.rpartition(".")
        new = make(linear)
        setattr(modules[parent] if parent else model, child, new)
        replaced[name] = (linear, new)
    return replaced


def quantize_model(
    model: nn.Module, config: RTNConfig, skip: tuple[str, ...] = ("lm_head",), only: list[str] | None = None
) -> QuantReport:
    """Replace the model's Linear layers by ``QuantLinear`` in place (embeddings and output head stay float).

    ``skip``: name fragments to leave in float (the output head by default; pass ``()`` to quantize it
    too). ``only``: exact module names to quantize (each must be an ``nn.Linear``). Returns a
    :class:`QuantReport`; raises ``ValueError`` for a module that is not Linear or a model without any.
    """
    if isinstance(model, nn.Linear):
        raise ValueError("quantize_model expects a model containing Linear layers; for a single layer use QuantLinear.from_linear")
    before = model_bytes(model)
    start = time.perf_counter()
    replaced = replace_linears(model, lambda linear: QuantLinear.from_linear(linear, config), skip, only)
    seconds = time.perf_counter() - start
    float_bytes = sum(old.weight.numel() * old.weight.element_size() for old, _ in replaced.values())
    theory_bits = sum(
        old.weight.numel() * theoretical_bits_per_weight(config.bits, new.group_size, config.symmetric)
        for old, new in replaced.values()
    )
    return QuantReport(
        n_layers=len(replaced),
        bytes_before=before,
        bytes_after=model_bytes(model),
        bytes_theory=int(before - float_bytes + theory_bits / 8),
        seconds=seconds,
    )
