"""The course's from-scratch quantizers behind one call, dispatched on the configuration, cached.

Every method follows the contract of :mod:`course_utils.quant.contract`: a config dataclass, and a
``quantize_model(model, config, calibration)`` in its module returning a report. :func:`quantize` picks
the module from the config's type; :func:`quantized_copy` returns a quantized copy of a float model and
runs the quantizer only the first time that exact combination (config, model, calibration, and the
quantizer's source code) is asked for (:func:`course_utils.quant.store.cached_quantize`). Lessons share
results: the GPTQ model lesson 07 made is the one lesson 08 compares AWQ with.
"""

from __future__ import annotations

import copy
from types import ModuleType

import torch
from torch import nn

from course_utils import data
from course_utils.quant import awq, gptq, linear, llm_int8, microscaling, nf4, store, w8a8
from course_utils.quant.contract import Report

# config type -> (the module holding its quantize_model, the report type it returns)
METHODS: dict[type, tuple[ModuleType, type]] = {
    linear.RTNConfig: (linear, linear.RTNReport),
    llm_int8.Int8Config: (llm_int8, Report),
    nf4.NF4Config: (nf4, Report),
    microscaling.MicroscaleConfig: (microscaling, Report),
    w8a8.W8A8Config: (w8a8, w8a8.W8A8Report),
    gptq.GPTQConfig: (gptq, gptq.GPTQReport),
    awq.AWQConfig: (awq, awq.AWQReport),
}
CACHED = (linear.RTNConfig, gptq.GPTQConfig, awq.AWQConfig)  # whose layers are QuantLinear, which the store keeps


def _method(cfg) -> tuple[ModuleType, type]:
    if type(cfg) not in METHODS:
        known = ", ".join(t.__name__ for t in METHODS)
        raise TypeError(f"no quantizer takes a {type(cfg).__name__}; give one of these configs: {known}")
    return METHODS[type(cfg)]


def _check_calibration(cfg, calibration: torch.Tensor | None) -> torch.Tensor | None:
    if cfg.needs_calibration and calibration is None:
        raise ValueError(f"{cfg.method} needs calibration token ids (course_utils.data.calibration_batches)")
    return calibration if cfg.needs_calibration else None


def quantize(model: nn.Module, cfg, calibration: torch.Tensor | None = None) -> Report:
    """Quantize ``model`` in place with the method ``cfg`` configures (RTNConfig, Int8Config, NF4Config,
    MicroscaleConfig, W8A8Config, GPTQConfig or AWQConfig); ``calibration``: token ids (n_samples, seq_len) for the methods that need it."""
    module, _ = _method(cfg)
    calibration = _check_calibration(cfg, calibration)
    if isinstance(cfg, (gptq.GPTQConfig, awq.AWQConfig)):  # the layer-by-layer methods show progress unless told not to
        return module.quantize_model(model, cfg, calibration, progress=False)
    return module.quantize_model(model, cfg, calibration)


def calibration_id(calibration: torch.Tensor) -> str:
    """A fingerprint of calibration token ids (n_samples, seq_len): the same tokens give the same id."""
    return data.token_windows(calibration.flatten(), window=calibration.shape[1]).fingerprint()


def quantized_copy(
    model: nn.Module,
    cfg,
    model_name: str,
    calibration: torch.Tensor | None = None,
    folder: str = "methods",
) -> tuple[nn.Module, Report, bool]:
    """A copy of the float ``model`` quantized with ``cfg``, and the quantizer's report.

    ``model_name`` (what :func:`course_utils.models.load_model` was given), the model's dtype and device
    type, the calibration tokens' fingerprint and shape, and the quantizer's source code are part of the
    cache key, so another model, precision, calibration set or a fixed quantizer never gets a stale result. Returns ``(copy, report, was_cached)``;
    ``report.seconds`` is the quantizer's run time when it ran (cached: the run that made the file).
    LLM.int8, NF4 and the microscaling formats are quick and not cached.
    """
    module, report_type = _method(cfg)
    calibration = _check_calibration(cfg, calibration)
    m = copy.deepcopy(model)
    if not isinstance(cfg, CACHED):
        return m, quantize(m, cfg, calibration), False
    first = next(model.parameters())
    description = {
        "method": cfg.method, "config": repr(cfg), "model": model_name,
        "dtype": str(first.dtype), "device": first.device.type,  # a bf16 GPU model is not the fp32 CPU one
        "calibration": None if calibration is None else [calibration_id(calibration), list(calibration.shape)],
    }
    report, cached = store.cached_quantize(
        m, description, lambda mm: quantize(mm, cfg, calibration), code=(module.__name__, store.__name__),
        restore=lambda fields: report_type.from_dict(fields, type(cfg)), folder=folder,
    )
    return m, report, cached
