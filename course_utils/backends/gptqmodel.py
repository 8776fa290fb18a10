"""Thin adapter to GPTQModel (the maintained GPTQ library, successor of AutoGPTQ) and to transformers' GPTQ loader.

- ``quantize``: GPTQ-quantize a float checkpoint folder with ``GPTQModel.load(path, QuantizeConfig(...))``,
  ``model.quantize(calibration)`` and ``model.save(out_dir)``. The result is cached: a folder whose
  recorded settings (and calibration fingerprint, source model and library version) match is reused.
- ``load_quantized``: load a GPTQ checkpoint (GPTQModel's, or one written by
  :mod:`course_utils.quant.gptq_format`) back through ``transformers.AutoModelForCausalLM``, which
  hands GPTQ checkpoints to optimum and GPTQModel's layer kernels.
- ``kernels``: which GPTQModel layer classes (kernels) a loaded model uses.

What to know on a CPU-only machine (measured with GPTQModel 7.7.0, transformers 5.24, torch 2.13):

- GPTQModel is imported only when a function needs it. Importing it prints a banner, and its
  dependency ``tokenicer`` points ``HF_HOME`` (and the hub caches) at ``/tmp/tokenicer_hf_home``
  when unset; this adapter puts those variables back as they were when each call ends.
- GPTQModel sizes its CPU thread pool from the core count; on 2 cores its loader asks for more workers
  than the pool has and fails, so while the adapter imports, quantizes or loads it sets
  ``GPTQMODEL_CPU_WORKERS=2`` when it is unset (and puts ``ninja`` on ``PATH``, see below), and restores
  both afterwards.
- Its first quantization compiles a small C++ packing extension, and the first load of a 4-bit
  checkpoint compiles the CPU int4 kernel (about two minutes on 2 cores), both cached in
  ``~/.cache/gptqmodel``.
- Its plain-PyTorch layer (``TorchLinear``, backend "gptq_torch") wraps its dequantization in
  ``torch.compile``; on 2 cores and 210 layers of four shapes that recompiles until dynamo's limit and
  prints warnings, so :func:`load_quantized` runs those layers eagerly.
- transformers keeps ``dtype`` as asked: with float32 activations the GPTQ layers dequantize their
  weight and multiply in float32 (like the course's own QuantLinear); with bfloat16 activations on a
  CPU with AVX512-BF16 they run GPTQModel's fused int4 kernel (``TorchCpuAvx512Linear``).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import sys
import warnings
from collections import Counter
from pathlib import Path

import torch

from course_utils import config
from course_utils.backends.common import (
    BackendUnavailableError, build_checkpoint, hf_progress_bars_off, import_status, read_record, restored_environ,
    reusable, settings_folder,
)
from course_utils.backends.common import calibration_rows as _calibration_rows
from course_utils.backends.common import source_fingerprint as _source_fingerprint

GPTQMODEL_VERSION = "7.7.0"
CACHE_RECORD = "course_gptqmodel.json"  # written beside GPTQModel's files: the settings that made them
_INSTALL_HINT = (
    "install the course's requirements (`make setup`), or by hand: "
    "`pip install --no-deps gptqmodel==7.7.0` plus `pip install -c <(echo torch==2.13.0) optimum==2.3.0 "
    "device-smi==0.5.7 protobuf==7.36.2 pypcre==0.6.4 tokenicer==0.0.14 logbar==0.4.15 threadpoolctl==3.8.0 "
    "defuser==0.0.28` (without --no-deps, pip replaces the CPU torch with a multi-GB CUDA build)"
)
# Environment variables that importing GPTQModel (through tokenicer) sets when they are unset, and the two
# that the adapter sets while it calls GPTQModel; all are put back when the call ends.
_REDIRECTED_ENV = ("HF_HOME", "HF_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_MODULES_CACHE", "TORCHINDUCTOR_CACHE_DIR")
_CALL_ENV = ("GPTQMODEL_CPU_WORKERS", "PATH")


@contextlib.contextmanager
def _gptqmodel_env():
    """For the block, what GPTQModel needs on this machine: ``GPTQMODEL_CPU_WORKERS=2`` on fewer than 3 cores
    (unless set) and, when ``PATH`` finds no ``ninja``, the folder of this interpreter in front of ``PATH``
    (torch's cpp_extension runs ``ninja`` to compile GPTQModel's CPU extensions). Afterwards these and the
    Hugging Face cache variables tokenicer sets are as they were."""
    with restored_environ(*_REDIRECTED_ENV, *_CALL_ENV):
        if (os.cpu_count() or 1) < 3:
            os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
        venv_bin = str(Path(sys.executable).parent)
        if shutil.which("ninja") is None and shutil.which("ninja", path=venv_bin):
            os.environ["PATH"] = venv_bin + os.pathsep + os.environ.get("PATH", "")
        yield


@contextlib.contextmanager
def _quiet_import():
    """Silence an import (GPTQModel prints a banner) inside :func:`_gptqmodel_env`."""
    with _gptqmodel_env(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def _import():
    """Import gptqmodel quietly, leaving the environment as it was."""
    try:
        with _quiet_import():
            import gptqmodel
    except Exception as err:  # ImportError, or a dependency failing at import time
        raise BackendUnavailableError(f"GPTQModel could not be imported ({type(err).__name__}: {err}); {_INSTALL_HINT}") from None
    return gptqmodel


def _import_optimum():
    try:
        with _quiet_import():  # optimum.gptq imports gptqmodel when it is installed
            import optimum.gptq  # noqa: F401
    except Exception as err:
        raise BackendUnavailableError(
            f"optimum could not be imported ({type(err).__name__}: {err}); transformers needs it to load GPTQ "
            f"checkpoints; {_INSTALL_HINT}"
        ) from None


def available() -> dict[str, str | None]:
    """What can run here: ``{"gptqmodel": None or why not, "optimum": None or why not}``.

    Quantizing needs gptqmodel; loading a GPTQ checkpoint through transformers needs both.
    """
    return import_status({"gptqmodel": _import, "optimum": _import_optimum})


def version() -> str:
    """GPTQModel's version string."""
    return _import().__version__


# ------------------------------------------------------------------------------------ quantizing


def settings_record(model_dir, bits, group_size, act_order, sym, damp, calibration_fingerprint,
                    act_group_aware=False, dtype=torch.float32) -> dict:
    """The settings that identify one quantization (what the cache compares)."""
    model_dir = Path(model_dir).resolve()
    return {
        "source": str(model_dir),
        "source_fingerprint": _source_fingerprint(model_dir),
        "bits": bits, "group_size": group_size, "desc_act": bool(act_order), "sym": bool(sym),
        "damp_percent": float(damp), "act_group_aware": bool(act_group_aware),
        "dtype": str(dtype).removeprefix("torch."), "calibration": calibration_fingerprint,
        "gptqmodel": GPTQMODEL_VERSION,
    }


def default_out_dir(record: dict) -> Path:
    """``<cache>/gptq/gptqmodel-int4-g64-sym-<hash>``: one folder per distinct settings record."""
    flags = ("-actorder" if record["desc_act"] else "") + ("-gar" if record["act_group_aware"] else "")
    name = f"gptqmodel-int{record['bits']}-g{record['group_size']}-{'sym' if record['sym'] else 'asym'}{flags}"
    return settings_folder("gptq", name, record, code=(__name__,), libraries=("gptqmodel", "optimum", "transformers"))


def cached_record(out_dir: str | Path) -> dict | None:
    """What ``quantize`` recorded in ``out_dir`` (settings, seconds, threads), or None."""
    return read_record(out_dir, CACHE_RECORD)


def quantize(
    model_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
    bits: int = 4,
    group_size: int = 64,
    act_order: bool = False,
    sym: bool = True,
    damp: float = 0.01,
    calibration=None,
    device: str = "cpu",
    act_group_aware: bool = False,
    dtype: torch.dtype = torch.float32,
    quiet: bool = True,
    overwrite: bool = False,
) -> tuple[Path, float]:
    """GPTQ-quantize the float checkpoint in ``model_dir`` with GPTQModel; returns ``(out_dir, seconds)``.

    ``model_dir``: a float safetensors folder; default the course's model (``models.default_model_dir()``).
    ``out_dir``: default a folder named after the settings under ``<cache>/gptq``.
    ``act_order``: GPTQ's ``desc_act`` (quantize columns by decreasing Hessian diagonal).
    ``act_group_aware``: GPTQModel's own "GAR" reordering inside static groups. GPTQModel switches it on
    by default; the course switches it off so that the run is the classic GPTQ algorithm.
    ``damp``: ``damp_percent``, the fraction of the mean Hessian diagonal added to it (GPTQModel's default
    is 0.05; the GPTQ paper's 0.01 is the course's default). ``dtype``: the precision GPTQModel loads the
    float model in (float32 = the course's reference; GPTQModel's own CPU default is bfloat16).
    ``calibration``: token-id rows (``data.calibration_batches(tokenizer, 32, 512)``) or texts.

    If ``out_dir`` already holds a checkpoint made with the same settings, calibration and source, it is
    reused (``seconds`` is then the time recorded when it was made). ``seconds`` covers GPTQModel's load,
    quantization and save, including the one-time compile of its packing extension on a fresh machine.
    ``quiet`` keeps GPTQModel's progress bars and logs out of the notebook (they are kept in
    ``quantize.log`` in ``out_dir``).
    """
    from course_utils import models

    if calibration is None:
        raise ValueError("GPTQ needs calibration data: pass calibration=data.calibration_batches(tokenizer, 32, 512)")
    model_dir = Path(model_dir) if model_dir is not None else models.default_model_dir()
    rows, fingerprint = _calibration_rows(calibration)
    record = settings_record(model_dir, bits, group_size, act_order, sym, damp, fingerprint, act_group_aware, dtype)
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(record)
    seconds = reusable(out_dir, CACHE_RECORD, record, overwrite)
    if seconds is not None:
        return out_dir, seconds

    gptqmodel = _import()
    device = config.device(device)
    qconfig = gptqmodel.QuantizeConfig(
        bits=bits, group_size=group_size, desc_act=bool(act_order), sym=bool(sym), damp_percent=float(damp),
        act_group_aware=bool(act_group_aware), offload_to_disk=False,
    )

    def build(folder: Path, log) -> dict:
        model = gptqmodel.GPTQModel.load(str(model_dir), qconfig, device=device, dtype=dtype)
        model.quantize(rows, batch_size=1)
        model.save(str(folder))
        return {"gptqmodel_cpu_workers": os.environ.get("GPTQMODEL_CPU_WORKERS"), "device": device, "n_samples": len(rows)}

    with _gptqmodel_env():
        return out_dir, build_checkpoint(out_dir, CACHE_RECORD, record, build, "GPTQModel", model_dir, quiet)


# ------------------------------------------------------------------------------------ loading


def load_quantized(path: str | Path, device: str | None = None, dtype: torch.dtype = torch.float32,
                   backend: str = "auto", quiet: bool = True):
    """Load a GPTQ checkpoint folder through ``transformers.AutoModelForCausalLM``: returns ``(model, tokenizer)``.

    transformers reads ``quantization_config`` from config.json and lets optimum replace each Linear by
    a GPTQModel layer (see :func:`kernels`). ``backend``: "auto" lets GPTQModel pick the fastest kernel for
    the device (on a CPU with AVX512-BF16, ``TorchCpuAvx512Linear``, compiled on the first load, about
    two minutes); "gptq_torch" is GPTQModel's plain-PyTorch layer (run eagerly here, see the module docstring). With ``dtype``
    float32 (the default) the layers dequantize their weight and multiply in float32; with bfloat16 the
    AVX512 kernel runs its fused int4 matmul. ``tokenizer`` is None when the folder holds none.
    """
    _import()
    _import_optimum()
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPTQConfig

    from course_utils.quant.gptq_format import read_quantization_config

    path, device = Path(path), config.device(device)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint folder (no config.json)")
    kwargs = {}
    if backend != "auto":  # a loading option: transformers merges it into the checkpoint's own config
        kwargs["quantization_config"] = GPTQConfig(bits=int(read_quantization_config(path)["bits"]), backend=backend)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_gptqmodel_env())
        stack.enter_context(hf_progress_bars_off())
        if quiet:
            stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
            stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
        stack.enter_context(warnings.catch_warnings())
        warnings.filterwarnings("ignore", message=".*already has a `quantization_config`")  # the backend override
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        has_tokenizer = any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
        tokenizer = AutoTokenizer.from_pretrained(path) if has_tokenizer else None
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map={"": device}, use_safetensors=True, **kwargs)
    model.eval()
    _uncompiled(model)
    if tokenizer is not None and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _uncompiled(model: torch.nn.Module) -> int:
    """Undo the ``torch.compile`` that GPTQModel's plain-PyTorch layer (``TorchLinear``) wraps around its
    own ``dequantize_weight`` when it is built, so every layer dequantizes eagerly. Compiled, each of
    the model's layer shapes is a new graph: on this model dynamo reaches its recompile limit (128) and
    prints pages of warnings; measured here, two perplexity passes took 10 s and 40 s compiled against 5 s
    each eager (default model, 4 windows). Returns how many layers were changed."""
    changed = 0
    for module in model.modules():
        if type(module).__module__.startswith("gptqmodel.nn_modules.qlinear") and "dequantize_weight" in vars(module):
            del module.dequantize_weight  # the instance's compiled wrapper; the class's method remains
            changed += 1
    return changed


def kernels(model: torch.nn.Module) -> dict[str, int]:
    """GPTQModel layer classes in ``model`` and how many of each, e.g. ``{"TorchCpuAvx512Linear": 210}``."""
    return dict(Counter(type(m).__name__ for m in model.modules()
                        if type(m).__module__.startswith("gptqmodel.nn_modules.qlinear")))
