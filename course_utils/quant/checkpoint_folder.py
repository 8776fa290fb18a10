"""A Hugging Face checkpoint folder holding a quantized model: what every export format writes besides its
own packed layers.

A quantized checkpoint is an ordinary model folder (``config.json``, ``model.safetensors``,
``generation_config.json``, tokenizer files) in which each quantized Linear's ``weight`` is replaced by
the format's tensors (GPTQ: :mod:`course_utils.quant.gptq_format`; compressed-tensors:
:mod:`course_utils.quant.compressed_format`) and ``config.json`` carries the format's
``quantization_config``. This module writes the rest: the float tensors (embeddings, norms, an unquantized
head) and the files around them.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn


def common_grid(layers: dict[str, nn.Module]) -> tuple[int, int, bool]:
    """``(bits, group_size, symmetric)`` shared by all the quantized ``layers`` (by name); ``group_size`` is
    -1 for one group per row, whatever each layer's width. ``ValueError`` if they differ: the formats
    written here hold one grid for the whole model (no per-layer overrides)."""
    settings = {(m.bits, -1 if m.group_size == m.in_features else m.group_size, bool(m.symmetric)) for m in layers.values()}
    if len(settings) != 1:
        raise ValueError(f"all QuantLinear layers must share bits, group_size and symmetry, found {sorted(settings)}")
    return next(iter(settings))


def float_tensors(model: nn.Module, skip: set[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer of ``model`` outside the modules named in ``skip`` (the
    quantized layers, written by the format), on the CPU. Tied weights (``lm_head`` = ``embed_tokens``) are
    written once, under the first name; float tensors are cast to ``dtype`` when it is given."""
    layers = dict(model.named_modules())
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, t in named:
        module_name, _, leaf = name.rpartition(".")
        if module_name in skip:
            continue
        if leaf in getattr(layers.get(module_name), "_non_persistent_buffers_set", ()):
            continue  # e.g. rotary inv_freq: recomputed on load, not part of a checkpoint
        key = t.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        value = t.detach()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        tensors[name] = value.contiguous().cpu()
    return tensors


def write(model: nn.Module, tokenizer, out_dir: str | Path, tensors: dict[str, torch.Tensor],
          quantization_config: dict, dtype: torch.dtype | None = None) -> Path:
    """Write ``tensors`` as ``model.safetensors`` and the model's config (with ``quantization_config``, and
    ``dtype`` when given), generation config and ``tokenizer`` (if not None) into ``out_dir``; returns it."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg = copy.deepcopy(model.config)
    cfg.quantization_config = quantization_config
    if dtype is not None:
        cfg.dtype = dtype
    cfg.save_pretrained(out_dir)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir
