"""Thin adapter to llm-compressor (the vLLM project's quantization library; AutoAWQ's successor for AWQ).

- ``awq_quantize``: AWQ-quantize a float checkpoint folder with llm-compressor's ``oneshot`` and the
  recipe ``[AWQModifier, QuantizationModifier]`` (the AWQ scales are a transform; the rounding to a
  group-wise integer grid is a separate modifier), then save it in the compressed-tensors format
  (``pack-quantized``: int4 codes packed in int32, a scale per group). The result is cached: a folder
  whose recorded settings (and calibration fingerprint, source model and library versions) match is reused.
- ``scheme_model``: a float checkpoint quantized in memory with one of compressed-tensors' preset schemes
  (W8A8, FP8, NVFP4, ...), after SmoothQuant if asked: what those schemes compute, to compare with the
  course's own W8A8 and microscaling quantizers.
- ``load_quantized``: load such a checkpoint back through ``transformers.AutoModelForCausalLM``.
- ``cpu_pin_memory_bypass``: the one patch needed to run AWQModifier on a machine without a GPU.

What to know on a CPU-only machine (measured with llm-compressor 0.14.0.1, compressed-tensors 0.19.0,
transformers 5.24, torch 2.13):

- It is installed with ``--no-deps``: its metadata pins ``transformers<=5.17`` (pip would downgrade the
  course's transformers) and asks for ``auto-round`` and ``nvidia-ml-py``, which AWQ does not use. What it
  does import is installed normally: ``loguru``, ``datasets``, ``compressed-tensors`` (``--no-deps`` too).
- ``AWQModifier`` pins the cached layer inputs in page-locked memory before each grid search
  (``IntermediatesCache.pin_memory``), to speed up host-to-GPU copies. Without an accelerator torch
  refuses (``RuntimeError: Cannot access accelerator device when none is available``).
  :func:`cpu_pin_memory_bypass` replaces that one method by a no-op while the quantization runs, and only
  when no accelerator is present (pinning has nothing to speed up then); everything else is untouched.
- With grouped-query attention (the course's model: 9 heads, 3 key/value heads) llm-compressor skips the
  v_proj -> o_proj scale ("mappings were skipped due to incompatible shapes", as the authors' code does);
  :mod:`course_utils.quant.awq` shares one scale between the heads that read one value head instead.
  It has no clip search: after the scales, ``QuantizationModifier`` rounds with plain min-max groups.
- Loading: transformers hands the checkpoint to its compressed-tensors quantizer. With
  ``dequantize=True`` (this adapter's default) every layer becomes a plain ``nn.Linear`` holding the
  dequantized float weights: the same numbers the quantized model computes with, at float speed. Without
  it the layers stay compressed-tensors modules that decompress on the first forward pass and
  quantize-dequantize their weight again in every forward pass (same outputs, slower on a CPU).
- llm-compressor logs through ``loguru`` to the console; with ``quiet`` the adapter sends those lines to
  ``quantize.log`` in the output folder and restores llm-compressor's console logging afterwards (the
  handler its import sets up; importing llm-compressor already removes loguru's other handlers). The
  ``torch.fx`` logger level it lowers for the run and transformers' progress bars, which loading turns
  off, are put back as they were.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import warnings
from pathlib import Path

import torch

from course_utils import config
from course_utils.backends.common import BackendUnavailableError, build_checkpoint, calibration_rows, import_library, import_status
from course_utils.backends.common import hf_progress_bars_off, read_record, reusable, settings_folder, source_fingerprint

LLMCOMPRESSOR_VERSION = "0.14.0.1"
COMPRESSED_TENSORS_VERSION = "0.19.0"
CACHE_RECORD = "course_llmcompressor.json"  # written beside llm-compressor's files: the settings that made them
_INSTALL_HINT = (
    "install the course's requirements (`make setup`), or by hand: "
    "`pip install --no-deps llmcompressor==0.14.0.1 compressed-tensors==0.19.0` plus "
    "`pip install -c <(echo torch==2.13.0) loguru==0.7.3 datasets==5.2.0` (without --no-deps, pip would "
    "downgrade transformers to 5.17 and pull auto-round and nvidia-ml-py)"
)


def _restore_console_logging() -> None:
    """Point llm-compressor's loguru console handler at the current ``sys.stdout`` again (its own setting)."""
    module = importlib.import_module("llmcompressor.logger")  # the module, not the loguru logger it exports
    module.configure_logger(module.LOGGER_CONFIG)


def _import():
    """Import llm-compressor (its import logs "No accelerator available" warnings; they are dropped)."""
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            import llmcompressor
            from llmcompressor import oneshot  # noqa: F401  (imports datasets: fail here, not mid-run)
            from llmcompressor.modifiers.transform.awq import AWQModifier  # noqa: F401
    except Exception as err:  # ImportError, or a dependency failing at import time
        raise BackendUnavailableError(f"llm-compressor could not be imported ({type(err).__name__}: {err}); {_INSTALL_HINT}") from None
    _restore_console_logging()  # its console handler was set up while stdout was redirected
    return llmcompressor


def _import_compressed_tensors():
    return import_library("compressed_tensors", errors=(Exception,), why=lambda err: (
        f"compressed-tensors could not be imported ({type(err).__name__}: {err}); transformers needs it to load "
        f"llm-compressor checkpoints; {_INSTALL_HINT}"))


def available() -> dict[str, str | None]:
    """What can run here: ``{"llmcompressor": None or why not, "compressed_tensors": None or why not}``.

    Quantizing needs llmcompressor; loading its checkpoints through transformers needs compressed_tensors.
    """
    return import_status({"llmcompressor": _import, "compressed_tensors": _import_compressed_tensors})


def version() -> str:
    """llm-compressor's version string."""
    return _import().__version__


def _no_pinning(self, batch_index: int, input_names: list[str] | None = None) -> None:
    """Stand-in for ``IntermediatesCache.pin_memory`` without an accelerator: leave the tensors as they are."""


@contextlib.contextmanager
def cpu_pin_memory_bypass():
    """While the block runs, and only if torch sees no accelerator, make llm-compressor's
    ``IntermediatesCache.pin_memory`` a no-op; yields whether it did.

    AWQModifier calls it before each mapping's grid search to page-lock the cached layer inputs for fast
    host-to-GPU copies; on a machine without a GPU torch raises "Cannot access accelerator device when
    none is available". Page-locking has no use without a GPU, so skipping it changes no result. The
    original method is put back when the block ends, even after an error.
    """
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.accelerator.is_available():
        yield False
        return
    original = IntermediatesCache.__dict__["pin_memory"]
    IntermediatesCache.pin_memory = _no_pinning
    try:
        yield True
    finally:
        IntermediatesCache.pin_memory = original


@contextlib.contextmanager
def _console_logs_off():
    """Remove loguru's handlers for the block (the build adds its own, into the log), then restore
    llm-compressor's console logging. torch.fx's one-time note that llm-compressor's tracing triggers
    ("is_fx_tracing will return true ...", written by a logging handler that holds the real stderr) is
    held back too."""
    from loguru import logger

    fx_log = logging.getLogger("torch.fx._symbolic_trace")
    level = fx_log.level
    fx_log.setLevel(logging.ERROR)
    logger.remove()
    try:
        yield
    finally:
        fx_log.setLevel(level)
        _restore_console_logging()


# ------------------------------------------------------------------------------------ quantizing


def settings_record(model_dir, bits, group_size, sym, n_grid, duo_scaling, calibration_fingerprint, dtype=torch.float32) -> dict:
    """The settings that identify one AWQ quantization (what the cache compares)."""
    model_dir = Path(model_dir).resolve()
    return {
        "source": str(model_dir), "source_fingerprint": source_fingerprint(model_dir),
        "method": "awq", "bits": bits, "group_size": group_size, "sym": bool(sym), "n_grid": int(n_grid),
        "duo_scaling": duo_scaling, "dtype": str(dtype).removeprefix("torch."), "calibration": calibration_fingerprint,
        "llmcompressor": LLMCOMPRESSOR_VERSION, "compressed_tensors": COMPRESSED_TENSORS_VERSION,
    }


def default_out_dir(record: dict) -> Path:
    """``<cache>/awq/llmcompressor-int4-g64-sym-<hash>``: one folder per distinct settings record."""
    name = f"llmcompressor-int{record['bits']}-g{record['group_size']}-{'sym' if record['sym'] else 'asym'}"
    return settings_folder("awq", name, record, code=(__name__,), libraries=("llmcompressor", "compressed-tensors", "transformers"))


def cached_record(out_dir: str | Path) -> dict | None:
    """What ``awq_quantize`` recorded in ``out_dir`` (settings, seconds, threads), or None."""
    return read_record(out_dir, CACHE_RECORD)


def _dataset(rows: list, max_seq_length: int):
    """A ``datasets.Dataset`` llm-compressor takes: token ids (``input_ids``, ``attention_mask``) or texts
    (``text``, tokenized by llm-compressor), and the sequence length to give it."""
    from datasets import Dataset

    if isinstance(rows[0], str):
        return Dataset.from_dict({"text": rows}), max_seq_length
    return (
        Dataset.from_dict({"input_ids": [r["input_ids"].tolist() for r in rows],
                           "attention_mask": [r["attention_mask"].tolist() for r in rows]}),
        max(len(r["input_ids"]) for r in rows),
    )


def awq_quantize(
    model_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
    bits: int = 4,
    group_size: int = 64,
    sym: bool = True,
    calibration=None,
    n_samples: int | None = None,
    n_grid: int = 20,
    duo_scaling: bool | str = False,
    dtype: torch.dtype = torch.float32,
    max_seq_length: int = 512,
    quiet: bool = True,
    overwrite: bool = False,
) -> tuple[Path, float]:
    """AWQ-quantize the float checkpoint in ``model_dir`` with llm-compressor; returns ``(out_dir, seconds)``.

    ``model_dir``: a float safetensors folder with its tokenizer; default the course's model
    (``models.default_model_dir()``). ``out_dir``: default a folder named after the settings under
    ``<cache>/awq``. ``bits``, ``group_size``, ``sym``: the integer grid (``sym=False``: zero points, the
    paper's choice; ``True`` matches the course's RTN, GPTQ and AWQ defaults). ``calibration``: token-id rows
    (``data.calibration_batches(tokenizer, 16, 512)``) or texts (cut at ``max_seq_length`` tokens);
    ``n_samples``: use only the first ``n_samples`` of them. ``n_grid``: alpha values searched.
    ``duo_scaling``: False searches ``s = mean|x| ** alpha`` (the paper's, and :mod:`course_utils.quant.awq`'s);
    llm-compressor's own default, True, searches ``mean|x| ** alpha / mean|w| ** (1 - alpha)``.

    If ``out_dir`` already holds a checkpoint made with the same settings, calibration and source, it is
    reused (``seconds`` is then the time recorded when it was made). ``seconds`` covers loading the float
    model, llm-compressor's calibration, AWQ and rounding, and saving. ``quiet`` keeps llm-compressor's logs
    and progress bars out of the notebook (a summary is kept in ``quantize.log`` in ``out_dir``).
    """
    from course_utils import models

    if calibration is None:
        raise ValueError("AWQ needs calibration data: pass calibration=data.calibration_batches(tokenizer, 16, 512)")
    rows, fingerprint = calibration_rows(calibration)
    if n_samples is not None:
        if not 1 <= n_samples <= len(rows):
            raise ValueError(f"n_samples must be between 1 and the {len(rows)} calibration samples given, got {n_samples!r}")
        rows, fingerprint = calibration_rows(rows[:n_samples] if isinstance(rows[0], str) else [r["input_ids"] for r in rows[:n_samples]])
    model_dir = Path(model_dir) if model_dir is not None else models.default_model_dir()
    record = settings_record(model_dir, bits, group_size, sym, n_grid, duo_scaling, fingerprint, dtype)
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(record)
    seconds = reusable(out_dir, CACHE_RECORD, record, overwrite)
    if seconds is not None:
        return out_dir, seconds

    _import()
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from loguru import logger
    from transformers import AutoModelForCausalLM, AutoTokenizer

    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(num_bits=bits, type="int", symmetric=bool(sym), strategy="group", group_size=group_size),
    )
    dataset, seq_len = _dataset(rows, max_seq_length)

    def build(folder: Path, log) -> dict:
        handler = logger.add(log, level="INFO", format="{level} {function}: {message}")
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
            recipe = [AWQModifier(n_grid=n_grid, duo_scaling=duo_scaling),
                      QuantizationModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])]
            with cpu_pin_memory_bypass() as bypassed:
                oneshot(model=model, tokenizer=tokenizer, dataset=dataset, recipe=recipe, num_calibration_samples=len(rows),
                        max_seq_length=seq_len, shuffle_calibration_samples=False)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*offloaded modules.*")
                model.save_pretrained(folder, save_compressed=True)
            tokenizer.save_pretrained(folder)
        finally:
            logger.remove(handler)
        return {"device": "cpu" if bypassed else "accelerator", "pin_memory_bypassed": bypassed, "n_samples": len(rows)}

    with contextlib.ExitStack() as stack:
        if quiet:
            stack.enter_context(_console_logs_off())
        seconds = build_checkpoint(out_dir, CACHE_RECORD, record, build, "llm-compressor", model_dir, quiet)
    return out_dir, seconds


SCHEMES = ("W8A8", "FP8", "FP8_DYNAMIC", "NVFP4", "NVFP4A16", "MXFP4A16")  # compressed-tensors' presets the course uses


def scheme_model(
    model_dir: str | Path | None = None,
    scheme: str = "W8A8",
    smoothing_strength: float | None = None,
    calibration=None,
    dtype: torch.dtype = torch.float32,
    max_seq_length: int = 512,
    quiet: bool = True,
):
    """The float checkpoint in ``model_dir`` quantized in memory by llm-compressor's ``oneshot`` with one of
    compressed-tensors' preset ``scheme`` names (:data:`SCHEMES`), after ``SmoothQuantModifier`` if
    ``smoothing_strength`` (alpha) is given; returns ``(model, seconds)``. Every Linear but ``lm_head``.

    The model is not saved: its layers keep their float weights with the quantization parameters beside
    them and quantize-dequantize weights (and, for the W8A8/FP8/NVFP4 schemes, their inputs) in every
    forward pass, so it computes what the scheme computes, at float speed or slower. ``calibration``:
    token-id rows or texts, needed for SmoothQuant and for the static activation scales of "FP8" and "NVFP4";
    the dynamic schemes (W8A8: int8 per channel, int8 per token; FP8_DYNAMIC; the A16 weight-only ones)
    need none. ``seconds`` covers loading and ``oneshot``. ``quiet`` keeps the logs and progress bars out.
    """
    import time

    from course_utils import models

    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if (smoothing_strength is not None or scheme in ("FP8", "NVFP4")) and calibration is None:
        raise ValueError(f"{scheme}{' with SmoothQuant' if smoothing_strength is not None else ''} needs calibration "
                         "data: pass calibration=data.calibration_batches(tokenizer, 16, 512)")
    _import()
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir) if model_dir is not None else models.default_model_dir()
    recipe = [QuantizationModifier(scheme=scheme, targets=["Linear"], ignore=["lm_head"])]
    if smoothing_strength is not None:
        recipe.insert(0, SmoothQuantModifier(smoothing_strength=float(smoothing_strength)))
    data = {}
    if calibration is not None:
        rows, _ = calibration_rows(calibration)
        dataset, seq_len = _dataset(rows, max_seq_length)
        data = {"dataset": dataset, "num_calibration_samples": len(rows), "max_seq_length": seq_len,
                "shuffle_calibration_samples": False}
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        stack.enter_context(hf_progress_bars_off())
        if quiet:
            stack.enter_context(_console_logs_off())
            stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(model_dir) if data else None
        with cpu_pin_memory_bypass():
            oneshot(model=model, tokenizer=tokenizer, recipe=recipe, **data)
    return model.eval(), time.perf_counter() - start


def nvfp4_reference(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """One weight (out, in) through compressed-tensors' NVFP4 arithmetic, as llm-compressor's ``NVFP4`` scheme
    runs it: the tensor scale from the weight's min and max, the FP8 block scales from each block of 16,
    the rounding to E2M1. Returns ``{"tensor_scale": (1,), "block_scales": (out, in / 16) float32 holding
    E4M3 values, "dequantized": (out, in), "packed": (out, in / 2) uint8}``."""
    _import_compressed_tensors()
    from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize, quantize
    from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam

    w = weight.detach().float()
    args = preset_name_to_scheme("NVFP4", ["Linear"]).weights
    tensor_scale = generate_gparam(w.amin(), w.amax())
    blocks = w.unflatten(-1, (-1, args.group_size))
    scale, zero = calculate_qparams(blocks.amin(-1), blocks.amax(-1), args, global_scale=tensor_scale)
    return {"tensor_scale": tensor_scale, "block_scales": scale,
            "dequantized": fake_quantize(w, scale, zero, args, global_scale=tensor_scale),
            "packed": pack_fp4_to_uint8(quantize(w, scale, zero, args, global_scale=tensor_scale))}


# ------------------------------------------------------------------------------------ loading


def load_quantized(path: str | Path, device: str | None = None, dtype: torch.dtype = torch.float32,
                   dequantize: bool = True, quiet: bool = True):
    """Load a compressed-tensors checkpoint folder through ``transformers.AutoModelForCausalLM``: returns
    ``(model, tokenizer)`` (``tokenizer`` None when the folder holds none).

    ``dequantize=True``: every quantized layer becomes an ``nn.Linear`` holding its dequantized weight
    (codes x scales, so the model computes exactly what the checkpoint says, at float speed). ``False``: the
    compressed-tensors layers are kept (they decompress on the first forward pass and re-quantize their
    weight in every pass). ``quiet`` hides the progress bars of compressed-tensors.
    """
    _import_compressed_tensors()
    from transformers import AutoModelForCausalLM, AutoTokenizer, CompressedTensorsConfig

    path, device = Path(path), config.device(device)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint folder (no config.json)")
    with contextlib.ExitStack() as stack:
        stack.enter_context(hf_progress_bars_off())
        if quiet:
            stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
            stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
        stack.enter_context(warnings.catch_warnings())
        warnings.filterwarnings("ignore", message=".*already has a `quantization_config`")  # the dequantize option
        has_tokenizer = any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
        tokenizer = AutoTokenizer.from_pretrained(path) if has_tokenizer else None
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, device_map={"": device}, use_safetensors=True,
            quantization_config=CompressedTensorsConfig(dequantize=dequantize),
        )
    model.eval()
    if tokenizer is not None and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def quantization_settings(path: str | Path) -> dict:
    """The grid a compressed-tensors checkpoint declares: ``{"format", "bits", "group_size", "symmetric",
    "strategy", "ignore"}`` from its config.json (first config group)."""
    import json

    cfg = json.loads((Path(path) / "config.json").read_text()).get("quantization_config")
    if not cfg or cfg.get("quant_method") != "compressed-tensors":
        raise ValueError(f"{path} is not a compressed-tensors checkpoint (no such quantization_config in config.json)")
    weights = next(iter(cfg["config_groups"].values()))["weights"]
    return {"format": cfg.get("format"), "bits": weights["num_bits"], "group_size": weights["group_size"],
            "symmetric": weights["symmetric"], "strategy": weights["strategy"], "ignore": cfg.get("ignore", [])}
