"""The salient-channel experiments of the AWQ paper (Lin et al., 2023, section 3), on a whole model.

Before AWQ's scale search, the paper shows why activations should pick the weights to protect: keeping
the top 1 % of input channels in float, chosen by activation magnitude, removes most of round-to-nearest's
damage; chosen by weight magnitude or at random it does little (:func:`keep_channels_float`, the paper's
table 1). Scaling those channels up before rounding instead of keeping them in float does nearly as well
and keeps one format for the whole weight (:func:`scale_channels`, table 2). The layers stay ``nn.Linear``
holding the rounded weights: these are experiments, the storage format does not matter.
"""

from __future__ import annotations

import torch
from torch import nn

from course_utils.quant import rtn
from course_utils.quant.contract import linear_layers


CRITERIA = ("activation", "weight", "random")


def salient_channels(
    weight: torch.Tensor,
    fraction: float,
    criterion: str = "activation",
    mean_abs: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Indices (sorted, int64) of the ``round(fraction * in)`` input channels of ``weight`` (out, in) that
    matter most by ``criterion``: "activation" (largest ``mean_abs``, the mean input magnitude E|x_j|),
    "weight" (largest column L2 norm) or "random" (drawn with ``generator``)."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be between 0 and 1 (0.01 = 1 %), got {fraction!r}")
    cols = weight.shape[1]
    n = int(round(fraction * cols))
    if criterion == "activation":
        if mean_abs is None or mean_abs.shape != (cols,):
            raise ValueError(f"the 'activation' criterion needs mean_abs for the {cols} input channels (from input_statistics)")
        score = mean_abs.float()
    elif criterion == "weight":
        score = weight.detach().float().norm(dim=0).cpu()
    else:
        score = torch.rand(cols, generator=generator)
    return torch.sort(torch.topk(score.cpu(), n).indices).values


def keep_float_columns(weight: torch.Tensor, channels: torch.Tensor, bits: int = 4, group_size: int | str = 64, symmetric: bool = True) -> torch.Tensor:
    """``weight`` rounded to nearest, except the columns ``channels``, which keep their float values."""
    out = rtn.fake_quantize(weight, bits, group_size, symmetric)
    idx = channels.to(weight.device)
    out[:, idx] = weight.detach()[:, idx]
    return out


def scaled_fake_quantize(weight: torch.Tensor, channels: torch.Tensor, factor: float, bits: int = 4,
                         group_size: int | str = 64, symmetric: bool = True) -> torch.Tensor:
    """``Q(W diag(s)) diag(1/s)``: the columns ``channels`` multiplied by ``factor`` before rounding and
    divided after (the paper's "scale instead of keeping in float"; with ``factor`` 1, plain RTN)."""
    if not factor > 0:
        raise ValueError(f"factor must be positive, got {factor!r}")
    s = torch.ones(weight.shape[1], device=weight.device)
    s[channels.to(weight.device)] = factor
    return (rtn.fake_quantize(weight.detach().float() * s, bits, group_size, symmetric) / s).to(weight.dtype)


def _per_linear(model, fraction, criterion, stats, seed, transform) -> dict[str, torch.Tensor]:
    layers = linear_layers(model)
    if not layers:
        raise ValueError(f"no nn.Linear layers to quantize in {type(model).__name__}")
    if criterion == "activation":
        if stats is None:
            raise ValueError("the 'activation' criterion needs stats=input_statistics(model, calibration)")
        missing = [n for n in layers if n not in stats]
        if missing:
            raise ValueError(f"stats has no entry for {missing[:3]}: compute it on this model with input_statistics")
    generator = torch.Generator().manual_seed(seed)
    chosen = {}
    with torch.no_grad():
        for name, linear in layers.items():
            mean_abs = stats[name].mean_abs if criterion == "activation" else None
            channels = salient_channels(linear.weight, fraction, criterion, mean_abs, generator)
            linear.weight.copy_(transform(linear.weight, channels))
            chosen[name] = channels
    return chosen


def keep_channels_float(
    model: nn.Module,
    fraction: float,
    criterion: str = "activation",
    bits: int = 4,
    group_size: int | str = 64,
    stats: dict | None = None,
    symmetric: bool = True,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Round every Linear of ``model`` (but ``lm_head``) to nearest, in place, except the top ``fraction``
    of its input channels by ``criterion``, whose weight columns stay float (the paper's table 1).

    ``stats``: :func:`course_utils.quant.activations.input_statistics` of the float model (needed for
    "activation"). The layers stay ``nn.Linear`` holding the rounded weights (an experiment: the storage
    format does not matter). Returns the kept channel indices per Linear name.
    """
    return _per_linear(model, fraction, criterion, stats, seed,
                       lambda w, ch: keep_float_columns(w, ch, bits, group_size, symmetric))


def scale_channels(
    model: nn.Module,
    fraction: float,
    factor: float,
    criterion: str = "activation",
    bits: int = 4,
    group_size: int | str = 64,
    stats: dict | None = None,
    symmetric: bool = True,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Round every Linear of ``model`` (but ``lm_head``) in place with the top ``fraction`` of its input
    channels (by ``criterion``) scaled by ``factor`` before rounding and back after
    (:func:`scaled_fake_quantize`; the paper's table 2). Returns the scaled channel indices per Linear."""
    return _per_linear(model, fraction, criterion, stats, seed,
                       lambda w, ch: scaled_fake_quantize(w, ch, factor, bits, group_size, symmetric))
