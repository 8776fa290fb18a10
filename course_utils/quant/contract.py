"""What every quantizer of the course shares: its layers' base class, its report, how it swaps layers in.

The course's weight quantizers (RTN, LLM.int8, NF4/FP4, GPTQ, AWQ) follow one contract:

- a frozen *config* dataclass per method with ``label()`` (a short name such as ``gptq int4 g64 sym``),
  a class attribute ``method`` (``"rtn"``, ``"gptq"``...) and ``needs_calibration``;
- a driver ``quantize_model(model, config, calibration=None)`` in the method's module that replaces the
  model's Linear layers in place and returns a :class:`Report` (or a subclass adding the method's own
  figures, such as GPTQ's loss per layer);
- layers that subclass :class:`QuantizedLayer`, so that :func:`replace_linears` can refuse to quantize a
  layer twice, whoever quantized it first.

:mod:`course_utils.quant.methods` dispatches on the config's type. :func:`check_finite` is the one
refusal of NaN and infinite values every quantizer calls, so the message is the same everywhere.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import time

import torch
from torch import nn

from course_utils.models import model_bytes


class QuantizedLayer(nn.Module):
    """Base class of every layer that holds quantized weights (``QuantLinear``, ``Int8Linear``,
    ``Linear4bitOwn``): a marker that :func:`check_not_quantized` looks for."""


@dataclass(frozen=True)
class Report:
    """What a ``quantize_model`` did. ``config``: the method's configuration. ``n_layers``: Linear layers
    replaced. ``n_tokens``: calibration tokens used (0 without calibration). ``seconds``: the quantizer's
    run time. ``bytes_before``, ``bytes_after``: the model's parameters and buffers, in bytes
    (:func:`course_utils.models.model_bytes`). ``notes``: what the method wants the reader to know."""

    config: object
    n_layers: int
    n_tokens: int
    seconds: float
    bytes_before: int
    bytes_after: int
    notes: tuple[str, ...]

    @property
    def ratio(self) -> float:
        """How many times smaller the model became."""
        return self.bytes_before / self.bytes_after

    @classmethod
    def from_dict(cls, fields: dict, config_type: type) -> Report:
        """The report again from ``dataclasses.asdict(report)`` read back from JSON (as
        :mod:`course_utils.quant.store` keeps it): the config rebuilt as ``config_type``, lists as tuples."""
        cfg = fields["config"]
        config = cfg if isinstance(cfg, config_type) else config_type(**_tuples(cfg))
        return cls(**{**_tuples(fields), "config": config})


def _tuples(value):
    """``value`` with every list (at any depth, inside dicts) turned into a tuple, as dataclasses hold them."""
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return tuple(_tuples(v) for v in value)
    return value


def check_finite(tensor: torch.Tensor, name: str) -> None:
    """``ValueError`` naming ``name`` and the index of its first NaN or infinite value, if any.

    Every quantizer calls this on the weights (and activations) it rounds: a NaN would otherwise become a
    NaN scale, or an arbitrary code, with no error anywhere. (A NaN or infinity makes the sum non-finite,
    and a sum is many times faster than ``isfinite`` on a large tensor; only a non-finite sum is searched.)"""
    if not tensor.is_floating_point() or bool(torch.isfinite(tensor.detach().sum())):
        return
    bad = ~torch.isfinite(tensor.detach())
    if bool(bad.any()):
        first = tuple(int(i) for i in torch.nonzero(bad)[0].tolist())
        value = float(tensor.detach()[first])
        raise ValueError(
            f"{name} holds {int(bad.sum())} NaN or infinite value(s), the first at index {first} ({value}); "
            "quantization needs finite values: check the checkpoint or the layer that produced them"
        )


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` holds quantized weights: one of the course's :class:`QuantizedLayer`, a
    bitsandbytes layer, or a model transformers loaded with a quantization config."""
    return (
        isinstance(module, QuantizedLayer)
        or type(module).__module__.startswith("bitsandbytes")
        or bool(getattr(module, "is_quantized", False))
        or getattr(module, "hf_quantizer", None) is not None
    )


def check_not_quantized(model: nn.Module) -> None:
    """``ValueError`` if ``model`` already holds quantized layers (the course's, bitsandbytes' or transformers')."""
    found = [n for n, m in model.named_modules() if n and is_quantized(m)] + ["(marked quantized by transformers)"]
    if len(found) > 1 or is_quantized(model):
        raise ValueError(
            f"this model is already quantized (e.g. {found[0]}); quantizing it again would stack two roundings. "
            "Start from a float copy: reload it with models.load_model or copy.deepcopy the float model first"
        )


def linear_layers(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> dict[str, nn.Linear]:
    """Every plain ``nn.Linear`` in ``model`` by qualified name (not subclasses such as bitsandbytes'
    layers), except those whose name contains a ``skip`` entry."""
    return {n: m for n, m in model.named_modules() if type(m) is nn.Linear and not any(s in n for s in skip)}


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the qualified ``name`` (e.g. ``model.layers.0.mlp.down_proj``) of ``model``, in place."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def replace_linears(
    model: nn.Module,
    make: Callable[[nn.Linear], nn.Module],
    skip: tuple[str, ...] = ("lm_head",),
    only: list[str] | None = None,
) -> dict[str, tuple[nn.Linear, nn.Module]]:
    """Put ``make(linear)`` in place of each target Linear layer of ``model``, in place.

    Targets: every plain Linear except names containing a ``skip`` entry, or exactly the names in
    ``only`` (each must be an ``nn.Linear``). Returns ``{name: (old layer, new layer)}``. Raises
    ``ValueError`` for an already quantized model (:func:`check_not_quantized`; with ``only``, for a
    target that is quantized), a non-Linear name in ``only``, or when there is nothing to replace. Every
    quantizer of the course converts a model through this one function.
    """
    modules = dict(model.named_modules())
    if only is not None:
        quantized = [n for n in only if n in modules and is_quantized(modules[n])]
        if quantized:
            raise ValueError(f"these layers are already quantized; quantizing again would stack two roundings: {quantized}")
        wrong = [n for n in only if not isinstance(modules.get(n), nn.Linear)]
        if wrong:
            raise ValueError(f"only Linear layers can be quantized; not Linear (or missing): {wrong}")
        targets = {n: modules[n] for n in only}
    else:
        check_not_quantized(model)
        targets = linear_layers(model, skip)
    if not targets:
        raise ValueError(f"no nn.Linear layers to quantize in {type(model).__name__} (skip={skip})")
    for name, linear in targets.items():  # every weight checked before any layer changes
        check_finite(linear.weight, f"{name}.weight")
    replaced = {}
    for name, linear in targets.items():
        new = make(linear)
        set_module(model, name, new)
        replaced[name] = (linear, new)
    return replaced


def convert(
    model: nn.Module,
    config: object,
    make: Callable[[nn.Linear], nn.Module],
    skip: tuple[str, ...] = ("lm_head",),
    only: list[str] | None = None,
) -> tuple[dict[str, tuple[nn.Linear, nn.Module]], Report]:
    """Replace ``model``'s Linears by ``make(linear)`` (:func:`replace_linears`), timed and weighed.

    The body of every quantizer that needs no calibration (RTN, LLM.int8, NF4/FP4). Returns the replaced
    layers ``{name: (old, new)}`` and the :class:`Report`."""
    if isinstance(model, nn.Linear):
        raise ValueError("quantize_model expects a model containing Linear layers; for a single layer use the layer class itself")
    before = model_bytes(model)
    start = time.perf_counter()
    replaced = replace_linears(model, make, skip, only)
    seconds = time.perf_counter() - start
    return replaced, Report(config, len(replaced), 0, seconds, before, model_bytes(model), ())


def report_fields(report: Report) -> dict:
    """The fields of ``report`` (any :class:`Report` subclass) as a flat dict, values as they are (not
    copied, config kept as its dataclass): ``Subclass(**report_fields(r), extra=...)`` extends it."""
    return {f.name: getattr(report, f.name) for f in dataclasses.fields(report)}
