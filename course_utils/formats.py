"""Number formats: bit layouts, representable values, rounding, level tables.

A number format decides two things about every weight: how many bytes it costs, and which values it
can hold. This module describes the formats the course uses as small frozen dataclasses
(:class:`NumberFormat`), decodes single values bit by bit (:func:`decode_bits`), lists every value a
small format can hold (:func:`representable_values`) and rounds tensors to a format
(:func:`round_to_format`). Float rounding is done by torch's own dtypes; the bit arithmetic is done here
by hand and checked against torch on every call. The 4-bit level tables of NF4 and of bitsandbytes' FP4
live here too. What a format costs in bytes is :mod:`course_utils.memory`'s business.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

import torch

# The 16 NF4 ("4-bit NormalFloat") levels from QLoRA (Dettmers, Pagnoni, Holtzman & Zettlemoyer,
# "QLoRA: Efficient Finetuning of Quantized LLMs", 2023), as tabulated in bitsandbytes. They are
# quantiles of a standard normal distribution rescaled to [-1, 1], with an exact zero: 7 negative
# levels, 0, and 8 positive levels. Code i (4 bits) stands for NF4_LEVELS[i] times the block's absmax.
NF4_LEVELS: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

# bitsandbytes' FP4 levels in code order (code = sign bit, then 3 bits). The magnitudes are those of an
# E2M1 float, {0, 1, 1.5, 2, 3, 4, 6} / 6, except that the smallest non-zero magnitude is 1/192 instead of
# 0.5/6: this is the table bitsandbytes uses (its bit layout orders the exponents differently from
# IEEE-style E2M1, so code 0b011 is 1.0 and 0b110 is 1/6). Codes 8-15 are the negatives of codes 0-7.
_FP4_POSITIVE = (0.0, 1 / 192, 4 / 6, 6 / 6, 2 / 6, 3 / 6, 1 / 6, 1.5 / 6)
FP4_LEVELS: tuple[float, ...] = _FP4_POSITIVE + tuple(-v for v in _FP4_POSITIVE)


@dataclass(frozen=True)
class NumberFormat:
    """One number format. ``kind`` is "float" (sign, exponent, mantissa), "int" (two's complement
    integers, used with a scale) or "lookup" (a code indexing a table of levels, used with a scale).
    ``bias`` is the exponent bias; ``has_inf`` is False for FP8 E4M3 "fn", which trades infinities for
    one more binade of finite values (its only special pattern is NaN, S.1111.111)."""

    name: str
    bits: int
    kind: str
    exponent_bits: int = 0
    mantissa_bits: int = 0
    bias: int = 0
    has_inf: bool = True
    torch_dtype: torch.dtype | None = None
    levels: tuple[float, ...] = field(default=(), repr=False)
    aliases: tuple[str, ...] = field(default=(), repr=False)

    @property
    def int_min(self) -> int:
        """Smallest integer of an "int" format (two's complement), e.g. -8 for INT4."""
        return -(2 ** (self.bits - 1))

    @property
    def int_max(self) -> int:
        """Largest integer of an "int" format, e.g. 7 for INT4."""
        return 2 ** (self.bits - 1) - 1


FORMATS: dict[str, NumberFormat] = {
    f.name: f
    for f in (
        NumberFormat("fp32", 32, "float", 8, 23, 127, True, torch.float32, aliases=("float32", "float", "single")),
        NumberFormat("fp16", 16, "float", 5, 10, 15, True, torch.float16, aliases=("float16", "half")),
        NumberFormat("bf16", 16, "float", 8, 7, 127, True, torch.bfloat16, aliases=("bfloat16",)),
        NumberFormat(
            "fp8_e4m3", 8, "float", 4, 3, 7, False, torch.float8_e4m3fn,
            aliases=("e4m3", "e4m3fn", "fp8_e4m3fn", "float8_e4m3fn", "fp8"),
        ),
        NumberFormat("fp8_e5m2", 8, "float", 5, 2, 15, True, torch.float8_e5m2, aliases=("e5m2", "float8_e5m2")),
        NumberFormat("int8", 8, "int", aliases=("i8", "w8")),
        NumberFormat("int4", 4, "int", aliases=("i4", "w4")),
        NumberFormat("int3", 3, "int", aliases=("i3", "w3")),
        NumberFormat("nf4", 4, "lookup", levels=NF4_LEVELS, aliases=("normalfloat4",)),
    )
}

_ALIASES: dict[str, str] = {}
for _fmt in FORMATS.values():
    for _key in (_fmt.name, *_fmt.aliases):
        _ALIASES[_key] = _fmt.name


def get_format(name: str | NumberFormat) -> NumberFormat:
    """The :class:`NumberFormat` called ``name`` (case-insensitive; "-" and " " read as "_"; aliases
    such as "half", "float16", "bfloat16", "e4m3" accepted). A NumberFormat is returned unchanged.
    Raises ValueError listing the valid names when the name is unknown."""
    if isinstance(name, NumberFormat):
        return name
    key = str(name).strip().lower().replace("-", "_").replace(" ", "_")
    if key not in _ALIASES:
        valid = ", ".join(FORMATS)
        raise ValueError(f"unknown number format {name!r}; valid formats are: {valid} (aliases: {', '.join(sorted(set(_ALIASES) - set(FORMATS)))})")
    return FORMATS[_ALIASES[key]]


# ----------------------------------------------------------------------------------------------
# Floats by hand: encode a value to a bit pattern with round-to-nearest-even, and decode it back.


def _max_exponent_field(fmt: NumberFormat) -> int:
    all_ones = 2**fmt.exponent_bits - 1
    return all_ones - 1 if fmt.has_inf else all_ones


def _nan_pattern(fmt: NumberFormat, sign: int) -> int:
    mant = 2**fmt.mantissa_bits - 1 if not fmt.has_inf else 2 ** (fmt.mantissa_bits - 1)
    return (sign << (fmt.bits - 1)) | ((2**fmt.exponent_bits - 1) << fmt.mantissa_bits) | mant


def _encode_float(x: float, fmt: NumberFormat) -> int:
    """Bit pattern (an int of fmt.bits bits) of ``x`` rounded to nearest, ties to even mantissa.
    Overflow gives infinity, or the largest finite value for formats without infinities."""
    e_bits, m_bits = fmt.exponent_bits, fmt.mantissa_bits
    sign = 1 if math.copysign(1.0, x) < 0 else 0
    top = sign << (fmt.bits - 1)
    if math.isnan(x):
        return _nan_pattern(fmt, sign)
    # Overflow: IEEE formats go to infinity; formats without infinities saturate at their largest
    # finite value (S.1111.110 = 448 for E4M3), which is what torch's cast does (torch 2.13, CPU).
    overflow = top | ((2**e_bits - 1) << m_bits) if fmt.has_inf else top | ((2**e_bits - 1) << m_bits) | (2**m_bits - 2)
    if math.isinf(x):
        return overflow
    a = abs(x)
    if a == 0:
        return top
    e_min = 1 - fmt.bias
    exponent = max(math.frexp(a)[1] - 1, e_min)  # a = 1.f * 2**exponent for normals
    steps = round(Fraction(a) / Fraction(2) ** (exponent - m_bits))  # Fraction rounds half to even
    if steps == 2 ** (m_bits + 1):  # the mantissa rounded up to 2.0: carry into the exponent
        exponent, steps = exponent + 1, 2**m_bits
    if steps < 2**m_bits:  # subnormal (or rounded to zero): exponent field 0, no implicit 1
        return top | steps
    exp_field, mant = exponent + fmt.bias, steps - 2**m_bits
    if exp_field > _max_exponent_field(fmt) or (not fmt.has_inf and exp_field == 2**e_bits - 1 and mant == 2**m_bits - 1):
        return overflow
    return top | (exp_field << m_bits) | mant


def _split(pattern: int, fmt: NumberFormat) -> tuple[int, int, int]:
    m_bits = fmt.mantissa_bits
    return pattern >> (fmt.bits - 1), (pattern >> m_bits) & (2**fmt.exponent_bits - 1), pattern & (2**m_bits - 1)


def _decode_float(pattern: int, fmt: NumberFormat) -> tuple[Fraction | float, str]:
    """Exact value of a bit pattern (a Fraction, or a float for inf/NaN) and its category."""
    sign, exp_field, mant = _split(pattern, fmt)
    s = -1 if sign else 1
    all_ones = 2**fmt.exponent_bits - 1
    if exp_field == all_ones and fmt.has_inf:
        return (s * math.inf, "inf") if mant == 0 else (math.nan, "nan")
    if exp_field == all_ones and mant == 2**fmt.mantissa_bits - 1:
        return math.nan, "nan"
    if exp_field == 0:
        value = Fraction(mant, 2**fmt.mantissa_bits) * Fraction(2) ** (1 - fmt.bias)
        return s * value, ("zero" if mant == 0 else "subnormal")
    value = (1 + Fraction(mant, 2**fmt.mantissa_bits)) * Fraction(2) ** (exp_field - fmt.bias)
    return s * value, "normal"


def _torch_pattern(x: torch.Tensor, fmt: NumberFormat) -> int:
    """Bit pattern torch stores for the float32 scalar ``x`` cast to fmt's dtype."""
    y = x.to(fmt.torch_dtype)
    view = {8: torch.uint8, 16: torch.int16, 32: torch.int32}[fmt.bits]
    return int(y.view(view).item()) & (2**fmt.bits - 1)


@dataclass(frozen=True)
class DecodedValue:
    """A value stored in one format: ``bits`` (the pattern, fields separated by spaces), ``pattern``
    (the same as an int), ``sign``/``exponent``/``mantissa`` (the raw fields of a float format; None
    where the format has no such field), ``code`` (the integer or table index of int/lookup formats),
    ``stored`` (the value actually kept, after rounding, times ``scale``), ``exact`` (its exact
    decimal expansion) and ``category`` ("normal", "subnormal", "zero", "inf", "nan", "code")."""

    format: str
    input: float
    bits: str
    pattern: int
    sign: int | None
    exponent: int | None
    mantissa: int | None
    code: int | None
    stored: float
    exact: str
    category: str
    scale: float = 1.0

    @property
    def error(self) -> float:
        """Rounding error ``stored - input`` (same units as the input)."""
        return self.stored - self.input


def decode_bits(value: float | torch.Tensor, fmt: str | NumberFormat, scale: float = 1.0) -> DecodedValue:
    """Store one number in ``fmt`` and show its bits. The value (a Python float or a one-element
    tensor) is first read as float32, the precision the course's weights come in. Float formats round
    it with torch's dtype (round to nearest, ties to even); the fields are computed here by hand and
    checked against torch's bit pattern. Int formats store ``round(value / scale)`` clamped to the
    format's integers (two's complement bits); NF4 stores the index of the level nearest to
    ``value / scale``. ``stored`` is the value read back (times ``scale``), ``exact`` its exact decimal."""
    fmt = get_format(fmt)
    x32 = torch.as_tensor(value, dtype=torch.float32).reshape(())
    x = float(x32.item())
    if fmt.kind == "float":
        pattern = _encode_float(x, fmt)
        torch_pattern = _torch_pattern(x32, fmt)
        exact_value, category = _decode_float(pattern, fmt)
        if category != "nan" and pattern != torch_pattern:
            raise RuntimeError(f"bit arithmetic disagrees with torch for {x!r} in {fmt.name}: {pattern:#x} vs {torch_pattern:#x}")
        torch_value = float(x32.to(fmt.torch_dtype).float().item())
        if category == "nan":
            if not math.isnan(torch_value):
                raise RuntimeError(f"{x!r} in {fmt.name}: expected NaN, torch stored {torch_value}")
        elif float(exact_value) != torch_value:
            raise RuntimeError(f"decoded {float(exact_value)} but torch stored {torch_value} for {x!r} in {fmt.name}")
        sign, exp_field, mant = _split(pattern, fmt)
        bits = f"{sign} {exp_field:0{fmt.exponent_bits}b} {mant:0{fmt.mantissa_bits}b}"
        exact = _exact_decimal(exact_value) if isinstance(exact_value, Fraction) else str(exact_value)
        return DecodedValue(fmt.name, x, bits, pattern, sign, exp_field, mant, None, float(exact_value), exact, category)
    if scale <= 0 or not math.isfinite(scale):
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    if fmt.kind == "int":
        code = int(torch.clamp(torch.round(x32 / scale), fmt.int_min, fmt.int_max).item())
        pattern = code & (2**fmt.bits - 1)
        stored = code * scale
        sign = pattern >> (fmt.bits - 1)
    else:
        levels = torch.tensor(fmt.levels)
        code = int(torch.argmin((levels - x32 / scale).abs()).item())
        pattern, stored, sign = code, fmt.levels[code] * scale, None
    return DecodedValue(fmt.name, x, f"{pattern:0{fmt.bits}b}", pattern, sign, None, None, code, stored, _exact_decimal(Fraction(stored)), "code", scale)


def _exact_decimal(q: Fraction) -> str:
    """Exact decimal expansion of a dyadic rational (every binary float is one)."""
    if q == 0:
        return "0"
    digits = 0
    while (q * 10**digits).denominator != 1:
        digits += 1
    text = f"{abs(q.numerator) * 10**digits // q.denominator:0{digits + 1}d}"
    text = text[:-digits] + "." + text[-digits:] if digits else text
    return ("-" if q < 0 else "") + text


# ----------------------------------------------------------------------------------------------
# Range, representable values, rounding.


@dataclass(frozen=True)
class FormatRange:
    """Range and resolution of a format. Floats: ``max`` (largest finite), ``smallest_normal``,
    ``smallest_subnormal`` and ``epsilon`` (gap between 1 and the next larger value, 2**-mantissa_bits).
    Ints: ``min``/``max`` are the integers, ``epsilon`` is 1 (one step); NF4: the level range [-1, 1],
    epsilon None (its steps are uneven). Values are plain floats, unitless (times the scale, if any)."""

    name: str
    min: float
    max: float
    smallest_normal: float | None
    smallest_subnormal: float | None
    epsilon: float | None


def format_range(fmt: str | NumberFormat) -> FormatRange:
    """Range and precision of ``fmt``, worked out from its bit layout (see :class:`FormatRange`)."""
    fmt = get_format(fmt)
    if fmt.kind == "int":
        return FormatRange(fmt.name, float(fmt.int_min), float(fmt.int_max), None, None, 1.0)
    if fmt.kind == "lookup":
        smallest = min(abs(v) for v in fmt.levels if v != 0)
        return FormatRange(fmt.name, min(fmt.levels), max(fmt.levels), None, smallest, None)
    m = fmt.mantissa_bits
    top_mantissa = 2**m - 1 - (0 if fmt.has_inf else 1)  # E4M3fn's S.1111.111 is NaN
    largest = (1 + top_mantissa / 2**m) * 2.0 ** (_max_exponent_field(fmt) - fmt.bias)
    return FormatRange(fmt.name, -largest, largest, 2.0 ** (1 - fmt.bias), 2.0 ** (1 - fmt.bias - m), 2.0**-m)


def representable_values(fmt: str | NumberFormat) -> torch.Tensor:
    """Every distinct finite value of ``fmt``, sorted ascending, as a float32 tensor (+0 and -0 count
    once). Float formats enumerate all 2**bits bit patterns (65,536 for FP16/BF16); INT formats give
    their integers; NF4 its 16 levels. FP32 (4 billion patterns) is refused with a ValueError."""
    fmt = get_format(fmt)
    if fmt.bits > 16:
        raise ValueError(f"{fmt.name} has 2**{fmt.bits} bit patterns, too many to list; use a format of 16 bits or fewer")
    if fmt.kind == "int":
        return torch.arange(fmt.int_min, fmt.int_max + 1, dtype=torch.float32)
    if fmt.kind == "lookup":
        return torch.tensor(sorted(fmt.levels), dtype=torch.float32)
    patterns = torch.arange(2**fmt.bits, dtype=torch.int32)
    raw = patterns.to(torch.uint8) if fmt.bits == 8 else patterns.to(torch.int16)
    values = raw.view(fmt.torch_dtype).to(torch.float32)
    return torch.unique(values[torch.isfinite(values)])  # sorted; -0.0 and 0.0 merge


def round_to_format(tensor: torch.Tensor, fmt: str | NumberFormat) -> torch.Tensor:
    """``tensor`` (any shape) rounded to ``fmt`` and returned as float32 of the same shape. Floats use
    torch's cast (values beyond the range become inf; FP8 E4M3, which has no inf, saturates at +-448). INT and NF4 use the
    simplest scheme, one symmetric absmax scale for the whole tensor (the mapping lessons refine it
    per channel and per group): INTb maps the largest |value| to 2**(b-1)-1, NF4 to level 1.0."""
    fmt = get_format(fmt)
    x = tensor.detach().to(torch.float32)
    if fmt.kind == "float":
        return x.to(fmt.torch_dtype).to(torch.float32)
    absmax = x.abs().max()
    if absmax == 0:
        return x.clone()
    if fmt.kind == "int":
        scale = absmax / fmt.int_max
        return torch.clamp(torch.round(x / scale), -fmt.int_max, fmt.int_max) * scale
    levels = torch.tensor(fmt.levels, dtype=torch.float32, device=x.device)
    codes = torch.bucketize(x / absmax, (levels[1:] + levels[:-1]) / 2)  # nearest level
    return levels[codes] * absmax


def relative_error(tensor: torch.Tensor, fmt: str | NumberFormat) -> float:
    """Relative rounding error of storing ``tensor`` in ``fmt``: ||round(x) - x|| / ||x|| (L2 norms,
    unitless; 0.01 means the error is 1% of the tensor's size)."""
    x = tensor.detach().to(torch.float32)
    return float(torch.linalg.vector_norm(round_to_format(x, fmt) - x) / torch.linalg.vector_norm(x))
