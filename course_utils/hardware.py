"""What this machine is: CPU, memory, GPUs, and the published peak memory bandwidth of common hardware.

Speed on a language model's decode step is set mostly by how fast the weights stream out of memory,
so lessons compare what they measure with the number printed on a datasheet. ``describe()`` gives a
summary of the machine at hand; ``PEAK_BANDWIDTH_GBPS`` lists vendor figures (GB/s = 1e9 bytes/s),
each with where it comes from; ``peak_bandwidth(name)`` finds one from a name such as the one
``torch.cuda.get_device_name()`` returns.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class PeakBandwidth:
    """A published peak memory bandwidth: ``gbps`` in GB/s (1e9 bytes/s) and where it comes from."""

    gbps: float
    source: str


# Vendor figures. Peak numbers are what the memory interface could move at its rated clock; real
# code reaches 70-90% of them. Keys are the names lessons print; ``_PATTERNS`` below maps device
# names onto them. DDR entries: transfers/s x 8 bytes per 64-bit channel x 2 channels.
PEAK_BANDWIDTH_GBPS: dict[str, PeakBandwidth] = {
    "H100 SXM": PeakBandwidth(3350.0, "NVIDIA H100 Tensor Core GPU datasheet (H100 SXM, 80 GB HBM3: 3.35 TB/s)"),
    "H100 PCIe": PeakBandwidth(2000.0, "NVIDIA H100 Tensor Core GPU datasheet (H100 PCIe, 80 GB HBM2e: 2 TB/s)"),
    "H100 NVL": PeakBandwidth(3900.0, "NVIDIA H100 Tensor Core GPU datasheet (H100 NVL, 94 GB HBM3: 3.9 TB/s)"),
    "H200": PeakBandwidth(4800.0, "NVIDIA H200 Tensor Core GPU datasheet (141 GB HBM3e: 4.8 TB/s)"),
    "A100 40GB": PeakBandwidth(1555.0, "NVIDIA A100 Tensor Core GPU datasheet (A100 40GB: 1,555 GB/s)"),
    "A100 80GB PCIe": PeakBandwidth(1935.0, "NVIDIA A100 Tensor Core GPU datasheet (A100 80GB PCIe: 1,935 GB/s)"),
    "A100 80GB SXM": PeakBandwidth(2039.0, "NVIDIA A100 Tensor Core GPU datasheet (A100 80GB SXM: 2,039 GB/s)"),
    "A10": PeakBandwidth(600.0, "NVIDIA A10 Tensor Core GPU datasheet (24 GB GDDR6: 600 GB/s)"),
    "L4": PeakBandwidth(300.0, "NVIDIA L4 Tensor Core GPU datasheet (24 GB GDDR6: 300 GB/s)"),
    "L40S": PeakBandwidth(864.0, "NVIDIA L40S GPU datasheet (48 GB GDDR6: 864 GB/s)"),
    "T4": PeakBandwidth(320.0, "NVIDIA T4 Tensor Core GPU datasheet (16 GB GDDR6: 320+ GB/s)"),
    "V100": PeakBandwidth(900.0, "NVIDIA V100 Tensor Core GPU datasheet (SXM2/PCIe 32 GB HBM2: 900 GB/s)"),
    "RTX 4090": PeakBandwidth(1008.0, "NVIDIA GeForce RTX 4090 specifications (24 GB GDDR6X, 384-bit at 21 Gbps)"),
    "RTX 3090": PeakBandwidth(936.0, "NVIDIA GeForce RTX 3090 specifications (24 GB GDDR6X, 384-bit at 19.5 Gbps)"),
    "Apple M1": PeakBandwidth(68.25, "Apple M1: LPDDR4X-4266 on a 128-bit bus (4266 MT/s x 16 bytes)"),
    "Apple M1 Pro": PeakBandwidth(200.0, "Apple M1 Pro and M1 Max announcement (M1 Pro: 200 GB/s)"),
    "Apple M1 Max": PeakBandwidth(400.0, "Apple M1 Pro and M1 Max announcement (M1 Max: 400 GB/s)"),
    "Apple M1 Ultra": PeakBandwidth(800.0, "Apple M1 Ultra announcement (800 GB/s)"),
    "Apple M2": PeakBandwidth(100.0, "Apple M2 announcement (100 GB/s unified memory bandwidth)"),
    "Apple M2 Pro": PeakBandwidth(200.0, "Apple M2 Pro and M2 Max announcement (M2 Pro: 200 GB/s)"),
    "Apple M2 Max": PeakBandwidth(400.0, "Apple M2 Pro and M2 Max announcement (M2 Max: 400 GB/s)"),
    "Apple M2 Ultra": PeakBandwidth(800.0, "Apple M2 Ultra announcement (800 GB/s)"),
    "Apple M3": PeakBandwidth(100.0, "Apple M3 family specifications (M3: 100 GB/s)"),
    "Apple M3 Pro": PeakBandwidth(150.0, "Apple M3 family specifications (M3 Pro: 150 GB/s)"),
    "Apple M3 Max": PeakBandwidth(400.0, "Apple M3 family specifications (M3 Max, 16-core CPU: 400 GB/s; 14-core: 300 GB/s)"),
    "DDR5-4800 dual channel": PeakBandwidth(76.8, "JEDEC DDR5-4800: 4800 MT/s x 8 bytes x 2 channels"),
    "DDR4-3200 dual channel": PeakBandwidth(51.2, "JEDEC DDR4-3200: 3200 MT/s x 8 bytes x 2 channels"),
}

# (regex on the normalised name, key). Order matters: the more specific pattern comes first.
# Normalised names are lower case with every run of non-alphanumerics replaced by one space,
# e.g. "NVIDIA A100-SXM4-80GB" -> "nvidia a100 sxm4 80gb".
_PATTERNS: list[tuple[str, str]] = [
    (r"\bh200\b", "H200"),
    (r"\bh100\b.*\bnvl\b", "H100 NVL"),
    (r"\bh100\b.*\bpcie\b", "H100 PCIe"),
    (r"\bh100\b", "H100 SXM"),  # torch reports the SXM part as "NVIDIA H100 80GB HBM3"
    (r"\ba100\b.*\b40 ?gb\b", "A100 40GB"),
    (r"\ba100\b.*\b80 ?gb\b.*\bpcie\b|\ba100\b.*\bpcie\b.*\b80 ?gb\b", "A100 80GB PCIe"),
    (r"\ba100\b.*\b80 ?gb\b", "A100 80GB SXM"),
    (r"\ba100\b", "A100 40GB"),
    (r"\ba10g?\b", "A10"),
    (r"\bl40s\b", "L40S"),
    (r"\bl4\b", "L4"),
    (r"\bt4\b", "T4"),
    (r"\bv100\b", "V100"),
    (r"\brtx 4090\b", "RTX 4090"),
    (r"\brtx 3090\b", "RTX 3090"),
    (r"\bm1 ultra\b", "Apple M1 Ultra"),
    (r"\bm1 max\b", "Apple M1 Max"),
    (r"\bm1 pro\b", "Apple M1 Pro"),
    (r"\bm1\b", "Apple M1"),
    (r"\bm2 ultra\b", "Apple M2 Ultra"),
    (r"\bm2 max\b", "Apple M2 Max"),
    (r"\bm2 pro\b", "Apple M2 Pro"),
    (r"\bm2\b", "Apple M2"),
    (r"\bm3 max\b", "Apple M3 Max"),
    (r"\bm3 pro\b", "Apple M3 Pro"),
    (r"\bm3\b", "Apple M3"),
    (r"\bddr5 4800\b", "DDR5-4800 dual channel"),
    (r"\bddr4 3200\b", "DDR4-3200 dual channel"),
]


def _normalise(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", name.lower()).strip()


def peak_bandwidth_entry(name: str) -> tuple[str, PeakBandwidth] | None:
    """The table key and entry that ``name`` refers to, or ``None`` when it is not in the table.

    ``name`` may be a table key ("A100 80GB SXM") or a device name as drivers report it
    ("NVIDIA H200", "NVIDIA A100-SXM4-40GB", "Tesla T4", "Apple M2 Max").
    """
    if not name:
        return None
    for key, entry in PEAK_BANDWIDTH_GBPS.items():
        if name.strip().lower() == key.lower():
            return key, entry
    text = _normalise(name)
    for pattern, key in _PATTERNS:
        if re.search(pattern, text):
            return key, PEAK_BANDWIDTH_GBPS[key]
    return None


def peak_bandwidth(name: str) -> float | None:
    """Published peak memory bandwidth in GB/s for a device name, or ``None`` when unknown.

    Example: ``peak_bandwidth("NVIDIA H200")`` is 4800.0; ``peak_bandwidth("AMD EPYC")`` is None
    (a CPU's bandwidth depends on its memory modules and channels, not on its name).
    """
    found = peak_bandwidth_entry(name)
    return None if found is None else found[1].gbps


# --------------------------------------------------------------------------- machine description


def cpu_model_name() -> str:
    """The CPU's model name, from /proc/cpuinfo on Linux, else from ``platform``."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.lower().startswith(("model name", "hardware", "processor\t: arm")):
                value = line.split(":", 1)[1].strip()
                if value:
                    return value
    if platform.system() == "Darwin":
        try:
            import subprocess

            out = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5
            )
            if out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_cores() -> tuple[int | None, int]:
    """(physical cores, logical cores) that this process may use; physical is None if unknown."""
    import psutil

    logical = psutil.cpu_count(logical=True) or os.cpu_count() or 1
    try:
        usable = len(os.sched_getaffinity(0))
        logical = min(logical, usable)
    except (AttributeError, OSError):
        pass
    physical = psutil.cpu_count(logical=False)
    if physical is not None:
        physical = min(physical, logical)
    return physical, logical


@dataclass(frozen=True)
class GPUInfo:
    """One CUDA GPU: ``name`` as the driver reports it, ``memory_gib`` its total memory in GiB (2**30 bytes),
    and its datasheet peak bandwidth in GB/s (1e9 bytes/s)."""

    index: int
    name: str
    memory_gib: float
    capability: tuple[int, int]
    peak_bandwidth_gbps: float | None


def gpus() -> list[GPUInfo]:
    """The CUDA GPUs torch can see (an empty list without torch, CUDA or a GPU)."""
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    found = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        found.append(
            GPUInfo(
                index=index,
                name=props.name,
                memory_gib=props.total_memory / 2**30,
                capability=(props.major, props.minor),
                peak_bandwidth_gbps=peak_bandwidth(props.name),
            )
        )
    return found


@dataclass(frozen=True)
class MachineDescription:
    """A summary of the machine: CPU, memory (GiB = 2**30 bytes), torch threads and GPUs."""

    cpu: str
    physical_cores: int | None
    logical_cores: int
    torch_threads: int | None
    memory_total_gib: float
    memory_available_gib: float
    system: str
    python: str
    gpus: list[GPUInfo] = field(default_factory=list)

    @property
    def gpu_count(self) -> int:
        return len(self.gpus)

    def as_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        """Human-readable lines, one fact each."""
        cores = f"{self.physical_cores} physical / {self.logical_cores} logical"
        out = [
            f"CPU: {self.cpu} ({cores} cores usable, torch uses {self.torch_threads} threads)",
            f"memory: {self.memory_total_gib:.1f} GiB total, {self.memory_available_gib:.1f} GiB available",
            f"system: {self.system}, Python {self.python}",
        ]
        if not self.gpus:
            out.append("GPU: none visible to torch")
        for gpu in self.gpus:
            peak = "unknown" if gpu.peak_bandwidth_gbps is None else f"{gpu.peak_bandwidth_gbps:.0f} GB/s"
            out.append(
                f"GPU {gpu.index}: {gpu.name}, {gpu.memory_gib:.1f} GiB, compute capability "
                f"{gpu.capability[0]}.{gpu.capability[1]}, datasheet peak bandwidth {peak}"
            )
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


def describe() -> MachineDescription:
    """Describe this machine: CPU model and cores, total and available memory, GPUs torch sees."""
    import psutil

    physical, logical = cpu_cores()
    memory = psutil.virtual_memory()
    try:
        import torch

        threads: int | None = torch.get_num_threads()
    except ImportError:
        threads = None
    return MachineDescription(
        cpu=cpu_model_name(),
        physical_cores=physical,
        logical_cores=logical,
        torch_threads=threads,
        memory_total_gib=memory.total / 2**30,
        memory_available_gib=memory.available / 2**30,
        system=f"{platform.system()} {platform.release()} ({platform.machine()})",
        python=platform.python_version(),
        gpus=gpus(),
    )


# ----------------------------------------------------------------------------------------------
# Which GPU for which model.

# Memory a run needs beyond the weights: activations, the KV cache, the CUDA context, and lessons that hold a
# quantized copy beside the float model. A rule of thumb for the course's lessons, not a law.
GPU_HEADROOM = 1.5

# Common rental choices, smallest first: (what to rent, with the vendor's nominal size in GB; the memory a
# program can allocate on the smallest card of the class, in GiB = 2**30 bytes). The usable figure is what
# CUDA reports (``torch.cuda.get_device_properties(0).total_memory``), rounded down: smaller than the label,
# because the label counts the chips (decimal or binary, by vendor habit) and the driver keeps some (ECC, the
# context). A T4 shows about 14.6 GiB, an L4 or A10G 22.5, an L40S 44.6, an A100 or H100 80 GB 79.2, an H200
# 139.8.
GPU_CLASSES = (
    ("T4 (16 GB)", 14.5),
    ("L4, A10G or RTX 4090 (24 GB)", 22.0),
    ("L40S or RTX 6000 Ada (48 GB)", 44.5),
    ("A100 or H100 (80 GB)", 79.0),
    ("H200 (141 GB)", 139.0),
    ("2 x A100/H100 (2 x 80 GB)", 158.0),
    ("2 x H200 (2 x 141 GB)", 278.0),
    ("4 x A100/H100 (4 x 80 GB)", 316.0),
)


def smallest_gpu(weight_bytes: float) -> str | None:
    """The smallest of :data:`GPU_CLASSES` whose memory (GiB x 2**30 bytes) holds ``weight_bytes`` (bytes)
    times :data:`GPU_HEADROOM`, or None if none does."""
    if not weight_bytes > 0:
        raise ValueError(f"weight_bytes must be positive, got {weight_bytes!r}")
    need = weight_bytes * GPU_HEADROOM
    return next((name for name, gib in GPU_CLASSES if gib * 2**30 >= need), None)


@contextlib.contextmanager
def one_cpu_thread(device: str | object = "cpu") -> Iterator[None]:
    """Run PyTorch's CPU work on one thread while the ``with`` block lasts (then the thread count comes
    back). For code made of thousands of small tensor operations (GPTQ's column loop, tiny test models):
    with several threads their synchronisation costs more than the work, tens of times more when another
    program shares the cores. A ``device`` that is not the CPU leaves everything as it is."""
    import torch

    if getattr(device, "type", str(device).split(":")[0]) != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
