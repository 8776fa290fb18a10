"""The course's from-scratch weight quantizers behind one call, cached by configuration.

Lessons 07, 08 and 10 quantize the same float model many times with RTN, GPTQ and AWQ. :func:`quantized_copy`
takes the float model, a method name and that method's configuration (and calibration tokens where the
method needs them), and returns a quantized copy, running the quantizer only the first time that exact
combination is asked for (:func:`course_utils.quant.store.cached_quantize`). Lessons share results: the
GPTQ model lesson 07 made is the one lesson 08 compares AWQ with.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from course_utils import data
from course_utils.quant import awq, gptq, store
from course_utils.quant.linear import RTNConfig, quantize_model

# method -> (its configuration class, whether it needs calibration tokens, how it quantizes in place)
METHODS: dict[str, tuple[type, bool, Callable]] = {
    "rtn": (RTNConfig, False, lambda m, cfg, cal: quantize_model(m, cfg)),
    "gptq": (gptq.GPTQConfig, True, lambda m, cfg, cal: gptq.gptq_quantize_model(m, cal, cfg, progress=False)),
    "awq": (awq.AWQConfig, True, lambda m, cfg, cal: awq.awq_quantize_model(m, cal, cfg, progress=False)),
}


def calibration_id(calibration: torch.Tensor) -> str:
    """A fingerprint of calibration token ids (n_samples, seq_len): the same tokens give the same id."""
    return data.token_windows(calibration.flatten(), window=calibration.shape[1]).fingerprint()


def quantized_copy(
    model: nn.Module,
    method: str,
    cfg,
    model_name: str,
    calibration: torch.Tensor | None = None,
    folder: str = "methods",
) -> tuple[nn.Module, dict, bool]:
    """A copy of the float ``model`` quantized by ``method`` ("rtn", "gptq" or "awq") with ``cfg``.

    ``model_name`` (what :func:`course_utils.models.load_model` was given) and the calibration tokens'
    fingerprint are part of the cache key, so another model or another calibration set never gets a stale
    result. Returns ``(copy, extra, was_cached)``; ``extra["seconds"]`` is the quantizer's run time when it
    ran, ``extra["report"]`` what it reported (AWQ: alpha per layer).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose among {sorted(METHODS)}")
    cls, needs_calibration, run = METHODS[method]
    if not isinstance(cfg, cls):
        raise TypeError(f"method {method!r} takes a {cls.__name__}, got {type(cfg).__name__}")
    if needs_calibration and calibration is None:
        raise ValueError(f"method {method!r} needs calibration token ids (course_utils.data.calibration_batches)")
    description = {
        "method": method, "config": repr(cfg), "model": model_name,
        "calibration": calibration_id(calibration) if needs_calibration else None,
    }
    m = copy.deepcopy(model)
    extra, cached = store.cached_quantize(m, description, lambda mm: run(mm, cfg, calibration), folder=folder)
    return m, extra, cached
