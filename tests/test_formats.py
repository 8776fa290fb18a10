"""Tests of course_utils.formats and the memory calculator's logic, with values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from course_utils.formats import (
    FORMATS,
    NF4_LEVELS,
    decode_bits,
    format_range,
    get_format,
    relative_error,
    representable_values,
    round_to_format,
)
from course_utils.memory import bytes_per_parameter, memory_estimate, memory_table, params_label
from course_utils.widgets import memory_fit


# --- names ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "alias, name",
    [("fp16", "fp16"), ("Float16", "fp16"), ("half", "fp16"), ("BF16", "bf16"), ("bfloat16", "bf16"),
     ("e4m3", "fp8_e4m3"), ("FP8_E4M3", "fp8_e4m3"), ("float8_e4m3fn", "fp8_e4m3"), ("e5m2", "fp8_e5m2"),
     ("fp8-e5m2", "fp8_e5m2"), ("INT4", "int4"), ("nf4", "nf4"), ("float32", "fp32")],
)
def test_get_format_aliases(alias, name):
    assert get_format(alias).name == name


def test_unknown_format_names_the_valid_ones():
    with pytest.raises(ValueError, match="fp16.*bf16.*int4"):
        get_format("fp12")


# --- bits ----------------------------------------------------------------------------------------


def test_fp16_bits_of_one_and_minus_two():
    one = decode_bits(1.0, "fp16")
    assert one.pattern == 0x3C00 and one.bits == "0 01111 0000000000"
    assert (one.sign, one.exponent, one.mantissa, one.stored, one.exact) == (0, 15, 0, 1.0, "1")
    minus_two = decode_bits(-2.0, "fp16")
    assert minus_two.pattern == 0xC000 and (minus_two.sign, minus_two.exponent, minus_two.mantissa) == (1, 16, 0)


def test_decimal_point_one_in_fp16_and_bf16():
    # 0.1 = 1.6 * 2**-4; fp16 keeps 10 mantissa bits: round(0.6 * 1024) = 614 -> 1638/16384.
    d = decode_bits(0.1, "fp16")
    assert (d.exponent, d.mantissa) == (15 - 4, 614) and d.stored == 1638 / 16384
    assert d.exact == "0.0999755859375"
    # bf16 keeps 7 bits: round(0.6 * 128) = 77 -> 205/2048.
    b = decode_bits(0.1, "bf16")
    assert (b.exponent, b.mantissa, b.stored) == (127 - 4, 77, 205 / 2048)


def test_e4m3_overflow_saturates_and_e5m2_overflows_to_inf():
    assert decode_bits(1000.0, "e4m3").stored == 448.0
    assert decode_bits(1e5, "e5m2").category == "inf"
    assert decode_bits(65520.0, "fp16").category == "inf"  # halfway above 65504 rounds to even: inf
    assert decode_bits(65519.0, "fp16").stored == 65504.0


def test_subnormal_fields():
    d = decode_bits(2.0**-24, "fp16")  # the smallest fp16 subnormal
    assert (d.exponent, d.mantissa, d.category) == (0, 1, "subnormal")


@pytest.mark.parametrize("name", ["fp16", "bf16", "fp8_e4m3", "fp8_e5m2", "fp32"])
def test_hand_encoding_matches_torch_on_random_values(name):
    # decode_bits raises if its bit arithmetic and torch's cast disagree.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, generator=g) * torch.exp(torch.randn(400, generator=g) * 6)
    for v in x.tolist():
        d = decode_bits(v, name)
        assert d.stored == float(torch.tensor(v).to(get_format(name).torch_dtype).float()) or d.category == "nan"


def test_int_and_nf4_codes():
    d = decode_bits(0.3, "int8", scale=0.01)
    assert d.code == 30 and d.bits == "00011110"
    clipped = decode_bits(-0.3, "int4", scale=0.01)
    assert clipped.code == -8 and clipped.bits == "1000"  # two's complement of -8
    n = decode_bits(-0.5, "nf4", scale=1.0)
    assert n.code == 2 and n.stored == NF4_LEVELS[2]
    with pytest.raises(ValueError, match="scale"):
        decode_bits(1.0, "int8", scale=0.0)


# --- range and values ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, largest, smallest_normal, smallest_sub, eps",
    [
        ("fp16", 65504.0, 2.0**-14, 2.0**-24, 2.0**-10),
        ("bf16", (2 - 2.0**-7) * 2.0**127, 2.0**-126, 2.0**-133, 2.0**-7),
        ("fp8_e4m3", 448.0, 2.0**-6, 2.0**-9, 2.0**-3),
        ("fp8_e5m2", 57344.0, 2.0**-14, 2.0**-16, 2.0**-2),
        ("fp32", (2 - 2.0**-23) * 2.0**127, 2.0**-126, 2.0**-149, 2.0**-23),
    ],
)
def test_float_ranges(name, largest, smallest_normal, smallest_sub, eps):
    r = format_range(name)
    assert (r.max, r.min, r.smallest_normal, r.smallest_subnormal, r.epsilon) == (largest, -largest, smallest_normal, smallest_sub, eps)
    assert r.max == torch.finfo(get_format(name).torch_dtype).max


def test_bf16_max_is_about_3_39e38():
    assert format_range("bf16").max == pytest.approx(3.3895e38, rel=1e-4)  # (2 - 2**-7) * 2**127, to the 5 digits quoted


def test_int_ranges():
    assert (format_range("int8").min, format_range("int8").max) == (-128, 127)
    assert (format_range("int4").min, format_range("int4").max) == (-8, 7)
    assert (format_range("int3").min, format_range("int3").max) == (-4, 3)


@pytest.mark.parametrize(
    "name, count",
    [
        ("fp8_e4m3", 256 - 2 - 1),  # minus the two NaNs (S.1111.111), -0 == +0
        ("fp8_e5m2", 256 - 2 * 4 - 1),  # exponent 11111 is inf or NaN (4 patterns per sign), -0 == +0
        ("int8", 256),
        ("int4", 16),
        ("int3", 8),
        ("nf4", 16),
        ("fp16", 65536 - 2 * 1024 - 1),
        ("bf16", 65536 - 2 * 128 - 1),
    ],
)
def test_number_of_finite_values(name, count):
    values = representable_values(name)
    assert values.numel() == count
    assert torch.all(values[1:] > values[:-1])


def test_representable_values_extremes():
    assert representable_values("e4m3")[-1] == 448 and representable_values("e5m2")[-1] == 57344
    assert representable_values("fp16")[-1] == 65504


def test_fp32_cannot_be_listed():
    with pytest.raises(ValueError, match="too many"):
        representable_values("fp32")


def test_nf4_levels():
    levels = torch.tensor(NF4_LEVELS)
    assert len(NF4_LEVELS) == 16 and NF4_LEVELS[0] == -1.0 and NF4_LEVELS[7] == 0.0 and NF4_LEVELS[-1] == 1.0
    assert torch.all(levels[1:] > levels[:-1])
    assert (levels < 0).sum() == 7 and (levels > 0).sum() == 8  # not exactly symmetric: one extra positive
    # Independent reconstruction (QLoRA, appendix): normal quantiles from 1 - offset to 0.5, scaled to [-1, 1].
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    offset = 0.9677083
    positive = normal.icdf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -normal.icdf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    rebuilt = torch.sort(torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative])).values
    rebuilt = rebuilt / rebuilt.max()
    assert torch.allclose(rebuilt, levels.double(), atol=1e-6)  # the table is float32: 6e-8 spacing below 1


# --- rounding ------------------------------------------------------------------------------------


def test_round_to_format_keeps_shape_and_orders_errors():
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(1))
    for name in FORMATS:
        y = round_to_format(x, name)
        assert y.shape == x.shape and y.dtype == torch.float32
    assert torch.equal(round_to_format(x, "fp32"), x)
    errors = {name: relative_error(x, name) for name in FORMATS}
    assert errors["fp32"] == 0 < errors["fp16"] < errors["bf16"] < errors["fp8_e4m3"] < errors["fp8_e5m2"]
    assert errors["int8"] < errors["int4"] < errors["int3"]
    # Relative error of RNE rounding is at most eps/2 per element.
    assert errors["fp16"] < 2.0**-11 and errors["bf16"] < 2.0**-8


def test_round_to_int_uses_absmax():
    x = torch.tensor([-1.0, 0.5, 0.26, 2.0])
    y = round_to_format(x, "int3")  # scale 2/3: codes -1.5->-2, 0.75->1, 0.39->0, 3
    assert torch.allclose(y, torch.tensor([-4 / 3, 2 / 3, 0.0, 2.0]))
    assert torch.equal(round_to_format(torch.zeros(3), "int4"), torch.zeros(3))
    assert torch.allclose(round_to_format(torch.tensor([0.5, -1.0]), "nf4"), torch.tensor([NF4_LEVELS[12], -1.0]))


# --- bytes and memory ----------------------------------------------------------------------------


def test_bytes_per_parameter():
    assert bytes_per_parameter("fp32") == 4 and bytes_per_parameter("bf16") == 2
    assert bytes_per_parameter("int8") == 1 and bytes_per_parameter("int4") == 0.5 and bytes_per_parameter("int3") == 0.375
    assert bytes_per_parameter("int4", group_size=128) == 0.515625  # 4 + 16/128 = 4.125 bits
    assert bytes_per_parameter("nf4", group_size=64, scale_bits=32) == 0.5625  # QLoRA's 4.5 bits without double quantization


@pytest.mark.parametrize("group", [0, -64, 1.5, True])
def test_bad_group_size(group):
    with pytest.raises(ValueError, match="positive integer"):
        bytes_per_parameter("int4", group_size=group)


def test_group_size_refused_for_fp16():
    with pytest.raises(ValueError, match="group_size=None"):
        bytes_per_parameter("fp16", group_size=128)


def test_memory_estimate():
    assert memory_estimate(70e9, "int4") == 35e9
    assert memory_estimate(1e9, "int4", group_size=128, kv_cache_bytes=1e9) == 1.515625e9
    for bad in (0, -7e9):
        with pytest.raises(ValueError, match="n_params must be a positive"):
            memory_estimate(bad, "fp16")
    with pytest.raises(ValueError, match="kv_cache_bytes"):
        memory_estimate(7e9, "fp16", kv_cache_bytes=-1)


def test_memory_table_for_70b():
    table = memory_table({"70B": 70e9})
    assert table.columns == ("fp32", "fp16", "int8", "int4", "int3")
    assert table.gb[0] == (280.0, 140.0, 70.0, 35.0, 26.25)
    assert table.value("70B", "int3") == 26.25
    assert "26.25" in table.to_text()


def test_memory_table_labels_and_groups():
    table = memory_table([7e9, 405e9], formats=("fp16", "int4"), group_size=128)
    assert table.rows == ("7B", "405B")
    assert table.value("7B", "fp16") == 14.0 and table.value("405B", "int4") == pytest.approx(405 * 0.515625)
    assert params_label(134_515_008) == "135M"
    with pytest.raises(ValueError, match="empty"):
        memory_table([])


# --- the memory calculator's logic ---------------------------------------------------------------


def test_memory_fit():
    fit = memory_fit(70, "int4", gpu_memory_gb=40)
    assert fit.bytes_needed == 35e9 and fit.fits and fit.headroom_gb == pytest.approx(5.0)
    assert "fits" in fit.message
    big = memory_fit(70, "fp16", gpu_memory_gb=80)
    assert not big.fits and big.headroom_gb == pytest.approx(-60.0) and "does not fit" in big.message
    grouped = memory_fit(8, "int4", gpu_memory_gb=8, group_size=128, kv_cache_gb=1.0)
    assert grouped.gb_needed == pytest.approx(8 * 0.515625 + 1.0)
    assert memory_fit(7, "fp16", gpu_memory_gb=24, group_size=128).gb_needed == 14.0  # group ignored for fp16
    with pytest.raises(ValueError, match="gpu_memory_gb"):
        memory_fit(7, "fp16", gpu_memory_gb=0)
    with pytest.raises(ValueError, match="n_params"):
        memory_fit(0, "fp16", gpu_memory_gb=24)


def test_memory_calculator_widget_builds():
    pytest.importorskip("ipywidgets")
    from course_utils.widgets import memory_calculator

    panel = memory_calculator(70, "int4", 40, 128)
    assert "fits" in panel.children[-1].value
    panel.children[1].value = "fp16"  # changing the precision updates the verdict
    assert "does not fit" in panel.children[-1].value
    assert not math.isnan(memory_fit(1, "nf4", 1).gb_needed)
