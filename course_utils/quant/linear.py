"""A Linear layer that stores packed integer codes and dequantizes them on the fly; RTN for a whole model.

``QuantLinear`` holds, as buffers: ``packed`` (uint8 bit stream of the codes, see
:mod:`course_utils.quant.packing`), ``scales`` (float16, one per group), ``zeros`` (uint8, asymmetric
only) and the float ``bias``. Its resident size is therefore what the theory says: ``bits`` per weight
plus 16 bits per group for the scale (and 8 for the zero point). ``forward`` asks
:mod:`course_utils.quant.kernel_path` which matmul to run: a real int4 or int8 kernel reading packed
bits (decode steps, where a kernel fits), or rebuilding the float weight and calling ``F.linear``
(long inputs, and layers no kernel fits). The layer's ``engine`` attribute overrides the choice.

:func:`quantize_model` is round-to-nearest for a model (:class:`RTNConfig`), following the course's
quantizer contract (:mod:`course_utils.quant.contract`); GPTQ and AWQ store their results as
``QuantLinear`` too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from course_utils import memory
from course_utils.quant import kernel_path, packing, rtn
from course_utils.quant.contract import QuantizedLayer, Report, convert, report_fields


@dataclass(frozen=True)
class RTNConfig:
    """How to quantize each Linear: ``bits`` (2-8), ``group_size`` (int, "channel" or "tensor"),
    ``symmetric`` (absmax) or zero-point, ``clip`` (search a clip ratio per group), ``full_grid``
    (symmetric codes on all 2**bits levels, -8..7 for 4 bits, as llama.cpp's Q4_0; see :mod:`rtn`)."""

    method: ClassVar[str] = "rtn"
    needs_calibration: ClassVar[bool] = False

    bits: int = 4
    group_size: rtn.Granularity = 64
    symmetric: bool = True
    clip: bool = False
    full_grid: bool = False

    def __post_init__(self):
        rtn.check_bits(self.bits)
        rtn.check_grid(self.symmetric, self.full_grid)

    def label(self) -> str:
        """Short name such as ``int4 g64 sym`` (``sym full`` on the full grid)."""
        g = self.group_size if isinstance(self.group_size, str) else f"g{self.group_size}"
        grid = "sym full" if self.full_grid else "sym" if self.symmetric else "asym"
        return f"int{self.bits} {g} {grid}{' clip' if self.clip else ''}"


class QuantLinear(QuantizedLayer):
    """Drop-in replacement for ``nn.Linear`` with weights stored as packed ``bits``-bit codes."""

    engine: str = "auto"  # see course_utils.quant.kernel_path: "auto", "kernel" or "dequantize"

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
        ratio = (rtn.search_clip_ratio(w, config.bits, config.group_size, config.symmetric, inputs,
                                       full_grid=config.full_grid) if config.clip else 1.0)
        q = rtn.quantize(w, config.bits, config.group_size, config.symmetric, ratio, config.full_grid)
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
        rows = x.numel() // x.shape[-1]
        packed = kernel_path.kernel_for(self, rows, x.device)
        if packed is not None:
            return kernel_path.run(packed, x, self.bias)
        return F.linear(x, self.dequantized_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def _apply(self, fn, recurse=True):
        """``.to()``, ``.cuda()``, ``.bfloat16()``... move the scales but keep them float16 (a cast to bf16 would
        round the stored weights), and drop the kernel's packed copy (it repacks on the next call)."""
        scales = self.scales
        super()._apply(fn, recurse)
        self.scales = scales.to(self.packed.device)
        self.__dict__.pop("_kernel", None)
        return self

    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state.pop("_kernel", None)  # copies repack on their first call instead of sharing these tensors
        return state

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, group_size={self.group_size}, symmetric={self.symmetric}"


@dataclass(frozen=True)
class RTNReport(Report):
    """:class:`~course_utils.quant.contract.Report` plus ``bytes_theory``: the model's bytes if every
    replaced weight took exactly :func:`course_utils.memory.bits_per_weight` bits."""

    bytes_theory: int


def quantize_model(
    model: nn.Module, config: RTNConfig, calibration: torch.Tensor | None = None,
    skip: tuple[str, ...] = ("lm_head",), only: list[str] | None = None,
) -> RTNReport:
    """Round every Linear of ``model`` to nearest with ``config``, in place, as ``QuantLinear`` layers
    (embeddings and output head stay float). ``calibration`` is not used (RTN needs none).

    ``skip``: name fragments to leave in float (the output head by default; pass ``()`` to quantize it
    too). ``only``: exact module names to quantize (each must be an ``nn.Linear``). Returns an
    :class:`RTNReport`; raises ``ValueError`` for a module that is not Linear, a model without any, an
    already quantized model, or weights holding NaN or inf.
    """
    replaced, report = convert(model, config, lambda linear: QuantLinear.from_linear(linear, config), skip, only)
    float_bytes = sum(old.weight.numel() * old.weight.element_size() for old, _ in replaced.values())
    zero_bits = 0 if config.symmetric else 8
    theory_bits = sum(old.weight.numel() * memory.bits_per_weight(config.bits, new.group_size, 16, zero_bits)
                      for old, new in replaced.values())
    return RTNReport(**report_fields(report), bytes_theory=int(report.bytes_before - float_bytes + theory_bits / 8))
