"""Machine description and the table of published peak bandwidths."""

import types

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


def _figure_in_source(source):
    """The GB/s that a source string quotes: "3.35 TB/s", "1,555 GB/s", "320+ GB/s"; "384-bit at 21 Gbps"
    (bus bytes x per-pin rate); "4266 MT/s x 16 bytes" or "4800 MT/s x 8 bytes x 2 channels". None if none."""
    import re

    if m := re.search(r"([\d.,]+)\+? (TB|GB)/s", source):
        return float(m.group(1).replace(",", "")) * (1000 if m.group(2) == "TB" else 1)
    if m := re.search(r"(\d+)-bit at ([\d.]+) Gbps", source):
        return int(m.group(1)) / 8 * float(m.group(2))
    if m := re.search(r"(\d+) MT/s x (\d+) bytes(?: x (\d+) channels)?", source):
        return int(m.group(1)) * 1e6 * int(m.group(2)) * int(m.group(3) or 1) / 1e9
    return None


def test_figure_in_source_reads_each_way_of_quoting():
    assert _figure_in_source("datasheet (80 GB HBM3: 3.35 TB/s)") == 3350.0
    assert _figure_in_source("A100 40GB: 1,555 GB/s") == 1555.0
    assert _figure_in_source("(16 GB GDDR6: 320+ GB/s)") == 320.0
    assert _figure_in_source("24 GB GDDR6X, 384-bit at 19.5 Gbps") == 936.0
    assert _figure_in_source("3200 MT/s x 8 bytes x 2 channels") == pytest.approx(51.2)
    assert _figure_in_source("a datasheet") is None


def test_every_table_entry_is_the_figure_its_source_quotes():
    for key, entry in hardware.PEAK_BANDWIDTH_GBPS.items():
        quoted = _figure_in_source(entry.source)
        assert quoted is not None, f"{key}: the source quotes no figure: {entry.source!r}"
        # Apple M1: LPDDR4X-4266 is 4266.67 MT/s; Apple quotes 68.25 GB/s, 4266 x 16 bytes gives 68.256
        assert entry.gbps == pytest.approx(quoted, abs=0.01), key
        assert hardware.peak_bandwidth(key) == entry.gbps, key  # every key finds itself
    # transfers per second x 8 bytes per 64-bit channel x 2 channels
    assert hardware.PEAK_BANDWIDTH_GBPS["DDR5-4800 dual channel"].gbps == pytest.approx(4800e6 * 8 * 2 / 1e9)
    assert hardware.PEAK_BANDWIDTH_GBPS["DDR4-3200 dual channel"].gbps == pytest.approx(3200e6 * 8 * 2 / 1e9)


# ----------------------------------------------------------------------- this machine, from given readings

X86_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu vme amx_tile

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
"""
PI_CPUINFO = """processor\t: 0
BogoMIPS\t: 108.00
model name\t:
Hardware\t: BCM2835
Model\t\t: Raspberry Pi 4 Model B Rev 1.4
"""
OLD_ARM_CPUINFO = """Processor\t: ARMv7 Processor rev 4 (v7l)
processor\t: 0
"""
AARCH64_CPUINFO = """processor\t: 0
BogoMIPS\t: 50.00
CPU implementer\t: 0x41
"""


@pytest.fixture
def cpuinfo(monkeypatch, tmp_path):
    """``cpuinfo(text)``: /proc/cpuinfo reads ``text`` (None: there is no such file) for ``hardware``."""
    real_path = hardware.Path

    def use(text):
        fake = tmp_path / "cpuinfo"
        if text is not None:
            fake.write_text(text)
        monkeypatch.setattr(hardware, "Path", lambda p: fake if str(p) == "/proc/cpuinfo" else real_path(p))

    return use


@pytest.mark.parametrize("text, name", [
    (X86_CPUINFO, "Intel(R) Xeon(R) Platinum 8480+"),
    (PI_CPUINFO, "BCM2835"),  # an empty model name is skipped
    (OLD_ARM_CPUINFO, "ARMv7 Processor rev 4 (v7l)"),
])
def test_cpu_name_from_proc_cpuinfo(cpuinfo, text, name):
    cpuinfo(text)
    assert hardware.cpu_model_name() == name


@pytest.mark.parametrize("text", [AARCH64_CPUINFO, None])
def test_cpu_name_falls_back_to_platform(cpuinfo, monkeypatch, text):
    cpuinfo(text)
    monkeypatch.setattr(hardware.platform, "system", lambda: "Linux")
    monkeypatch.setattr(hardware.platform, "processor", lambda: "")
    monkeypatch.setattr(hardware.platform, "machine", lambda: "aarch64")
    assert hardware.cpu_model_name() == "aarch64"
    monkeypatch.setattr(hardware.platform, "processor", lambda: "arm")
    assert hardware.cpu_model_name() == "arm"


@pytest.mark.parametrize("physical, logical, affinity, expected", [
    (4, 8, {0, 1, 2, 3, 4, 5, 6, 7}, (4, 8)),  # the whole machine
    (4, 8, {0, 1}, (2, 2)),  # a container or taskset: 2 usable threads, so at most 2 cores
    (8, 16, {0, 1, 2, 3, 4, 5}, (6, 6)),
    (None, 8, {0, 1, 2}, (None, 3)),  # psutil cannot tell physical cores
    (4, None, {0, 1, 2}, (3, 3)),  # nor logical ones: os.cpu_count() (12 here), capped by the affinity
])
def test_cores_are_capped_by_the_cpus_this_process_may_use(monkeypatch, physical, logical, affinity, expected):
    import psutil

    counts = {True: logical, False: physical}
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: counts[logical])
    monkeypatch.setattr(hardware.os, "cpu_count", lambda: 12)
    monkeypatch.setattr(hardware.os, "sched_getaffinity", lambda pid: affinity, raising=False)
    assert hardware.cpu_cores() == expected


def test_cores_without_sched_getaffinity(monkeypatch):
    import psutil

    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 8 if logical else 4)
    monkeypatch.delattr(hardware.os, "sched_getaffinity", raising=False)
    assert hardware.cpu_cores() == (4, 8)  # macOS has no affinity call: every core counts


def test_describe_converts_memory_to_gib_and_prints_each_fact(monkeypatch):
    import psutil
    import torch

    memory = types.SimpleNamespace(total=16 * 2**30, available=6.5 * 2**30)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory)
    monkeypatch.setattr(hardware, "cpu_model_name", lambda: "Test CPU")
    monkeypatch.setattr(hardware, "cpu_cores", lambda: (2, 4))
    gpu = hardware.GPUInfo(0, "NVIDIA H200", 139.8, (9, 0), 4800.0)
    monkeypatch.setattr(hardware, "gpus", lambda: [gpu])
    machine = hardware.describe()
    assert (machine.cpu, machine.physical_cores, machine.logical_cores) == ("Test CPU", 2, 4)
    assert (machine.memory_total_gib, machine.memory_available_gib) == (16.0, 6.5)
    assert machine.gpus == [gpu] and machine.gpu_count == 1
    assert machine.as_dict()["gpus"][0]["name"] == "NVIDIA H200"
    assert machine.lines() == [
        f"CPU: Test CPU (2 physical / 4 logical cores usable, torch uses {torch.get_num_threads()} threads)",
        "memory: 16.0 GiB total, 6.5 GiB available",
        f"system: {machine.system}, Python {machine.python}",
        "GPU 0: NVIDIA H200, 139.8 GiB, compute capability 9.0, datasheet peak bandwidth 4800 GB/s",
    ]
    monkeypatch.setattr(hardware, "gpus", lambda: [])
    assert hardware.describe().lines()[-1] == "GPU: none visible to torch"


def test_describe_this_machine_is_its_parts():
    machine = hardware.describe()
    assert machine.cpu == hardware.cpu_model_name()
    assert (machine.physical_cores, machine.logical_cores) == hardware.cpu_cores()
    assert machine.gpu_count == len(hardware.gpus())
    assert str(machine) == "\n".join(machine.lines())
