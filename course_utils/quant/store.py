"""Save the quantized layers of a model and put them back: a cache for slow quantizers keyed by what made them.

GPTQ and AWQ take minutes on a CPU; their result is deterministic for a given model, calibration set,
configuration and code. :func:`cached_quantize` runs the quantizer once and saves every ``QuantLinear``'s
packed codes, scales and zero points (a few tens of MB for the course model) with the model's
one-dimensional parameters (AWQ folds its scales into the norm weights); on the next call with the same
key it rebuilds the same layers in a freshly loaded float model in about a second.

The file is one ``.safetensors`` (tensors only, no pickle: loading it cannot run code) whose metadata
holds one JSON document: each layer's settings, the quantizer's report and what the result was made from.
The key (:func:`course_utils.cache.key`) covers the description (method, configuration, model, calibration
fingerprint) *and* the source of the quantizer's code: change any of them and the quantizer runs again.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from course_utils import cache, config
from course_utils.quant.contract import Report, check_not_quantized, set_module
from course_utils.quant.linear import QuantLinear

_FIELDS = ("packed", "scales", "zeros", "bias")
_META = "course_utils"  # the metadata entry holding the JSON document


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    """Every ``QuantLinear`` of ``model`` by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def vectors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every one-dimensional parameter of ``model`` (norm weights, biases) by name, on the CPU.

    A quantizer may change them as well as the Linears: AWQ folds its scales into the RMSNorm weights.
    They are a few kilobytes, so the store keeps them all rather than guessing which changed."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.dim() == 1}


def save(model: nn.Module, path: str | Path, extra: dict | None = None) -> Path:
    """Write the buffers of every ``QuantLinear`` of ``model``, its one-dimensional parameters
    (:func:`vectors`) and ``extra`` (anything JSON can write) to the safetensors file ``path``."""
    layers = quantized_layers(model)
    if not layers:
        raise ValueError("the model has no QuantLinear layers to save")
    tensors: dict[str, torch.Tensor] = {}
    settings = {}
    for name, m in layers.items():
        for f in _FIELDS:
            if getattr(m, f) is not None:
                tensors[f"layers.{name}.{f}"] = getattr(m, f).detach().cpu().contiguous()
        settings[name] = {"shape": [m.out_features, m.in_features], "bits": m.bits, "group_size": m.group_size,
                          "symmetric": m.symmetric, "dtype": str(m.compute_dtype).removeprefix("torch.")}
    tensors.update({f"vectors.{n}": v.contiguous() for n, v in vectors(model).items()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    document = json.dumps({"layers": settings, "extra": extra or {}}, default=str)
    save_file(tensors, str(partial), metadata={_META: document})
    partial.replace(path)
    return path


def _restore(settings: dict, tensors: dict[str, torch.Tensor]) -> QuantLinear:
    layer = QuantLinear.__new__(QuantLinear)
    nn.Module.__init__(layer)
    layer.out_features, layer.in_features = settings["shape"]
    layer.bits, layer.group_size, layer.symmetric = settings["bits"], settings["group_size"], settings["symmetric"]
    layer.compute_dtype = getattr(torch, settings["dtype"])
    for f in _FIELDS:
        layer.register_buffer(f, tensors.get(f))
    return layer


def read(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The JSON document and the tensors of a file written by :func:`save`."""
    with safe_open(str(path), "pt") as f:
        meta = (f.metadata() or {}).get(_META)
        if meta is None:
            raise ValueError(f"{path} was not written by course_utils.quant.store (no {_META!r} metadata)")
        return json.loads(meta), {k: f.get_tensor(k) for k in f.keys()}


def load(model: nn.Module, path: str | Path) -> dict:
    """Put the saved layers and vectors into ``model`` (same architecture, float) in place; returns the
    saved ``extra``."""
    document, tensors = read(path)
    modules = dict(model.named_modules())
    missing = [n for n in document["layers"] if n not in modules]
    if missing:
        raise ValueError(f"{path}: layers {missing[:3]} are not in this model; was it saved from another architecture?")
    for name, settings in document["layers"].items():
        old = modules[name]
        if not isinstance(old, nn.Linear) or [old.out_features, old.in_features] != settings["shape"]:
            shape = (old.out_features, old.in_features) if isinstance(old, nn.Linear) else type(old).__name__
            raise ValueError(f"{path}: layer {name} is {tuple(settings['shape'])} in the file, {shape} in the model")
        own = {f: tensors.get(f"layers.{name}.{f}") for f in _FIELDS}
        set_module(model, name, _restore(settings, own).to(old.weight.device))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in tensors.items():
            if not key.startswith("vectors."):
                continue
            name = key.removeprefix("vectors.")
            if name not in params or params[name].shape != value.shape:
                raise ValueError(f"{path}: parameter {name} {tuple(value.shape)} does not fit this model")
            params[name].copy_(value)
    return document["extra"]


def cached_quantize(
    model: nn.Module,
    description: dict,
    quantize: Callable[[nn.Module], Report],
    code: tuple[str, ...],
    restore: Callable[[dict], Report],
    folder: str = "models",
) -> tuple[Report, bool]:
    """Quantize ``model`` in place with ``quantize(model)`` unless a result for ``description`` made by
    the current source of the ``code`` modules is cached.

    Returns ``(report, was_cached)``: the quantizer's :class:`~course_utils.quant.contract.Report` (rebuilt
    by ``restore`` from its saved fields when cached; its ``seconds`` are those of the run that made it).
    Files live in ``<cache>/quantized/<folder>/<key>.safetensors``.
    """
    check_not_quantized(model)  # as the quantizer itself would, cached or not
    path = path_for(folder, description, code)
    if path.is_file():
        extra = load(model, path)
        if extra.get("description") != json.loads(json.dumps(description, default=str)):
            raise ValueError(f"{path} holds a result for {extra.get('description')}, not {description}: a cache key collision")
        return restore(extra["report"]), True
    report = quantize(model)
    save(model, path, {"report": dataclasses.asdict(report), "description": description})
    return report, False


def path_for(folder: str, description: dict, code: tuple[str, ...]) -> Path:
    """Where :func:`cached_quantize` keeps the result for ``description`` made by ``code``."""
    return config.cache_dir() / "quantized" / folder / f"{cache.key(description, code)}.safetensors"
