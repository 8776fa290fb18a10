"""Bits per weight and memory: what a format costs, scales included, and what a model needs.

The one place the course turns formats into bytes. Conventions, used everywhere in the course:
**GB = 1e9 bytes** (as model cards, spec sheets and GPU names quote sizes) and **GiB = 2**30 bytes** (as
operating systems and llama.cpp report them); "bits per weight" includes the per-group scales (and zero
points) a group-wise format stores.

- :func:`bits_per_weight`: code bits plus a scale (and zero point) per group: INT4 g64 with FP16 scales
  is 4.25, with an 8-bit zero point too 4.375;
- :func:`blockwise_4bit_bits`: NF4/FP4 as bitsandbytes stores them (an FP32 absmax per block, 4.5 bits at
  blocks of 64; 4.127 with double quantization);
- :func:`stored_bits_per_weight`: bits per weight of a tensor actually stored (bytes x 8 / weights);
- :func:`bytes_per_parameter`, :func:`memory_estimate`, :func:`memory_table`, :func:`weight_gb`: from
  parameter counts to bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from course_utils.formats import NumberFormat, get_format

GB = 1e9  # bytes in a gigabyte, as model sizes are quoted
GiB = 2**30  # bytes in a gibibyte, as operating systems and llama.cpp report sizes


def _check_group_size(group_size: int) -> None:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive integer (e.g. 32, 64, 128) or None, got {group_size!r}")


def bits_per_weight(bits: float, group_size: int | None = None, scale_bits: int = 16, zero_bits: int = 0) -> float:
    """Stored bits per weight of a group-wise format: ``bits`` per code plus, per group of ``group_size``
    weights, one scale of ``scale_bits`` and one zero point of ``zero_bits`` (0 for symmetric grids).
    ``group_size`` None: a per-tensor scale, negligible and left out. INT4 g64 sym: 4 + 16/64 = 4.25."""
    if group_size is None:
        return float(bits)
    _check_group_size(group_size)
    if scale_bits <= 0 or zero_bits < 0:
        raise ValueError(f"scale_bits must be positive and zero_bits >= 0 (e.g. 16 and 8), got {scale_bits!r} and {zero_bits!r}")
    return bits + (scale_bits + zero_bits) / group_size


def blockwise_4bit_bits(block_size: int = 64, absmax_bits: int = 32, double_quant: bool = False,
                        dq_block_size: int = 256, dq_bits: int = 8) -> float:
    """Stored bits per weight of NF4/FP4 with one absmax per ``block_size`` weights (bitsandbytes' layout).

    Without double quantization: 4 + absmax_bits / block_size (4 + 32/64 = 4.5). With it, each absmax
    costs ``dq_bits`` and every ``dq_block_size`` of them share one float32 absmax:
    4 + 8/64 + 32/(64 * 256) = 4.127 (the one float32 offset per tensor is left out).
    """
    _check_group_size(block_size)
    if double_quant:
        return 4 + dq_bits / block_size + 32 / (block_size * dq_block_size)
    return 4 + absmax_bits / block_size


def stored_bits_per_weight(n_bytes: float, n_weights: int) -> float:
    """Bits per weight of ``n_weights`` weights held in ``n_bytes`` bytes (codes, scales and all)."""
    if not n_weights > 0:
        raise ValueError(f"n_weights must be positive, got {n_weights!r}")
    return 8 * n_bytes / n_weights


def weight_gb(n_params: float, bits: float) -> float:
    """GB (1e9 bytes) that ``n_params`` weights take at ``bits`` bits per weight (scales included)."""
    return n_params * bits / 8 / GB


def bytes_per_parameter(name: str | NumberFormat, group_size: int | None = None, scale_bits: int = 16) -> float:
    """Bytes each parameter costs in ``name``, scales included: (bits + scale_bits / group_size) / 8.
    With ``group_size`` (weights sharing one scale; formats of 8 bits or fewer) each group adds one
    scale of ``scale_bits`` bits: INT4 with groups of 128 and FP16 scales costs 4.125 bits = 0.515625
    bytes. Without it, the per-tensor scale is negligible and ignored. Raises ValueError for a
    non-positive group size or scale width, or a group size on a 16/32-bit float format."""
    fmt = get_format(name)
    if group_size is not None:
        _check_group_size(group_size)
        if fmt.bits > 8:
            raise ValueError(f"{fmt.name} is stored without group scales; use group_size=None (group sizes apply to formats of 8 bits or fewer)")
        if scale_bits <= 0:
            raise ValueError(f"scale_bits must be positive (16 for FP16 scales, 32 for FP32), got {scale_bits!r}")
    return bits_per_weight(fmt.bits, group_size, scale_bits) / 8


def memory_estimate(n_params: float, fmt: str | NumberFormat, group_size: int | None = None, kv_cache_bytes: float = 0, scale_bits: int = 16) -> float:
    """Bytes needed to hold ``n_params`` parameters in ``fmt`` (with group scales, see
    :func:`bytes_per_parameter`; ``scale_bits`` per group scale) plus ``kv_cache_bytes`` for the attention cache. Weights only: no
    activations or framework overhead. Raises ValueError for a non-positive parameter count or a
    negative KV-cache size."""
    if not n_params > 0:
        raise ValueError(f"n_params must be a positive number of parameters (e.g. 7e9 for a 7B model), got {n_params!r}")
    if not kv_cache_bytes >= 0:
        raise ValueError(f"kv_cache_bytes must be zero or positive, got {kv_cache_bytes!r}")
    return n_params * bytes_per_parameter(fmt, group_size, scale_bits) + kv_cache_bytes


def params_label(n_params: float) -> str:
    """A short label for a parameter count: 134_515_008 -> "135M", 7e9 -> "7B", 4.05e11 -> "405B"."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n_params >= size:
            return f"{n_params / size:.3g}{unit}"
    return f"{n_params:.0f}"


@dataclass(frozen=True)
class MemoryTable:
    """Weight memory in GB (1e9 bytes) for several models (``rows``: labels, ``params``: counts) in
    several formats (``columns``); ``gb[i][j]`` is model i in format j."""

    rows: tuple[str, ...]
    params: tuple[float, ...]
    columns: tuple[str, ...]
    gb: tuple[tuple[float, ...], ...]

    def value(self, row: str, column: str) -> float:
        """GB for the model labelled ``row`` in format ``column``."""
        return self.gb[self.rows.index(row)][self.columns.index(column)]

    def to_text(self, decimals: int = 2) -> str:
        """The table as aligned plain text (GB with ``decimals`` decimals)."""
        head = ["model", "params", *[f"{c} GB" for c in self.columns]]
        body = [[r, f"{p:,.0f}", *[f"{v:,.{decimals}f}" for v in vals]] for r, p, vals in zip(self.rows, self.params, self.gb)]
        widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]
        lines = [head, *body]
        return "\n".join("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths))) for line in lines)

    def __str__(self) -> str:
        return self.to_text()


def memory_table(
    model_sizes: Mapping[str, float] | Sequence[float],
    formats: Sequence[str] = ("fp32", "fp16", "int8", "int4", "int3"),
    group_size: int | None = None,
    scale_bits: int = 16,
) -> MemoryTable:
    """Weight memory (GB = 1e9 bytes) of each model size in each format. ``model_sizes`` maps labels
    to parameter counts, or is a list of counts (labelled by :func:`params_label`). ``group_size``
    applies to the formats of 8 bits or fewer only. 70B gives FP32 280, FP16 140, INT8 70, INT4 35,
    INT3 26.25 GB."""
    sizes = dict(model_sizes) if isinstance(model_sizes, Mapping) else {params_label(n): n for n in model_sizes}
    if not sizes:
        raise ValueError("model_sizes is empty; give parameter counts such as [7e9, 70e9] or {'70B': 70e9}")
    fmts = [get_format(f) for f in formats]
    gb = tuple(
        tuple(memory_estimate(n, f, group_size if f.bits <= 8 else None, 0, scale_bits) / GB for f in fmts)
        for n in sizes.values()
    )
    return MemoryTable(tuple(sizes), tuple(float(n) for n in sizes.values()), tuple(f.name for f in fmts), gb)
