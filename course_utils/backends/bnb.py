"""Thin adapter to bitsandbytes: its layers and quantizer, and transformers' ``BitsAndBytesConfig``.

bitsandbytes is imported only when a function needs it. ``available()`` says whether it can run here,
like every adapter: ``{"bitsandbytes": None}``, or the reason it cannot. Without it the other functions
raise :class:`~course_utils.backends.common.BackendUnavailableError` saying how to install it; a feature
that needs a CUDA GPU raises :class:`BnbUnavailableError` with what to do on the CPU instead. The default
model is loaded from its cached safetensors copy (``models.default_model_dir()``), because transformers
refuses a bitsandbytes ``quantization_config`` together with a GGUF file. bitsandbytes' note that it casts
float32 inputs to float16, logged on *every* call of an int8 layer, is held back while the layers made here
run (the lesson states the cast once); its logger is left as it was.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from course_utils import config
from course_utils.backends.common import BackendUnavailableError, hf_progress_bars_off, import_status

# Features of bitsandbytes that need a CUDA GPU, and what the course runs on the CPU instead.
CUDA_ONLY = {
    "paged optimizers": "paged optimizers page optimizer state between GPU and CPU memory; on the CPU use "
                        "torch.optim.AdamW (all state already lives in CPU memory)",
    "int8 tensor-core matmul": "the int8 x int8 -> int32 matmul on tensor cores (cuBLASLt); on the CPU "
                               "bitsandbytes computes the same product with a slower fallback, and "
                               "course_utils.quant.llm_int8 shows the arithmetic",
}


class BnbUnavailableError(RuntimeError):
    """A bitsandbytes feature that needs a CUDA GPU was asked for on another device."""


def available() -> dict[str, str | None]:
    """Whether bitsandbytes can run here: ``{"bitsandbytes": None}`` when it imports (it runs on the CPU as
    well as on CUDA), else the reason."""
    return import_status({"bitsandbytes": _import})


def _import():
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            import bitsandbytes
    except ImportError as err:
        raise BackendUnavailableError(
            f"bitsandbytes is not installed ({err}); install it with `pip install bitsandbytes==0.50.2` "
            "(the course's requirements list it), or use the from-scratch course_utils.quant.nf4 and llm_int8"
        ) from None
    return bitsandbytes


_CAST_LOG = logging.getLogger("bitsandbytes.autograd._functions")
_SAVED_LEVELS: list[int] = []


def _hold_cast_note(before: bool, *_) -> None:
    """Forward pre-hook (``before``) and hook of an int8 layer: the cast logger at ERROR during the call,
    then back at the level it had (a stack, so nested calls restore in order)."""
    if before:
        _SAVED_LEVELS.append(_CAST_LOG.level)
        _CAST_LOG.setLevel(logging.ERROR)
    elif _SAVED_LEVELS:
        _CAST_LOG.setLevel(_SAVED_LEVELS.pop())


def _quiet_int8_layers(model: nn.Module) -> nn.Module:
    """``model`` with every ``Linear8bitLt`` in it holding back the per-call cast note while it runs."""
    for m in model.modules():
        if type(m).__name__ == "Linear8bitLt":
            m.register_forward_pre_hook(functools.partial(_hold_cast_note, True))
            m.register_forward_hook(functools.partial(_hold_cast_note, False), always_call=True)
    return model


def version() -> str:
    """bitsandbytes' version string."""
    return _import().__version__


def cpu_fast_paths() -> dict[str, bool]:
    """Which of bitsandbytes' faster CPU code paths this processor gets (they depend on its instruction set).

    - "fused 4-bit gemv (AVX512-BF16)": a single-row matmul that reads the packed 4-bit weight directly,
      computing in bfloat16 (used when generating one token at a time); otherwise the weight is
      dequantized to float first and multiplied with an ordinary matmul;
    - "int8 matmul (AVX512)": int8 x int8 -> int32 through ``torch._int_mm``; otherwise a float fallback.
    """
    cap = torch.backends.cpu.get_cpu_capability()
    try:
        from bitsandbytes.functional import has_avx512bf16

        bf16 = bool(has_avx512bf16())
    except Exception:  # older or newer bitsandbytes without the helper
        bf16 = False
    return {"fused 4-bit gemv (AVX512-BF16)": bf16, "int8 matmul (AVX512)": cap == "AVX512"}


def require_cuda(feature: str, device: str | None = None) -> None:
    """Raise :class:`BnbUnavailableError` if ``feature`` (a key of ``CUDA_ONLY``) is asked for off CUDA.

    The message says what runs on the CPU instead.
    """
    if feature not in CUDA_ONLY:
        raise ValueError(f"unknown feature {feature!r}; known CUDA-only features: {sorted(CUDA_ONLY)}")
    device = config.device(device)
    if not device.startswith("cuda"):
        raise BnbUnavailableError(f"bitsandbytes' {feature} need(s) a CUDA GPU, and this run uses {device!r}. "
                                  f"Instead: {CUDA_ONLY[feature]}.")


# ------------------------------------------------------------------------------ layers and tensors


def quantize_4bit(tensor: torch.Tensor, block_size: int = 64, quant_type: str = "nf4", double_quant: bool = False):
    """bitsandbytes' blockwise 4-bit quantizer: returns ``(packed uint8 (n/2, 1), quant_state)``."""
    F = _import().functional
    return F.quantize_4bit(tensor, blocksize=block_size, quant_type=quant_type, compress_statistics=double_quant)


def linear8bit(linear: nn.Linear, threshold: float = 6.0) -> nn.Module:
    """A ``bitsandbytes.nn.Linear8bitLt`` holding ``linear``'s weight in int8 (inference mode)."""
    if not threshold >= 0:
        raise ValueError(f"threshold must be >= 0 (0 switches the decomposition off in bitsandbytes), got {threshold!r}")
    bnb = _import()
    layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                has_fp16_weights=False, threshold=threshold)
    layer.load_state_dict(linear.state_dict())
    return _quiet_int8_layers(layer.to(linear.weight.device).eval())  # moving quantizes the weight; eval: the int8 path


def linear4bit(linear: nn.Linear, quant_type: str = "nf4", double_quant: bool = False,
               compute_dtype: torch.dtype = torch.float32) -> nn.Module:
    """A ``bitsandbytes.nn.Linear4bit`` holding ``linear``'s weight in NF4 or FP4 (blocks of 64)."""
    bnb = _import()
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=double_quant, quant_type=quant_type)
    layer.load_state_dict(linear.state_dict())
    return layer.to(linear.weight.device).eval()


# ------------------------------------------------------------------------------ whole models


@dataclass(frozen=True)
class BnbSetting:
    """One ``BitsAndBytesConfig``: ``bits`` 8 or 4; for 4 bits ``quant_type`` ("nf4"/"fp4"),
    ``double_quant`` and ``compute_dtype``; for 8 bits the outlier ``threshold``."""

    bits: int = 4
    quant_type: str = "nf4"
    double_quant: bool = False
    compute_dtype: torch.dtype = torch.float32
    threshold: float = 6.0

    def label(self) -> str:
        if self.bits == 8:
            return f"bnb int8 (threshold {self.threshold:g})"
        return f"bnb {self.quant_type}{' + double quant' if self.double_quant else ''}"

    def to_config(self):
        """The transformers ``BitsAndBytesConfig`` for this setting."""
        from transformers import BitsAndBytesConfig

        if self.bits == 8:
            return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=self.threshold)
        if self.bits != 4 or self.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"bitsandbytes offers 8-bit or 4-bit nf4/fp4, got bits={self.bits}, quant_type={self.quant_type!r}")
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=self.quant_type,
                                  bnb_4bit_use_double_quant=self.double_quant, bnb_4bit_compute_dtype=self.compute_dtype)


def load_quantized(setting: BnbSetting, name: str | None = None, device: str | None = None):
    """Load the model quantized by bitsandbytes through transformers: returns ``(model, tokenizer)``.

    ``name``: "default" (the cached safetensors copy of the offline model) or a Hugging Face id.
    Refuses a checkpoint that is already quantized (GGUF files cannot be combined with bitsandbytes).
    """
    _import()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from course_utils import models

    name, device = config.model_name(name), config.device(device)
    source = models.default_model_dir() if name == config.DEFAULT_MODEL else name
    if str(source).endswith(".gguf"):
        raise ValueError("transformers cannot apply bitsandbytes to a GGUF file; load its safetensors copy "
                         "(models.default_model_dir()) or a Hugging Face id instead")
    try:
        from transformers import AutoConfig

        with hf_progress_bars_off():
            if getattr(AutoConfig.from_pretrained(source), "quantization_config", None) is not None:
                raise ValueError(f"{name!r} is already a quantized checkpoint; bitsandbytes needs float weights. "
                                 "Pick the model's float (bf16/fp16/fp32) release")
            tokenizer = AutoTokenizer.from_pretrained(source)
            dtype = torch.float32 if device == "cpu" else torch.bfloat16
            model = AutoModelForCausalLM.from_pretrained(source, quantization_config=setting.to_config(), dtype=dtype,
                                                         device_map={"": device}, use_safetensors=True)
    except OSError as err:
        raise models.ModelNotAvailableError(models._offline_message(name, err)) from None
    _quiet_int8_layers(model).eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def model_bytes(model: nn.Module) -> int:
    """Bytes of a bitsandbytes model's parameters and buffers *plus* its quantization constants.

    transformers' ``get_memory_footprint()`` counts parameters and buffers only; bitsandbytes keeps the
    4-bit absmax (and, with double quantization, its second-level constants) in each weight's
    ``quant_state`` and the int8 row scales in ``weight.SCB``, which it therefore leaves out.
    """
    from course_utils.models import model_bytes as tensor_bytes

    total = tensor_bytes(model)
    for m in model.modules():
        w = getattr(m, "weight", None)
        state = getattr(w, "quant_state", None)
        if state is not None:
            total += state.absmax.numel() * state.absmax.element_size()
            if getattr(state, "nested", False):
                total += state.state2.absmax.numel() * state.state2.absmax.element_size() + 4
        scb = getattr(w, "SCB", None)
        if scb is not None:
            total += scb.numel() * scb.element_size()
    return total


def quantized_layer_count(model: nn.Module) -> int:
    """How many modules of ``model`` are bitsandbytes layers (Linear8bitLt or Linear4bit)."""
    return sum(1 for m in model.modules() if type(m).__module__.startswith("bitsandbytes"))
