"""W8A8: weights *and* activations in 8 bits (int8 or FP8 E4M3), so the matmul itself runs in 8 bits.

Weight-only methods (lessons 04-09) store small weights and compute in float; W8A8 also rounds each
Linear's input, so an integer (or FP8) matmul can do the product: ``y = sx * sw * (qx @ qw^T)`` with
``qx`` (tokens, in) and ``qw`` (out, in) 8-bit codes, ``sw`` one scale per output channel and ``sx`` one
per token (``activations="token"``, computed on the fly) or one per tensor (``"tensor"``, fixed from
calibration text; values beyond it saturate). ``smooth_alpha`` runs SmoothQuant first
(:mod:`course_utils.quant.smoothquant`).

The matmul (:attr:`W8A8Linear.engine`): ``torch._int_mm`` (int8 x int8 -> int32) for int8 and
``torch._scaled_mm`` (FP8 x FP8 with a scale per row and per column) for FP8, when this torch build runs
them on the tensor's device; otherwise the codes are dequantized and multiplied in float (same result up
to float rounding: ``engine == "simulated"``, said once per model in the report).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from course_utils.quant import act_quant, smoothquant
from course_utils.quant.activations import input_statistics
from course_utils.quant.contract import QuantizedLayer, Report, convert, report_fields

ACTIVATIONS = ("token", "tensor")


@functools.lru_cache(maxsize=None)
def has_kernel(dtype: str, device: str = "cpu") -> bool:
    """Whether this torch build runs the 8-bit matmul for ``dtype`` ("int8": ``torch._int_mm``; "fp8":
    ``torch._scaled_mm``) on ``device``, tried once on a small product."""
    act_quant.check_dtype(dtype)
    try:
        if dtype == "int8":
            a = torch.ones(17, 32, dtype=torch.int8, device=device)
            return bool(torch._int_mm(a, a.t().contiguous()).eq(32).all())
        a = torch.ones(16, 32, device=device).to(torch.float8_e4m3fn)
        one = torch.ones(16, 1, device=device)
        out = torch._scaled_mm(a, a.t(), scale_a=one, scale_b=one.t(), out_dtype=torch.float32)
        return bool(out.eq(32).all())
    except (RuntimeError, NotImplementedError, AttributeError, TypeError):
        return False


class W8A8Linear(QuantizedLayer):
    """``nn.Linear`` replacement with 8-bit weights (out, in) and per-output-channel scales, which rounds
    its input to 8 bits too and multiplies the codes.

    Buffers: ``qweight`` (int8 or float8_e4m3fn, (out, in)), ``weight_scale`` (out,) float32,
    ``input_scale`` (a static per-tensor scale, or None for per-token), ``bias``."""

    def __init__(self, linear: nn.Linear, dtype: str = "int8", input_scale: torch.Tensor | None = None,
                 engine: str | None = None):
        super().__init__()
        w = linear.weight.detach()
        self.dtype_name = dtype
        self.out_features, self.in_features = w.shape
        self.compute_dtype = w.dtype
        scale = act_quant.absmax_scale(w, dtype, "token").reshape(-1)  # one per row of W: per output channel
        self.register_buffer("qweight", act_quant.quantize(w, scale.unsqueeze(1), dtype))
        self.register_buffer("weight_scale", scale)
        self.register_buffer("input_scale", None if input_scale is None else input_scale.detach().float().reshape(()))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.engine = engine or ("torch._int_mm" if dtype == "int8" else "torch._scaled_mm")
        if self.engine != "simulated" and not has_kernel(dtype, w.device.type):
            self.engine = "simulated"

    def _input_scale(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:
            return self.input_scale.expand(x.shape[0], 1)
        return act_quant.absmax_scale(x, self.dtype_name, "token")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        sx = self._input_scale(x2)
        qx = act_quant.quantize(x2, sx, self.dtype_name)
        if self.engine == "torch._int_mm":
            rows = qx.shape[0]
            if qx.is_cuda and rows <= 16:  # CUDA's int8 matmul wants more than 16 rows: pad a decode step
                qx = torch.cat([qx, qx.new_zeros(17 - rows, qx.shape[1])])
            acc = torch._int_mm(qx, self.qweight.t())[:rows].float()
            y = acc * sx * self.weight_scale
        elif self.engine == "torch._scaled_mm":
            y = torch._scaled_mm(qx, self.qweight.t(), scale_a=sx.float().contiguous(),
                                 scale_b=self.weight_scale.reshape(1, -1), out_dtype=torch.float32)
        else:
            y = (qx.float() * sx) @ (self.qweight.float() * self.weight_scale.unsqueeze(1)).t()
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def dequantized_weight(self) -> torch.Tensor:
        """The weight (out, in) the 8-bit codes stand for, in the layer's float dtype."""
        return (self.qweight.float() * self.weight_scale.unsqueeze(1)).to(self.compute_dtype)

    def extra_repr(self) -> str:
        a = "per-token" if self.input_scale is None else "static per-tensor"
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.dtype_name}, {a} activations, {self.engine}"


@dataclass(frozen=True)
class W8A8Config:
    """Weights and activations in ``dtype`` ("int8" or "fp8"), activation scales per ``activations``
    ("token": dynamic, or "tensor": static from calibration), SmoothQuant first if ``smooth_alpha`` is set
    (with llm-compressor's ``smooth_statistic="range"`` or the paper's "absmax"; ``smooth_groups``: which inputs,
    see :mod:`course_utils.quant.smoothquant`)."""

    method: ClassVar[str] = "w8a8"

    dtype: str = "int8"
    activations: str = "token"
    smooth_alpha: float | None = None
    smooth_statistic: str = "absmax"
    smooth_groups: tuple[str, ...] = smoothquant.SMOOTHED_GROUPS

    def __post_init__(self):
        act_quant.check_dtype(self.dtype)
        if self.activations not in ACTIVATIONS:
            raise ValueError(f"activations must be one of {ACTIVATIONS}, got {self.activations!r}")
        if self.smooth_alpha is not None:
            smoothquant.check_alpha(self.smooth_alpha)
        smoothquant.check_groups(self.smooth_groups)
        if self.smooth_statistic not in smoothquant.STATISTICS:
            raise ValueError(f"smooth_statistic must be one of {smoothquant.STATISTICS}, got {self.smooth_statistic!r}")

    @property
    def needs_calibration(self) -> bool:
        """Static scales and SmoothQuant read calibration text; dynamic per-token W8A8 does not."""
        return self.activations == "tensor" or self.smooth_alpha is not None

    def label(self) -> str:
        """Short name such as ``w8a8 int8 token`` or ``w8a8 fp8 tensor sq0.5``."""
        sq = "" if self.smooth_alpha is None else f" sq{self.smooth_alpha:g}"
        if self.smooth_alpha is not None and tuple(self.smooth_groups) != smoothquant.SMOOTHED_GROUPS:
            sq += "+" + "+".join(self.smooth_groups)
        return f"w8a8 {self.dtype} {self.activations}{sq}"


@dataclass(frozen=True)
class W8A8Report(Report):
    """A :class:`Report` with the matmul the layers run (``engine``) and SmoothQuant's record, if any."""

    engine: str = ""
    smoothing: smoothquant.Smoothing | None = None


def quantize_model(model: nn.Module, config: W8A8Config = W8A8Config(), calibration: torch.Tensor | None = None,
                   skip: tuple[str, ...] = ("lm_head",), batch_size: int = 4) -> W8A8Report:
    """Replace every ``nn.Linear`` (but ``skip``) of ``model`` by :class:`W8A8Linear`, in place, after
    folding SmoothQuant's factors if ``config.smooth_alpha`` is set. ``calibration``: token ids (n, seq_len),
    needed for static activation scales and for SmoothQuant."""
    if config.needs_calibration and calibration is None:
        raise ValueError(f"{config.label()} needs calibration token ids (course_utils.data.calibration_batches)")
    start = time.perf_counter()
    smoothing = None
    if config.smooth_alpha is not None:
        smoothing = smoothquant.smooth_model(model, calibration, config.smooth_alpha, config.smooth_statistic, batch_size,
                                             config.smooth_groups)
    scales: dict[str, torch.Tensor] = {}
    if config.activations == "tensor":
        stats = input_statistics(model, calibration, batch_size=batch_size)
        qmax = act_quant.check_dtype(config.dtype)
        scales = {n: (s.absmax.max() / qmax).clamp(min=1e-12) for n, s in stats.items()}
    layers = {id(m): n for n, m in model.named_modules()}
    make = lambda linear: W8A8Linear(linear, config.dtype, scales.get(layers[id(linear)]))  # noqa: E731
    replaced, report = convert(model, config, make, skip)
    engine = next(iter(replaced.values()))[1].engine
    notes = () if engine != "simulated" else (
        f"no {config.dtype} matmul in this torch build on this device: the codes are dequantized and multiplied in float",)
    fields = {**report_fields(report), "notes": report.notes + notes, "seconds": time.perf_counter() - start,
              "n_tokens": 0 if calibration is None or not config.needs_calibration else int(calibration.numel())}
    return W8A8Report(**fields, engine=engine, smoothing=smoothing)
