"""Real weight-only matrix-vector kernels, wrapped in one place: fp32, bf16, fp16, int8 and int4.

A decode step multiplies one activation row ``x: (1, in_features)`` by each weight
``W: (out_features, in_features)``. Storing W in fewer bits means fewer bytes to stream, but only
if a kernel reads the packed bits directly and dequantizes in registers. PyTorch ships such kernels
as private operators (their names start with an underscore and may change between versions, which
is why every call to them lives in this module):

- int8, per output channel, symmetric: ``torch._weight_int8pack_mm(x, w_int8, scales)`` computes
  ``x @ (w_int8 * scales[:, None]).T``; CPU, and CUDA where this torch build has it.
- int4, per group of ``group_size`` input columns, asymmetric: on CPU
  ``torch._weight_int4pack_mm_for_cpu(x, packed, group_size, scales_and_zeros)`` with
  ``packed = torch._convert_weight_to_int4pack_for_cpu(codes_int32, 1)``; on CUDA (compute
  capability 8.0 or newer, bfloat16 input) ``torch._weight_int4pack_mm`` with
  ``torch._convert_weight_to_int4pack``. Codes are 0..15 and the weight they stand for is
  ``(code - 8) * scale + zero`` (checked against a dequantized matmul in tests/test_kernels.py).
  ``scales_and_zeros`` has shape ``(in_features // group_size, out_features, 2)``.

The kernels take the activation in a floating-point dtype (``act_dtype``): bfloat16 is their fast
path; float32 inputs work but run a slower path (measured in lesson 3). Timing them over formats and
batch sizes is :mod:`course_utils.kernel_sweeps`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from course_utils import memory

FORMATS = ("fp32", "bf16", "fp16", "int8", "int4")
FLOAT_FORMATS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_CUDA_INT4_INNER_K_TILES = (8, 4, 2)  # tinygemm's tile choices: in_features must be a multiple of 16 x tiles


def cuda_inner_k_tiles(in_features: int) -> int | None:
    """The largest tile count of the CUDA int4 kernel that divides ``in_features`` (e.g. 4 for 576), or None."""
    return next((t for t in _CUDA_INT4_INNER_K_TILES if in_features % (16 * t) == 0), None)


def _device_type(device: Any) -> str:
    return torch.device(device).type


def _has_op(name: str) -> bool:
    return hasattr(torch.ops.aten, name)


@dataclass
class PackedWeight:
    """A weight ``(out_features, in_features)`` stored in one format, ready for its GEMV kernel.

    ``tensors`` holds what the kernel reads (weights and, for int formats, scales); ``nbytes`` is
    their total size, i.e. the bytes one GEMV must stream from memory.
    """

    fmt: str
    out_features: int
    in_features: int
    act_dtype: torch.dtype
    device: str
    tensors: dict[str, torch.Tensor]
    group_size: int | None = None
    kernel: str = ""
    codes: torch.Tensor | None = field(default=None, repr=False)  # int4 codes 0..15 (for dequantize)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def bits_per_weight(self) -> float:
        """Storage bits per weight, scales included."""
        return memory.stored_bits_per_weight(self.nbytes, self.out_features * self.in_features)

    @property
    def label(self) -> str:
        """e.g. ``"int8 (bf16 input)"``; float formats are just their name (see :func:`variant_label`)."""
        return variant_label(self.fmt, self.act_dtype)

    def __post_init__(self):
        self.matmul = self._matmul()

    def _matmul(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The kernel call with this weight's tensors bound, resolved once (a decode step makes hundreds)."""
        t, g = self.tensors, self.group_size
        if self.fmt in FLOAT_FORMATS:
            w = t["weight"]
            return lambda x: torch.nn.functional.linear(x, w)
        if self.fmt == "int8":
            w, s = t["weight"], t["scales"]
            return lambda x: torch._weight_int8pack_mm(x, w, s)
        w, sz = t["weight"], t["scales_and_zeros"]
        op = torch._weight_int4pack_mm if _device_type(self.device) == "cuda" else torch._weight_int4pack_mm_for_cpu
        return lambda x: op(x, w, g, sz)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (m, in_features)`` in ``act_dtype`` -> ``(m, out_features)``."""
        return self.matmul(x)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight ``(out_features, in_features)`` that this format represents."""
        t = self.tensors
        if self.fmt in FLOAT_FORMATS:
            return t["weight"].float()
        if self.fmt == "int8":
            return t["weight"].float() * t["scales"].float()[:, None]
        sz = t["scales_and_zeros"].float()  # (groups, out, 2)
        scales = sz[..., 0].T.repeat_interleave(self.group_size, dim=1)
        zeros = sz[..., 1].T.repeat_interleave(self.group_size, dim=1)
        return (self.codes.float() - 8) * scales + zeros

    def clone(self) -> PackedWeight:
        """An independent copy (same values, new memory): used to defeat caches when timing."""
        return PackedWeight(
            fmt=self.fmt,
            out_features=self.out_features,
            in_features=self.in_features,
            act_dtype=self.act_dtype,
            device=self.device,
            tensors={k: v.clone() for k, v in self.tensors.items()},
            group_size=self.group_size,
            kernel=self.kernel,
            codes=self.codes,
        )


def kernel_support(fmt: str, device: Any = "cpu", act_dtype: torch.dtype | None = None) -> str | None:
    """``None`` when a GEMV kernel for ``fmt`` runs on ``device``, else the reason it does not."""
    if fmt not in FORMATS:
        return f"unknown format {fmt!r}; expected one of {FORMATS}"
    kind = _device_type(device)
    if fmt in FLOAT_FORMATS:
        return None
    act_dtype = act_dtype or torch.bfloat16
    if fmt == "int8":
        if not _has_op("_weight_int8pack_mm"):
            return f"torch {torch.__version__} has no torch._weight_int8pack_mm"
        if kind == "cuda":
            return _probe(device, "int8", act_dtype)
        return None
    if kind == "cuda":
        if not (_has_op("_weight_int4pack_mm") and _has_op("_convert_weight_to_int4pack")):
            return f"torch {torch.__version__} has no torch._weight_int4pack_mm"
        if act_dtype != torch.bfloat16:
            return "the CUDA int4 kernel (tinygemm) takes bfloat16 inputs only"
        if torch.cuda.get_device_capability(torch.device(device)) < (8, 0):
            return "the CUDA int4 kernel needs compute capability 8.0 or newer"
        return _probe(device, "int4", act_dtype)
    if kind != "cpu":
        return f"no int4 GEMV kernel wrapped for device type {kind!r}"
    if not (_has_op("_weight_int4pack_mm_for_cpu") and _has_op("_convert_weight_to_int4pack_for_cpu")):
        return f"torch {torch.__version__} has no torch._weight_int4pack_mm_for_cpu"
    return None


_PROBED: dict[tuple[str, str, torch.dtype], str | None] = {}


def _probe(device: Any, fmt: str, act_dtype: torch.dtype) -> str | None:
    """Run the kernel once on a small matrix; return the error text if it fails."""
    key = (str(device), fmt, act_dtype)
    if key not in _PROBED:
        try:
            w = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
            packed = _pack(w.to(device), fmt, 64, act_dtype)
            packed(torch.ones(1, 256, dtype=act_dtype, device=device))
            _PROBED[key] = None
        except (RuntimeError, NotImplementedError) as err:
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            _PROBED[key] = f"not available in torch {torch.__version__} on {device}: {first_line}"
    return _PROBED[key]


def pack_weight(
    weight: torch.Tensor, fmt: str, group_size: int = 128, act_dtype: torch.dtype | None = None
) -> PackedWeight:
    """Store ``weight: (out_features, in_features)`` in ``fmt`` on the weight's device.

    Float formats cast the weight. ``"int8"``: symmetric round-to-nearest per output row, scale =
    max|w| / 127. ``"int4"``: asymmetric round-to-nearest per group of ``group_size`` consecutive
    input columns, codes 0..15, weight = (code - 8) * scale + zero. ``act_dtype`` is the input
    dtype the kernel will be called with (default: the float format itself; bfloat16 for int).
    Raises ``RuntimeError`` with the reason when this device has no kernel for ``fmt``.
    """
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if fmt in FLOAT_FORMATS:
        act_dtype = FLOAT_FORMATS[fmt]
    act_dtype = act_dtype or torch.bfloat16
    reason = kernel_support(fmt, weight.device, act_dtype)
    if reason:
        raise RuntimeError(f"cannot run a {fmt} GEMV here: {reason}")
    return _pack(weight, fmt, group_size, act_dtype)


def _pack(weight: torch.Tensor, fmt: str, group_size: int, act_dtype: torch.dtype) -> PackedWeight:
    out_features, in_features = weight.shape
    device = str(weight.device)
    common = dict(out_features=out_features, in_features=in_features, act_dtype=act_dtype, device=device)
    if fmt in FLOAT_FORMATS:
        w = weight.to(FLOAT_FORMATS[fmt]).contiguous()
        return PackedWeight(fmt=fmt, tensors={"weight": w}, kernel="torch.nn.functional.linear", **common)
    w = weight.float()
    if fmt == "int8":
        scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).to(act_dtype)
        codes = torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        return PackedWeight(
            fmt=fmt, tensors={"weight": codes, "scales": scales}, kernel="torch._weight_int8pack_mm", **common
        )
    if fmt != "int4":
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    if in_features % group_size:
        raise ValueError(
            f"group_size {group_size} does not divide in_features {in_features}; "
            f"choose a divisor of {in_features} (e.g. 32 or 64)"
        )
    rows_multiple = 8 if _device_type(device) == "cuda" else 16
    cols_multiple = 16 * min(_CUDA_INT4_INNER_K_TILES) if _device_type(device) == "cuda" else 2
    if out_features % rows_multiple or in_features % cols_multiple:
        raise ValueError(
            f"the int4 kernel on {device} needs out_features a multiple of {rows_multiple} and "
            f"in_features a multiple of {cols_multiple}; got {out_features} x {in_features}"
        )
    groups = w.reshape(out_features, in_features // group_size, group_size)
    low, high = groups.amin(dim=2), groups.amax(dim=2)
    scales = ((high - low) / 15).clamp(min=1e-12).to(act_dtype).float()
    zeros = (low + 8 * scales).to(act_dtype).float()
    codes = torch.round((groups - zeros[..., None]) / scales[..., None] + 8).clamp(0, 15)
    codes = codes.reshape(out_features, in_features).to(torch.int32).contiguous()
    scales_and_zeros = torch.stack([scales.T, zeros.T], dim=-1).to(act_dtype).contiguous()
    return int4_packed(codes, scales_and_zeros, group_size, **common)


def int4_packed(codes: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int, keep_codes: bool = True,
                **common: Any) -> PackedWeight:
    """A :class:`PackedWeight` for the int4 kernel from ``codes`` (out, in) int32 0..15 and ``scales_and_zeros``
    (in // group_size, out, 2) in the activation dtype; the weight is ``(code - 8) * scale + zero``.
    ``keep_codes``: keep a uint8 copy of the codes (a byte per weight) so that :meth:`PackedWeight.dequantize`
    works. ``common``: the other fields (``out_features``, ``in_features``, ``act_dtype``, ``device``)."""
    if _device_type(common["device"]) == "cuda":
        nibbles = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
        packed = torch._convert_weight_to_int4pack(nibbles, cuda_inner_k_tiles(codes.shape[1]))
        kernel = "torch._weight_int4pack_mm"
    else:
        packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
        kernel = "torch._weight_int4pack_mm_for_cpu"
    return PackedWeight(
        fmt="int4",
        tensors={"weight": packed, "scales_and_zeros": scales_and_zeros},
        group_size=group_size,
        kernel=kernel,
        codes=codes.to(torch.uint8) if keep_codes else None,
        **common,
    )


def gemv_input(in_features: int, dtype: torch.dtype, device: Any = "cpu", seed: int = 0) -> torch.Tensor:
    """A seeded random activation row ``(1, in_features)`` in ``dtype`` on ``device``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, in_features, generator=gen).to(device=device, dtype=dtype)


def variant_label(fmt: str, act_dtype: torch.dtype | None = None) -> str:
    """Label of a (format, input dtype) pair, e.g. ``"fp16"`` or ``"int4 (fp32 input)"``."""
    if fmt in FLOAT_FORMATS:
        return fmt
    return f"{fmt} ({DTYPE_NAMES[act_dtype or torch.bfloat16]} input)"
