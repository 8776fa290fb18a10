"""Save the quantized layers of a model and put them back: a cache for slow quantizers keyed by configuration.

GPTQ and AWQ take minutes on a CPU; their result is deterministic for a given model, calibration set and
configuration. :func:`cached_quantize` runs the quantizer once, saves every ``QuantLinear``'s packed
codes, scales and zero points (a few tens of MB for the course model) with the model's one-dimensional
parameters (AWQ folds its scales into the norm weights), and on the next call with the
same key rebuilds the same layers in a freshly loaded float model in about a second. The key is any
JSON-able description (method, configuration, model name, a fingerprint of the calibration tokens);
change anything in it and the quantizer runs again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from course_utils import config
from course_utils.quant.linear import QuantLinear

_FIELDS = ("packed", "scales", "zeros", "bias")


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    """Every ``QuantLinear`` of ``model`` by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def vectors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every one-dimensional parameter of ``model`` (norm weights, biases) by name, on the CPU.

    A quantizer may change them as well as the Linears: AWQ folds its scales into the RMSNorm weights.
    They are a few kilobytes, so the store keeps them all rather than guessing which changed."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.dim() == 1}


def save(model: nn.Module, path: str | Path, extra: dict | None = None) -> Path:
    """Write the buffers and settings of every ``QuantLinear`` of ``model``, its one-dimensional parameters
    (:func:`vectors`) and ``extra`` to ``path``."""
    layers = quantized_layers(model)
    if not layers:
        raise ValueError("the model has no QuantLinear layers to save")
    state = {
        name: {
            **{f: None if getattr(m, f) is None else getattr(m, f).detach().cpu() for f in _FIELDS},
            "shape": (m.out_features, m.in_features), "bits": m.bits, "group_size": m.group_size,
            "symmetric": m.symmetric, "dtype": str(m.compute_dtype),
        }
        for name, m in layers.items()
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save({"layers": state, "vectors": vectors(model), "extra": extra or {}}, partial)
    partial.replace(path)
    return path


def _restore(state: dict) -> QuantLinear:
    layer = QuantLinear.__new__(QuantLinear)
    nn.Module.__init__(layer)
    layer.out_features, layer.in_features = state["shape"]
    layer.bits, layer.group_size, layer.symmetric = state["bits"], state["group_size"], state["symmetric"]
    layer.compute_dtype = getattr(torch, state["dtype"].removeprefix("torch."))
    for f in _FIELDS:
        layer.register_buffer(f, state[f])
    return layer


def load(model: nn.Module, path: str | Path) -> dict:
    """Put the saved layers and vectors into ``model`` (same architecture, float) in place; returns the
    saved ``extra``."""
    saved = torch.load(Path(path), map_location="cpu", weights_only=True)
    modules = dict(model.named_modules())
    missing = [n for n in saved["layers"] if n not in modules]
    if missing:
        raise ValueError(f"{path}: layers {missing[:3]} are not in this model; was it saved from another architecture?")
    device = next(model.parameters()).device
    for name, state in saved["layers"].items():
        old = modules[name]
        if isinstance(old, nn.Linear) and (old.out_features, old.in_features) != tuple(state["shape"]):
            raise ValueError(f"{path}: layer {name} is {tuple(state['shape'])} in the file, {(old.out_features, old.in_features)} in the model")
        parent, _, child = name.rpartition(".")
        setattr(modules[parent] if parent else model, child, _restore(state).to(device))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in saved.get("vectors", {}).items():
            if name not in params or params[name].shape != value.shape:
                raise ValueError(f"{path}: parameter {name} {tuple(value.shape)} does not fit this model")
            params[name].copy_(value)
    return saved["extra"]


def cache_key(description: dict) -> str:
    """A short hash of a JSON-able description of how a model was quantized."""
    return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cached_quantize(
    model: nn.Module, description: dict, quantize: Callable[[nn.Module], object], folder: str | None = None
) -> tuple[dict, bool]:
    """Quantize ``model`` in place with ``quantize(model)`` unless a result for ``description`` is cached.

    Returns ``(extra, was_cached)``; ``extra`` holds ``seconds`` (how long the quantizer took when it
    ran) and ``report`` (what ``quantize`` returned: a dataclass as a dict of its fields, e.g. AWQ's alpha
    per layer, anything else as its ``str``). Files live in
    ``<cache>/quantized/<folder>/<hash>.pt``.
    """
    path = config.cache_dir() / "quantized" / (folder or "models") / f"{cache_key(description)}.pt"
    if path.is_file():
        return load(model, path), True
    start = time.perf_counter()
    report = quantize(model)
    saved = dataclasses.asdict(report) if dataclasses.is_dataclass(report) else str(report)
    extra = {"seconds": time.perf_counter() - start, "report": saved, "description": description}
    save(model, path, extra)
    return extra, False
