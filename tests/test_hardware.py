"""Machine description and the table of published peak bandwidths."""

import pytest

from course_utils import hardware


@pytest.mark.parametrize(
    "name, expected",
    [
        ("NVIDIA H200", 4800.0),
        ("NVIDIA H100 80GB HBM3", 3350.0),  # how torch names the SXM part
        ("NVIDIA H100 PCIe", 2000.0),
        ("NVIDIA A100-SXM4-40GB", 1555.0),
        ("NVIDIA A100-SXM4-80GB", 2039.0),
        ("NVIDIA A100 80GB PCIe", 1935.0),
        ("Tesla T4", 320.0),
        ("NVIDIA L4", 300.0),
        ("NVIDIA GeForce RTX 4090", 1008.0),
        ("NVIDIA GeForce RTX 3090", 936.0),
        ("Apple M1", 68.25),
        ("Apple M2", 100.0),
        ("Apple M3", 100.0),
        ("Apple M2 Max", 400.0),
        ("Apple M3 Max", 400.0),
        ("Apple M2 Ultra", 800.0),
        ("DDR5-4800 dual channel", 76.8),
        ("DDR4-3200 dual channel", 51.2),
    ],
)
def test_peak_bandwidth_lookup(name, expected):
    assert hardware.peak_bandwidth(name) == expected


@pytest.mark.parametrize("name", ["AMD EPYC", "NVIDIA GeForce GTX 1080", "", "cpu", "NVIDIA L40"])
def test_unknown_hardware_is_none(name):
    assert hardware.peak_bandwidth(name) is None


def test_table_entries_have_sources_and_ddr_arithmetic():
    for key, entry in hardware.PEAK_BANDWIDTH_GBPS.items():
        assert entry.gbps > 0 and entry.source, key
        assert hardware.peak_bandwidth(key) == entry.gbps, key  # every key finds itself
    # transfers per second x 8 bytes per 64-bit channel x 2 channels
    assert hardware.PEAK_BANDWIDTH_GBPS["DDR5-4800 dual channel"].gbps == pytest.approx(4800e6 * 8 * 2 / 1e9)
    assert hardware.PEAK_BANDWIDTH_GBPS["DDR4-3200 dual channel"].gbps == pytest.approx(3200e6 * 8 * 2 / 1e9)
    # M1: LPDDR4X-4266 on a 128-bit bus
    assert hardware.PEAK_BANDWIDTH_GBPS["Apple M1"].gbps == pytest.approx(4266e6 * 16 / 1e9, abs=0.01)


def test_describe_this_machine():
    machine = hardware.describe()
    assert machine.cpu and isinstance(machine.cpu, str)
    assert machine.logical_cores >= 1
    assert machine.physical_cores is None or 1 <= machine.physical_cores <= machine.logical_cores
    assert 0 < machine.memory_available_gib <= machine.memory_total_gib
    assert machine.gpu_count == len(hardware.gpus())
    text = str(machine)
    assert "CPU:" in text and "memory:" in text
    assert machine.as_dict()["logical_cores"] == machine.logical_cores
