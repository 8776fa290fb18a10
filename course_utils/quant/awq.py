"""AWQ (Lin et al., 2023, activation-aware weight quantization): protect the weights that meet large
activations by scaling them up before rounding, and fold the inverse scale into the operation before.

(About 370 lines, a fifth of them this docstring, the reference lesson 08 and lab 08 point to. Where the
scales go in a Llama layer is :mod:`course_utils.quant.awq_layout`; the paper's section 3 experiments are
:mod:`course_utils.quant.salient`.)

A Linear computes ``y = W x``. For any positive vector ``s`` (one entry per input channel),
``y = (W diag(s)) (x / s)``: the float model does not change if the columns of ``W`` are multiplied by
``s`` and the inputs divided by ``s``. The inputs can be divided for free by folding ``1/s`` into the
operation that produces them: the weight of the RMSNorm before q/k/v and gate/up, or the output rows of
the Linear before o_proj (v_proj) and down_proj (up_proj). After rounding, the layer computes
``Q(W diag(s)) (x / s)``: a column scaled up by ``s_j > 1`` keeps more of its precision (its rounding
error, relative to the column, shrinks while the group's scale barely moves), at the price of the other
columns of its group. Channels with large activations ``|x_j|`` are the ones whose weight errors show most
in the output, so AWQ chooses ``s = s_x ** alpha`` from the mean input magnitude ``s_x = E|x_j|`` and
searches the exponent ``alpha``:

1. *statistics*: for each group of Linears that read the same input (q/k/v; o; gate/up; down), the mean
   magnitude ``s_x`` (in,) and the Gram matrix ``G = X^T X / n`` (in, in) of their inputs ``X`` on the
   calibration tokens;
2. *scale search*: for ``alpha`` in ``0, 1/n_grid, ..., (n_grid-1)/n_grid`` (20 values in [0, 1) by default),
   ``s = s_x ** alpha`` normalized by ``sqrt(max s * min s)`` (so that the scales straddle 1), every
   Linear of the group is rounded as ``Q(W diag(s)) diag(1/s)`` with round-to-nearest at the configured
   bits and groups (:func:`course_utils.quant.rtn.quantize`), and the group's output error on the
   calibration inputs is measured: ``tr(dW G dW^T) / out``, the mean squared error of the group's
   outputs, computed from the Gram matrix instead of a forward pass (exact, and about ten times cheaper
   than running the Linears on every token for every ``alpha``). ``alpha = 0`` means ``s = 1``: plain
   round-to-nearest is always one of the candidates, so the chosen ``alpha`` never does worse on this error;
3. *folding*: the previous RMSNorm's weight (or the previous Linear's output rows, and bias) is divided by
   ``s`` and the group's columns multiplied by ``s``; the layer's float output is checked to be unchanged
   (a ``ValueError`` otherwise: a layer whose norm is not a plain multiplication, such as Gemma's
   ``1 + weight``, is refused rather than silently broken). The same check runs once before any weight
   changes, with random scales folded into a copy of the first layer;
4. *clipping search*: for each Linear, each group of ``group_size`` weights of a row may shrink its range
   by a ratio ``r`` in ``1, 0.95, ..., 0.55`` (:data:`CLIP_RATIOS`); the ratio with the smallest error on
   that group's share of the output, ``dW_g G_g dW_g^T`` with ``G_g`` the group's diagonal block of the
   (scaled) Gram matrix, is kept. As in the authors' code, q_proj and k_proj are not clipped (their outputs
   meet in the softmax, where a smaller output error does not mean a smaller attention error);
5. *rounding*: round-to-nearest with the scales, clip ratios and grid above, stored as
   :class:`~course_utils.quant.linear.QuantLinear` (like RTN and GPTQ).

:func:`quantize_model` does this decoder layer by decoder layer: the inputs of each layer come from
the layers before it, already quantized (as in the course's GPTQ; the authors' code feeds the next layer
from the scaled but still float layer). Inside a layer, the statistics of all four groups are taken in
one pass of the float layer, then the groups are searched and folded in running order.

*o_proj with grouped-query attention.* The scale of o_proj's inputs must be folded into v_proj's output
rows. o_proj reads ``num_heads * head_dim`` channels, v_proj writes ``num_kv_heads * head_dim``: with
GQA, attention head ``h`` reads key/value head ``h // (num_heads / num_kv_heads)`` (transformers'
``repeat_kv``), so o_proj's input channel ``c = h * head_dim + d`` is a softmax-weighted average of v
channel ``(h // n_rep) * head_dim + d``. Dividing that v channel by ``s`` divides *all* ``n_rep`` o_proj
channels that read it by ``s``, so one scale is shared by those ``n_rep`` columns of o_proj (its
statistic: the mean of their ``s_x``). The authors' code and AutoAWQ only scale v -> o when the two
shapes match (multi-head attention) and skip it with GQA; the shared scale is the exact generalization
(with ``n_rep = 1`` it is the usual per-channel scale). The float check of step 3 confirms the mapping.

*Defaults.* ``bits=4, group_size=64, symmetric=True``: the paper's code uses a zero point (asymmetric)
and groups of 128, but 128 does not divide this model's widths everywhere, and the course's default
model is a dequantized Q4_1 checkpoint (4-bit, asymmetric, groups of 32), so a 4-bit asymmetric grid
with groups of 32 would reproduce it almost exactly and hide every difference between methods. Symmetric
groups of 64 match the course's RTN and GPTQ defaults, so the three are compared on the same grid.
``AWQConfig(symmetric=False)`` gives the paper's zero-point grid.

Where the scales go in a Llama layer, and the checks that folding them leaves the float model unchanged,
are in :mod:`course_utils.quant.awq_layout`; the salient-channel experiments of the paper's section 3 in
:mod:`course_utils.quant.salient`.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from course_utils.models import model_bytes
from course_utils.quant import rtn
from course_utils.quant.activations import InputStats
from course_utils.quant.awq_layout import (
    GROUP_LABELS, LLAMA_GROUPS, attention_expand, check_architecture, check_groups, fold_check, fold_scales, random_fold,
)
from course_utils.quant.contract import Report, check_not_quantized, replace_linears
from course_utils.quant.linear import QuantLinear
from course_utils.quant.layerwise import (
    check_calibration, check_group_size, check_model, decoder_layers, each_layer, layer_inputs, record_inputs, run_layer,
)

MIN_CALIBRATION_TOKENS = 256  # mean |x| per channel and the Gram matrix are noise below a few hundred tokens
CLIP_RATIOS = tuple(1 - i / 20 for i in range(10))  # 1.0, 0.95, ..., 0.55, as in the authors' code
NOT_CLIPPED = ("q_proj", "k_proj")  # their outputs meet in the softmax: the output-error proxy misleads


def normalized_scales(mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s = mean_abs ** alpha`` divided by ``sqrt(max s * min s)`` (float32): the largest and smallest
    scales are then reciprocal, so scaling moves weights up and down about equally. Channels that never
    fire (``mean_abs`` 0) are treated as ``1e-5`` of the largest, so no scale is 0."""
    m = mean_abs.detach().float()
    s = m.clamp(min=max(float(m.max()), 1e-12) * 1e-5).pow(alpha)
    return s / (s.max() * s.min()).sqrt()


def output_error(delta: torch.Tensor, gram: torch.Tensor) -> float:
    """Mean squared output error ``tr(dW G dW^T) / out`` of a weight error ``delta`` (out, in) on inputs
    whose Gram matrix is ``gram`` (in, in): the mean over tokens and output features of ``((dW) x)^2``."""
    return float(((delta @ gram) * delta).sum()) / delta.shape[0]


def pooled(values: torch.Tensor, expand: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` (in,) over the columns that share a scale: entry ``k`` averages the columns ``c``
    with ``expand[c] == k`` (no ``expand``: ``values`` itself)."""
    if expand is None:
        return values
    n = int(expand.max()) + 1
    total = torch.zeros(n, dtype=values.dtype, device=values.device).index_add_(0, expand, values)
    count = torch.zeros(n, dtype=values.dtype, device=values.device).index_add_(0, expand, torch.ones_like(values))
    return total / count


@dataclass(frozen=True)
class ScaleSearch:
    """What :func:`search_scale` found for one group of Linears.

    ``alpha``: the chosen exponent. ``scales``: the scale per output channel of the previous module, (m,)
    (per input column of the Linears when they do not share scales: ``scales[expand]`` otherwise).
    ``error``: the group's mean squared output error with those scales; ``rtn_error``: with ``alpha = 0``
    (plain round-to-nearest). ``alphas``, ``errors``: every candidate and its error.
    """

    alpha: float
    scales: torch.Tensor
    error: float
    rtn_error: float
    alphas: tuple[float, ...]
    errors: tuple[float, ...]


def alpha_grid(n_grid: int) -> tuple[float, ...]:
    """``0, 1/n_grid, ..., (n_grid-1)/n_grid``: ``n_grid`` exponents in [0, 1)."""
    if isinstance(n_grid, bool) or not isinstance(n_grid, int) or n_grid < 1:
        raise ValueError(f"n_grid must be a positive number of alpha values, got {n_grid!r}")
    return tuple(i / n_grid for i in range(n_grid))


def search_scale(
    weights: torch.Tensor | list[torch.Tensor],
    stats: InputStats,
    bits: int = 4,
    group_size: int | str = 64,
    symmetric: bool = True,
    n_grid: int = 20,
    expand: torch.Tensor | None = None,
    full_grid: bool = False,
) -> ScaleSearch:
    """AWQ's scale search for Linears that read the same inputs (see the module docstring, step 2).

    ``weights``: one weight (out, in) or the weights of the group (same ``in``). ``stats``: their inputs'
    :class:`InputStats`. ``expand``: (in,) for columns that must share a scale (o_proj under grouped-query
    attention): column ``c`` gets scale ``scales[expand[c]]``, chosen from the mean of the shared columns'
    ``mean_abs``. Returns a :class:`ScaleSearch`; ties go to the smaller ``alpha``.
    """
    rtn.check_bits(bits)
    w = torch.cat([t.detach().float() for t in ([weights] if isinstance(weights, torch.Tensor) else weights)])
    cols = w.shape[1]
    g = check_group_size(group_size, cols, "AWQ")
    if stats.mean_abs.shape != (cols,):
        raise ValueError(f"the input statistics are for {stats.mean_abs.shape[0]} features, the weights have {cols} columns")
    if expand is not None and expand.shape != (cols,):
        raise ValueError(f"expand must map each of the {cols} columns to a shared scale, got shape {tuple(expand.shape)}")
    gram = stats.gram.to(w.device)
    magnitude = pooled(stats.mean_abs.to(w.device), expand)
    alphas = alpha_grid(n_grid)
    errors, best, best_error, best_scales = [], 0, math.inf, None
    for k, alpha in enumerate(alphas):
        s = normalized_scales(magnitude, alpha)
        column = s if expand is None else s[expand]
        q = rtn.quantize(w * column, bits, g, symmetric, full_grid=full_grid).dequantize() / column
        err = output_error(q - w, gram)
        errors.append(err)
        if err < best_error:
            best, best_error, best_scales = k, err, s
    return ScaleSearch(alphas[best], best_scales, best_error, errors[0], alphas, tuple(errors))


def _group_blocks(gram: torch.Tensor, g: int) -> torch.Tensor:
    """The diagonal blocks (n_groups, g, g) of a Gram matrix (in, in)."""
    n = gram.shape[0] // g
    return torch.stack([gram[i * g : (i + 1) * g, i * g : (i + 1) * g] for i in range(n)])


def search_clip(
    weight: torch.Tensor,
    gram: torch.Tensor,
    bits: int = 4,
    group_size: int | str = 64,
    symmetric: bool = True,
    ratios: tuple[float, ...] = CLIP_RATIOS,
    full_grid: bool = False,
) -> torch.Tensor:
    """Best clip ratio per (row, group), (out, n_groups) float32, among ``ratios``.

    Each group's error is its share of the output error, ``dW_g G_g dW_g^T`` with ``G_g`` its diagonal
    block of ``gram`` (the Gram matrix of the Linear's inputs): exact for the group on its own, on every
    calibration token (unlike :func:`course_utils.quant.rtn.search_clip_ratio`, which keeps only the
    diagonal). Ties go to the larger ratio (less clipping).
    """
    rtn.check_bits(bits)
    w = weight.detach().float()
    out, cols = w.shape
    g = check_group_size(group_size, cols, "AWQ")
    blocks = _group_blocks(gram.to(w.device, torch.float32), g)
    best_error = torch.full((out, cols // g), math.inf, device=w.device)
    best = torch.ones(out, cols // g, device=w.device)
    for r in sorted(ratios, reverse=True):
        d = (rtn.quantize(w, bits, g, symmetric, r, full_grid).dequantize() - w).view(out, cols // g, g)
        err = (torch.einsum("ogi,gij->ogj", d, blocks) * d).sum(-1)
        better = err < best_error
        best_error = torch.where(better, err, best_error)
        best = torch.where(better, torch.full_like(best, r), best)
    return best


# ------------------------------------------------------------------------------ a whole model


@dataclass(frozen=True)
class AWQConfig:
    """How AWQ quantizes each Linear: ``bits`` (2-8), ``group_size`` (int or "channel"), ``symmetric``
    (absmax; False: the paper's zero-point grid), ``n_grid`` (alpha values in [0, 1)), ``clip`` (search a
    clip ratio per group after scaling), ``groups`` (which Linear groups get scales: any of "qkv", "o",
    "gate_up", "down"; the others are only clipped and rounded), ``full_grid`` (symmetric codes on all
    2**bits levels, -8..7 for 4 bits, as llama.cpp's Q4_0)."""

    method: ClassVar[str] = "awq"
    needs_calibration: ClassVar[bool] = True

    bits: int = 4
    group_size: int | str = 64
    symmetric: bool = True
    n_grid: int = 20
    clip: bool = True
    groups: tuple[str, ...] = GROUP_LABELS
    full_grid: bool = False

    def __post_init__(self):
        rtn.check_bits(self.bits)
        rtn.check_grid(self.symmetric, self.full_grid)
        alpha_grid(self.n_grid)

    def label(self) -> str:
        """Short name such as ``awq int4 g64 sym clip``."""
        g = self.group_size if isinstance(self.group_size, str) else f"g{self.group_size}"
        scaled = "" if tuple(self.groups) == GROUP_LABELS else f" scales:{'+'.join(self.groups) or 'none'}"
        grid = "sym full" if self.full_grid else "sym" if self.symmetric else "asym"
        return f"awq int{self.bits} {g} {grid}{' clip' if self.clip else ''}{scaled}"


@dataclass(frozen=True)
class AWQReport(Report):
    """:class:`~course_utils.quant.contract.Report` of :func:`quantize_model`, plus:

    ``alpha``: the chosen exponent per scaled group, keyed ``model.layers.<i>.<label>`` (label ``qkv``,
    ``o``, ``gate_up`` or ``down``). ``errors``: per group, (output error of plain RTN, with AWQ's scales),
    before clipping. ``clip_ratio``: mean chosen clip ratio per Linear name; ``clipped``: the fraction of
    its groups with a ratio below 1. ``notes``: anything worth knowing (groups not scaled, and why).
    """

    alpha: dict[str, float]
    errors: dict[str, tuple[float, float]]
    clip_ratio: dict[str, float]
    clipped: dict[str, float]

    def alpha_by_group(self) -> dict[str, list[float]]:
        """``{label: [alpha of layer 0, layer 1, ...]}`` for each scaled group label."""
        table: dict[str, list[float]] = {}
        for key, a in self.alpha.items():
            table.setdefault(key.rsplit(".", 1)[1], []).append(a)
        return table

    def clip_summary(self) -> dict[str, float]:
        """Over all clipped Linears: mean ratio and mean fraction of groups clipped (ratio < 1)."""
        clipped = [v for k, v in self.clipped.items() if not k.endswith(NOT_CLIPPED)]
        ratios = [v for k, v in self.clip_ratio.items() if not k.endswith(NOT_CLIPPED)]
        if not ratios:
            return {"mean_ratio": 1.0, "clipped_fraction": 0.0}
        return {"mean_ratio": sum(ratios) / len(ratios), "clipped_fraction": sum(clipped) / len(clipped)}


def _check(model: nn.Module, config: AWQConfig, calibration: torch.Tensor | None) -> nn.ModuleList:
    """Every refusal that needs no forward pass: model, architecture, bits, grid, groups, calibration."""
    check_not_quantized(model)
    check_architecture(*reversed(decoder_layers(model, "awq.quantize_model")))  # the layout first: its errors say more
    _, layers = check_model(model, config.bits, config.group_size, "AWQ", "awq.quantize_model")
    alpha_grid(config.n_grid)
    unknown = set(config.groups) - set(GROUP_LABELS)
    if unknown:
        raise ValueError(f"unknown AWQ groups {sorted(unknown)}; choose among {list(GROUP_LABELS)}")
    check_calibration(
        calibration, MIN_CALIBRATION_TOKENS,
        f"AWQ's minimum of {MIN_CALIBRATION_TOKENS}: the activation magnitudes it scales by would be noise",
    )
    return layers


def _check_first_layer(layer: nn.Module, inputs: list, probe: tuple[torch.Tensor, dict], where: str, config: AWQConfig) -> list[str]:
    """Before any weight changes: the Linears run as the Llama layout says, and random scales folded into
    a copy of the layer leave its float output unchanged. Returns the notes about grouped-query attention."""
    check_groups(layer, *inputs[0], where)
    trial = copy.deepcopy(layer)
    random_fold(trial, where, torch.Generator().manual_seed(0))
    fold_check(trial, probe, run_layer(layer, *probe), where)
    if "o" not in config.groups:
        return []
    expand = attention_expand(layer, where)
    shared = expand.numel() // (int(expand.max()) + 1)
    return [f"grouped-query attention: each o_proj scale is shared by the {shared} heads that read one value head"] if shared > 1 else []


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    config: AWQConfig = AWQConfig(),
    calibration: torch.Tensor | None = None,
    progress: bool = True,
    batch_size: int = 8,
) -> AWQReport:
    """Quantize every Linear of the decoder layers of ``model`` with AWQ, in place, layer by layer.

    ``calibration``: (n_samples, seq_len) token ids (:func:`course_utils.data.calibration_batches`), at
    least :data:`MIN_CALIBRATION_TOKENS` tokens, run in sub-batches of ``batch_size`` samples. Each
    decoder layer sees the outputs of the already quantized layers before it. Embeddings, the output head
    and the norms stay in float (the norms hold the folded scales). Works on the model's device.
    Everything is validated (architecture, bits, group size, calibration) before any weight changes.
    """
    layers = _check(model, config, calibration)
    before, start = model_bytes(model), time.perf_counter()
    probe = layer_inputs(model, layers[0], calibration[:1, :128], 1)[0]  # one short sample for the float check
    alphas, errors, ratios, clipped, notes = {}, {}, {}, {}, []
    for index, where, layer, inputs in each_layer(model, calibration, batch_size, config.label(), progress, "awq.quantize_model"):
        if index == 0:
            notes += _check_first_layer(layer, inputs, probe, where, config)
        modules = dict(layer.named_modules())
        device = modules[LLAMA_GROUPS[0][2][0]].weight.device
        # 1. statistics of every group's inputs, in one pass of the float layer
        stats = [InputStats(modules[names[0]].in_features, device, gram=True) for _, _, names in LLAMA_GROUPS]
        record_inputs(layer, [modules[names[0]] for _, _, names in LLAMA_GROUPS], inputs, [s.add for s in stats])
        reference = run_layer(layer, *probe)
        # 2.-3. scale search and folding, group by group
        for k, (label, previous, names) in enumerate(LLAMA_GROUPS):
            if label not in config.groups:
                continue
            expand = attention_expand(layer, where) if label == "o" else None
            linears = [modules[n] for n in names]
            found = search_scale([m.weight for m in linears], stats[k], config.bits, config.group_size, config.symmetric,
                                 config.n_grid, expand, config.full_grid)
            fold_scales(modules[previous], linears, found.scales, expand)
            stats[k] = stats[k].scaled(found.scales if expand is None else found.scales[expand])
            alphas[f"{where}.{label}"] = found.alpha
            errors[f"{where}.{label}"] = (found.rtn_error, found.error)
        fold_check(layer, probe, reference, where)
        # 4.-5. clip search and rounding
        quantized = {}
        for k, (_, _, names) in enumerate(LLAMA_GROUPS):
            for name in names:
                w = modules[name].weight
                if config.clip and not name.endswith(NOT_CLIPPED):
                    ratio = search_clip(w, stats[k].gram, config.bits, config.group_size, config.symmetric,
                                        full_grid=config.full_grid)
                else:
                    ratio = torch.ones(1, device=w.device)
                ratios[f"{where}.{name}"] = float(ratio.mean())
                clipped[f"{where}.{name}"] = float((ratio < 1).float().mean())
                quantized[modules[name]] = rtn.quantize(w, config.bits, config.group_size, config.symmetric, ratio,
                                                        config.full_grid)
        replace_linears(layer, lambda lin: QuantLinear(quantized[lin], lin.bias, dtype=lin.weight.dtype),
                        only=[n for _, _, names in LLAMA_GROUPS for n in names])
        probe = (run_layer(layer, *probe), probe[1])
    if tuple(config.groups) != GROUP_LABELS:
        notes.append(f"scales searched only for {list(config.groups)}; the other Linears are clipped and rounded as RTN")
    return AWQReport(config, len(ratios), calibration.numel(), time.perf_counter() - start, before, model_bytes(model),
                     tuple(notes), alphas, errors, ratios, clipped)
