"""SmoothQuant: move the activations' outlier channels into the weights before quantizing both.

Xiao, Lin, Seznec, Wu, Demouth & Han, "SmoothQuant: Accurate and Efficient Post-Training Quantization for
Large Language Models" (ICML 2023). A Linear computes ``X W^T``; for any positive ``s`` (in,),
``X W^T = (X / s) (W * s)^T``. A few input channels ``j`` of ``X`` are far larger than the rest (lesson
06's outliers); dividing them by ``s_j`` flattens ``X``, and multiplying ``W``'s column ``j`` by ``s_j``
hands the difficulty to the weights, which a per-output-channel scale quantizes well. The paper's factor

    s_j = max|X_j| ** alpha / max|W_j| ** (1 - alpha)

splits it: ``alpha`` = 0 leaves the activations alone, 1 makes every activation channel's maximum 1 (all
of the difficulty in the weights); 0.5 balances the two maxima. ``max|W_j|`` is taken over all the rows of
every Linear that reads ``X`` (q, k and v share their input). The division by ``s`` is folded into the
RMSNorm in front (its per-channel weight), so it costs nothing at run time
(:func:`course_utils.quant.awq_layout.fold_scales`, as AWQ's scales are folded in lesson 08).

Where (``groups``): by default the inputs of q/k/v (after ``input_layernorm``) and of gate/up (after
``post_attention_layernorm``), the two groups llm-compressor smooths by default for a Llama. ``"down"`` adds
down_proj, whose input is ``act(gate) * up``: its factor is folded into up_proj's output rows, as AWQ does. ``statistic="range"`` computes the factor
as llm-compressor does: the activation's range ``max X_j - min X_j`` instead of ``max|X_j|`` and twice
``max|W_j|`` (the weight's symmetric range), which changes ``s`` by a factor ``(range / max|X|) ** alpha /
2 ** (1 - alpha)`` per channel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from course_utils.quant.activations import capture_inputs, run_batches
from course_utils.quant.awq_layout import LLAMA_GROUPS, check_architecture, fold_scales
from course_utils.quant.contract import check_finite, check_not_quantized

SMOOTHED_GROUPS = ("qkv", "gate_up")  # the groups behind a norm, where the division folds for free
GROUPS = ("qkv", "gate_up", "down")  # what smooth_model can smooth ("down": folded into up_proj's rows)
STATISTICS = ("absmax", "range")
MINIMUM_FACTOR = 1e-5  # llm-compressor's floor on a factor, so that a dead channel does not divide by 0


def check_alpha(alpha: float) -> float:
    """``alpha`` as a float in [0, 1]; ``ValueError`` otherwise."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"SmoothQuant's alpha is a migration strength between 0 and 1, got {alpha!r}")
    return float(alpha)


def smoothing_factors(activation: torch.Tensor, weights: list[torch.Tensor], alpha: float = 0.5,
                      statistic: str = "absmax") -> torch.Tensor:
    """The factor ``s`` (in,) float32 for one group of Linears reading the same input.

    ``activation``: (in,) ``max|X_j|`` over the calibration tokens (or, with ``statistic="range"``, the
    range ``max X_j - min X_j``); ``weights``: the group's weights, each (out_i, in). A channel whose
    weights are all zero keeps ``s = activation``, one whose factor is tiny gets :data:`MINIMUM_FACTOR`."""
    alpha = check_alpha(alpha)
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
    w = torch.cat([x.detach().float().abs() for x in weights], dim=0).amax(0)
    if statistic == "range":
        w = 2.0 * w
    a = activation.float()
    s = torch.where(w > 0, a.pow(alpha) / w.pow(1 - alpha), a)
    return s.clamp(min=MINIMUM_FACTOR)


@dataclass(frozen=True)
class Smoothing:
    """What :func:`smooth_model` did: ``alpha``, ``statistic``, and per smoothed group (``model.layers.3.qkv``)
    the activation's largest channel maximum over its median before and after (the outlier ratio)."""

    alpha: float
    statistic: str
    outlier_ratio_before: dict[str, float]
    outlier_ratio_after: dict[str, float]


def check_groups(groups: tuple[str, ...]) -> tuple[str, ...]:
    """``groups`` as a tuple of names from :data:`GROUPS`; ``ValueError`` for another name or none."""
    groups = tuple(groups)
    wrong = [g for g in groups if g not in GROUPS]
    if wrong or not groups:
        raise ValueError(f"SmoothQuant smooths some of {GROUPS}, got {groups!r}")
    return groups


def outlier_ratio(channel_max: torch.Tensor) -> float:
    """How uneven ``channel_max`` (in,) is: its largest entry over its median (1: every channel alike)."""
    return float(channel_max.max() / channel_max.median().clamp(min=1e-12))


@torch.no_grad()
def group_statistics(model: nn.Module, calibration: torch.Tensor, statistic: str = "absmax",
                     batch_size: int = 4, groups: tuple[str, ...] = SMOOTHED_GROUPS) -> dict[str, torch.Tensor]:
    """``{"model.layers.i.qkv": (in,), ...}``: the input statistic of each smoothed group over the calibration
    tokens (n_samples, seq_len): ``max|X_j|`` or ``max X_j - min X_j`` of what its first Linear receives."""
    layers = model.model.layers
    check_architecture(layers)
    firsts = {f"model.layers.{i}.{label}": layer.get_submodule(names[0])
              for i, layer in enumerate(layers) for label, _, names in LLAMA_GROUPS if label in check_groups(groups)}
    lo = {k: None for k in firsts}
    hi = dict(lo)
    with capture_inputs(*firsts.values()) as seen:
        for rows in calibration.split(batch_size):
            run_batches(model, rows, batch_size)
            for (key, _), inputs in zip(firsts.items(), seen):
                for x in inputs:
                    x = x.reshape(-1, x.shape[-1]).float()
                    check_finite(x, f"the inputs of {key}")
                    mn, mx = x.amin(0), x.amax(0)
                    lo[key] = mn if lo[key] is None else torch.minimum(lo[key], mn)
                    hi[key] = mx if hi[key] is None else torch.maximum(hi[key], mx)
                inputs.clear()
    if statistic == "range":
        return {k: (hi[k] - lo[k]).cpu() for k in firsts}
    return {k: torch.maximum(hi[k].abs(), lo[k].abs()).cpu() for k in firsts}


@torch.no_grad()
def smooth_model(model: nn.Module, calibration: torch.Tensor, alpha: float = 0.5, statistic: str = "absmax",
                 batch_size: int = 4, groups: tuple[str, ...] = SMOOTHED_GROUPS) -> Smoothing:
    """Fold SmoothQuant's factors into ``model`` (a float Llama-style model), in place: the norms' weights
    (or, for ``"down"``, up_proj's rows) divided by ``s``, the smoothed Linears' columns multiplied by it. The float model's outputs do not change
    (up to float rounding). Refuses an already quantized model and ``alpha`` outside [0, 1]."""
    check_alpha(alpha)
    check_not_quantized(model)
    stats = group_statistics(model, calibration, statistic, batch_size, groups)
    before, after = {}, {}
    for i, layer in enumerate(model.model.layers):
        for label, previous, names in LLAMA_GROUPS:
            if label not in groups:
                continue
            key = f"model.layers.{i}.{label}"
            linears = [layer.get_submodule(n) for n in names]
            s = smoothing_factors(stats[key], [m.weight for m in linears], alpha, statistic)
            before[key] = outlier_ratio(stats[key])
            after[key] = outlier_ratio(stats[key] / s)
            fold_scales(layer.get_submodule(previous), linears, s.to(linears[0].weight.device))
    return Smoothing(alpha, statistic, before, after)
