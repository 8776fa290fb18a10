"""AWQ (Lin et al., 2023, activation-aware weight quantization): protect the weights that meet large
activations by scaling them up before rounding, and fold the inverse scale into the operation before.

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

:func:`awq_quantize_model` does this decoder layer by decoder layer: the inputs of each layer come from
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

The salient-channel experiments of the paper's section 3 are here too: :func:`keep_channels_float`
(keep the top 1 % of input channels in float, chosen by activation, weight or at random) and
:func:`scale_channels` (scale those channels by ``s`` before rounding instead).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from course_utils.quant import rtn
from course_utils.quant.gptq import Hessian
from course_utils.quant.layerwise import check_calibration, decoder_layers, layer_inputs, linear_groups, record_inputs, run_layer
from course_utils.quant.linear import QuantLinear, linear_layers, replace_linears
from course_utils.quant.llm_int8 import check_not_quantized

MIN_CALIBRATION_TOKENS = 256  # mean |x| per channel and the Gram matrix are noise below a few hundred tokens
CLIP_RATIOS = tuple(1 - i / 20 for i in range(10))  # 1.0, 0.95, ..., 0.55, as in the authors' code
NOT_CLIPPED = ("q_proj", "k_proj")  # their outputs meet in the softmax: the output-error proxy misleads

# The Llama decoder layer (also Mistral, Qwen2, SmolLM): each group of Linears reading one input, the
# module whose output that input is (where 1/s is folded), and the group's label.
LLAMA_GROUPS = (
    ("qkv", "input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("o", "self_attn.v_proj", ("self_attn.o_proj",)),
    ("gate_up", "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("down", "mlp.up_proj", ("mlp.down_proj",)),
)
GROUP_LABELS = tuple(label for label, _, _ in LLAMA_GROUPS)


# ------------------------------------------------------------------------------ one group of Linears


class InputStats:
    """Running statistics of the inputs ``x`` (..., in) of a group of Linears: ``mean_abs`` = E|x_j| (in,)
    and ``gram`` = X^T X / n (in, in), float32, over ``n_tokens`` tokens."""

    def __init__(self, in_features: int, device: torch.device | str | None = None):
        self._hessian = Hessian(in_features, device)  # 2 X^T X / n, as GPTQ's
        self._abs_sum = torch.zeros(in_features, dtype=torch.float32, device=device)

    @classmethod
    def from_inputs(cls, x: torch.Tensor) -> InputStats:
        """Statistics of one batch of inputs (..., in)."""
        stats = cls(x.shape[-1], x.device)
        stats.add(x)
        return stats

    def add(self, x: torch.Tensor) -> None:
        """Fold a batch of inputs (..., in) into the statistics."""
        x = x.detach().reshape(-1, self._abs_sum.shape[0]).to(self._abs_sum.device, torch.float32)
        self._hessian.add(x)
        self._abs_sum += x.abs().sum(0)

    @property
    def n_tokens(self) -> int:
        return self._hessian.n_tokens

    @property
    def mean_abs(self) -> torch.Tensor:
        return self._abs_sum / max(self.n_tokens, 1)

    @property
    def gram(self) -> torch.Tensor:
        return self._hessian.matrix / 2

    def scaled(self, column: torch.Tensor) -> InputStats:
        """The statistics of the inputs ``x / column`` (what a group reads once its scales are folded)."""
        column = column.to(self._abs_sum.device, torch.float32)
        out = InputStats(column.shape[0], column.device)
        out._hessian.matrix = self._hessian.matrix / column.unsqueeze(0) / column.unsqueeze(1)
        out._hessian.n_tokens = self.n_tokens
        out._abs_sum = self._abs_sum / column
        return out


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


def _check_group_size(group_size, in_features: int) -> int:
    if group_size == "tensor":
        raise ValueError("AWQ quantizes per group or per channel ('channel'), not with one scale per tensor")
    return rtn.resolve_group_size(group_size, in_features)


def search_scale(
    weights: torch.Tensor | list[torch.Tensor],
    stats: InputStats,
    bits: int = 4,
    group_size: int | str = 64,
    symmetric: bool = True,
    n_grid: int = 20,
    expand: torch.Tensor | None = None,
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
    g = _check_group_size(group_size, cols)
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
        q = rtn.quantize(w * column, bits, g, symmetric).dequantize() / column
        err = output_error(q - w, gram)
        errors.append(err)
        if err < best_error:
            best, best_error, best_scales = k, err, s
    return ScaleSearch(alphas[best], best_scales, best_error, errors[0], alphas, tuple(errors))


@torch.no_grad()
def fold_scales(previous: nn.Module, linears: list[nn.Linear], scales: torch.Tensor, expand: torch.Tensor | None = None) -> None:
    """Divide ``previous``'s output by ``scales`` and multiply the ``linears``' columns by them, in place.

    ``previous``: a norm with a per-channel ``weight`` (and optional ``bias``) or a Linear (its output rows
    and bias are divided). ``scales``: (m,) one per output channel of ``previous``. ``expand``: (in,) which
    scale each column of the ``linears`` gets (default: column ``j`` gets ``scales[j]``). The float
    model computes the same outputs as long as ``previous``'s output reaches the ``linears`` through
    operations that commute with a per-channel scale (a copy, a softmax-weighted average over positions,
    a product with an unscaled tensor).
    """
    s = scales.detach().float()
    column = s if expand is None else s[expand]
    weight = getattr(previous, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.shape[0] != s.shape[0]:
        raise ValueError(f"cannot fold {s.shape[0]} scales into {type(previous).__name__}: it has no weight with {s.shape[0]} output channels")
    if isinstance(previous, nn.Linear):
        previous.weight.copy_(previous.weight.float() / s.unsqueeze(1))
    elif weight.dim() == 1:
        previous.weight.copy_(previous.weight.float() / s)
    else:
        raise ValueError(f"cannot fold scales into {type(previous).__name__}: not a Linear and not a per-channel norm")
    if getattr(previous, "bias", None) is not None:
        previous.bias.copy_(previous.bias.float() / s)
    for linear in linears:
        if linear.in_features != column.shape[0]:
            raise ValueError(f"a Linear with {linear.in_features} inputs cannot take {column.shape[0]} column scales")
        linear.weight.copy_(linear.weight.float() * column)


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
    g = _check_group_size(group_size, cols)
    blocks = _group_blocks(gram.to(w.device, torch.float32), g)
    best_error = torch.full((out, cols // g), math.inf, device=w.device)
    best = torch.ones(out, cols // g, device=w.device)
    for r in sorted(ratios, reverse=True):
        d = (rtn.quantize(w, bits, g, symmetric, r).dequantize() - w).view(out, cols // g, g)
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
    "gate_up", "down"; the others are only clipped and rounded)."""

    bits: int = 4
    group_size: int | str = 64
    symmetric: bool = True
    n_grid: int = 20
    clip: bool = True
    groups: tuple[str, ...] = GROUP_LABELS

    def label(self) -> str:
        """Short name such as ``awq int4 g64 sym clip``."""
        g = self.group_size if isinstance(self.group_size, str) else f"g{self.group_size}"
        scaled = "" if tuple(self.groups) == GROUP_LABELS else f" scales:{'+'.join(self.groups) or 'none'}"
        return f"awq int{self.bits} {g} {'sym' if self.symmetric else 'asym'}{' clip' if self.clip else ''}{scaled}"


@dataclass(frozen=True)
class AWQReport:
    """What :func:`awq_quantize_model` did.

    ``alpha``: the chosen exponent per scaled group, keyed ``model.layers.<i>.<label>`` (label ``qkv``,
    ``o``, ``gate_up`` or ``down``). ``errors``: per group, (output error of plain RTN, with AWQ's scales),
    before clipping. ``clip_ratio``: mean chosen clip ratio per Linear name; ``clipped``: the fraction of
    its groups with a ratio below 1. ``notes``: anything worth knowing (groups not scaled, and why).
    """

    config: AWQConfig
    n_layers: int
    n_tokens: int
    seconds: float
    alpha: dict[str, float]
    errors: dict[str, tuple[float, float]]
    clip_ratio: dict[str, float]
    clipped: dict[str, float]
    notes: tuple[str, ...] = field(default=())

    @classmethod
    def from_dict(cls, fields: dict) -> AWQReport:
        """The report again from its fields (``dataclasses.asdict``, as :mod:`course_utils.quant.store` keeps it)."""
        cfg = fields["config"]
        config = cfg if isinstance(cfg, AWQConfig) else AWQConfig(**{**cfg, "groups": tuple(cfg["groups"])})
        return cls(**{**fields, "config": config, "errors": {k: tuple(v) for k, v in fields["errors"].items()},
                      "notes": tuple(fields.get("notes", ()))})

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


def _attention_expand(layer: nn.Module, where: str) -> torch.Tensor:
    """(o_in,) index: the v_proj output channel each o_proj input channel is an average of (see the
    module docstring: head ``h`` reads key/value head ``h // n_rep``)."""
    attn = layer.self_attn
    v, o = attn.v_proj, attn.o_proj
    head_dim = getattr(attn, "head_dim", None)
    if not isinstance(head_dim, int) or head_dim <= 0 or v.out_features % head_dim or o.in_features % head_dim:
        raise ValueError(f"{where}.self_attn: cannot tell its head size (head_dim={head_dim!r}, v_proj out "
                         f"{v.out_features}, o_proj in {o.in_features}); AWQ cannot map o_proj's inputs to v_proj's outputs")
    n_heads, n_kv = o.in_features // head_dim, v.out_features // head_dim
    if n_heads % n_kv:
        raise ValueError(f"{where}.self_attn: {n_heads} heads do not share {n_kv} key/value heads evenly")
    c = torch.arange(o.in_features, device=o.weight.device)
    return (c // head_dim) // (n_heads // n_kv) * head_dim + c % head_dim


def check_architecture(layers: nn.ModuleList, prefix: str = "model.layers") -> None:
    """``ValueError`` naming the first module that does not fit the Llama layer AWQ knows
    (:data:`LLAMA_GROUPS`): a missing or non-Linear module, a norm without a per-channel weight, or a
    Linear the layout does not cover (it would be left unquantized)."""
    known = {n for _, _, names in LLAMA_GROUPS for n in names}
    for i, layer in enumerate(layers):
        if type(layer) is not type(layers[0]):
            raise ValueError(f"{prefix}.{i} is a {type(layer).__name__}, {prefix}.0 a {type(layers[0]).__name__}: AWQ expects one kind of decoder layer")
        modules = dict(layer.named_modules())
        for label, previous, names in LLAMA_GROUPS:
            for name in (previous, *names):
                m = modules.get(name)
                if m is None:
                    raise ValueError(
                        f"AWQ knows the Llama decoder layer ({', '.join(sorted(known))} with input_layernorm and "
                        f"post_attention_layernorm); {prefix}.{i} ({type(layer).__name__}) has no module '{name}': "
                        "this architecture is not supported"
                    )
                if name in names and type(m) is not nn.Linear:
                    raise ValueError(f"AWQ expects {prefix}.{i}.{name} to be an nn.Linear, it is {type(m).__name__}")
            norm = modules[previous]
            if not isinstance(norm, nn.Linear):
                weight = getattr(norm, "weight", None)
                if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
                    raise ValueError(f"AWQ folds scales into {prefix}.{i}.{previous}, but this {type(norm).__name__} has no per-channel weight")
        extra = sorted(n for n, m in modules.items() if isinstance(m, nn.Linear) and n not in known)
        if extra:
            raise ValueError(f"{prefix}.{i} holds Linear layers outside the Llama layout AWQ knows: {extra}; this architecture is not supported")


def _check_groups(layer: nn.Module, hidden: torch.Tensor, kwargs: dict, where: str) -> None:
    expected = [list(names) for _, _, names in LLAMA_GROUPS]
    found = linear_groups(layer, hidden, kwargs)
    if found != expected:
        raise ValueError(f"{where}: its Linears run as {found}, not as the Llama layout {expected} "
                         "(groups sharing one input): this architecture is not supported")


def _random_fold(layer: nn.Module, where: str, generator: torch.Generator) -> None:
    """Fold random scales (0.5 to 2) into every group of ``layer``: its float output must not change."""
    modules = dict(layer.named_modules())
    for label, previous, names in LLAMA_GROUPS:
        expand = _attention_expand(layer, where) if label == "o" else None
        width = modules[names[0]].in_features if expand is None else int(expand.max()) + 1
        s = 2 ** (2 * torch.rand(width, generator=generator) - 1)
        fold_scales(modules[previous], [modules[n] for n in names], s.to(modules[names[0]].weight.device), expand)


def _fold_check(layer: nn.Module, probe: tuple[torch.Tensor, dict], reference: torch.Tensor, where: str) -> None:
    out = run_layer(layer, *probe)
    rel = float((out.float() - reference.float()).norm() / reference.float().norm().clamp(min=1e-12))
    tolerance = 1e-4 if reference.dtype == torch.float32 else 3e-2
    if not rel <= tolerance:
        raise ValueError(
            f"{where}: folding the AWQ scales changed the float layer's output (relative error {rel:.2g}); its "
            "norms or attention do not commute with a per-channel scale: this architecture is not supported"
        )


@torch.no_grad()
def awq_quantize_model(
    model: nn.Module,
    calibration: torch.Tensor,
    config: AWQConfig = AWQConfig(),
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
    from tqdm.auto import tqdm

    check_not_quantized(model)
    prefix, layers = decoder_layers(model, "awq_quantize_model")
    check_architecture(layers, prefix)
    rtn.check_bits(config.bits)
    alpha_grid(config.n_grid)
    unknown = set(config.groups) - set(GROUP_LABELS)
    if unknown:
        raise ValueError(f"unknown AWQ groups {sorted(unknown)}; choose among {list(GROUP_LABELS)}")
    for m in (m for layer in layers for m in layer.modules() if type(m) is nn.Linear):
        _check_group_size(config.group_size, m.in_features)
    check_calibration(
        calibration, MIN_CALIBRATION_TOKENS,
        f"AWQ's minimum of {MIN_CALIBRATION_TOKENS}: the activation magnitudes it scales by would be noise",
    )

    start = time.perf_counter()
    inputs = layer_inputs(model, layers[0], calibration, batch_size)
    probe = layer_inputs(model, layers[0], calibration[:1, :128], 1)  # one short sample for the float check
    _check_groups(layers[0], *inputs[0], f"{prefix}.0")
    # before touching the model: random scales folded into a copy of the first layer leave it unchanged
    trial = copy.deepcopy(layers[0])
    _random_fold(trial, f"{prefix}.0", torch.Generator().manual_seed(0))
    _fold_check(trial, probe[0], run_layer(layers[0], *probe[0]), f"{prefix}.0")
    del trial
    alphas, errors, ratios, clipped, notes = {}, {}, {}, {}, []
    if "o" in config.groups:
        expand = _attention_expand(layers[0], f"{prefix}.0")
        shared = expand.numel() // (int(expand.max()) + 1)
        if shared > 1:
            notes.append(f"grouped-query attention: each o_proj scale is shared by the {shared} heads that read one value head")
    for index, layer in enumerate(tqdm(layers, desc=config.label(), disable=not progress)):
        where = f"{prefix}.{index}"
        modules = dict(layer.named_modules())
        device = modules[LLAMA_GROUPS[0][2][0]].weight.device
        # 1. statistics of every group's inputs, in one pass of the float layer
        stats = [InputStats(modules[names[0]].in_features, device) for _, _, names in LLAMA_GROUPS]
        record_inputs(layer, [modules[names[0]] for _, _, names in LLAMA_GROUPS], inputs, [s.add for s in stats])
        reference = run_layer(layer, *probe[0])
        # 2.-3. scale search and folding, group by group
        for k, (label, previous, names) in enumerate(LLAMA_GROUPS):
            if label not in config.groups:
                continue
            expand = _attention_expand(layer, where) if label == "o" else None
            linears = [modules[n] for n in names]
            found = search_scale([m.weight for m in linears], stats[k], config.bits, config.group_size, config.symmetric, config.n_grid, expand)
            fold_scales(modules[previous], linears, found.scales, expand)
            column = found.scales if expand is None else found.scales[expand]
            stats[k] = stats[k].scaled(column)
            alphas[f"{where}.{label}"] = found.alpha
            errors[f"{where}.{label}"] = (found.rtn_error, found.error)
        _fold_check(layer, probe[0], reference, where)
        # 4.-5. clip search and rounding
        quantized = {}
        for k, (_, _, names) in enumerate(LLAMA_GROUPS):
            for name in names:
                w = modules[name].weight
                if config.clip and not name.endswith(NOT_CLIPPED):
                    ratio = search_clip(w, stats[k].gram, config.bits, config.group_size, config.symmetric)
                else:
                    ratio = torch.ones(1, device=w.device)
                ratios[f"{where}.{name}"] = float(ratio.mean())
                clipped[f"{where}.{name}"] = float((ratio < 1).float().mean())
                quantized[modules[name]] = rtn.quantize(w, config.bits, config.group_size, config.symmetric, ratio)
        replace_linears(layer, lambda lin: QuantLinear(quantized[lin], lin.bias, dtype=lin.weight.dtype),
                        only=[n for _, _, names in LLAMA_GROUPS for n in names])
        inputs = [(run_layer(layer, hidden, kwargs), kwargs) for hidden, kwargs in inputs]
        probe = [(run_layer(layer, *probe[0]), probe[0][1])]
    if tuple(config.groups) != GROUP_LABELS:
        notes.append(f"scales searched only for {list(config.groups)}; the other Linears are clipped and rounded as RTN")
    return AWQReport(
        config=config,
        n_layers=len(ratios),
        n_tokens=calibration.numel(),
        seconds=time.perf_counter() - start,
        alpha=alphas,
        errors=errors,
        clip_ratio=ratios,
        clipped=clipped,
        notes=tuple(notes),
    )


# ------------------------------------------------------------------------------ salient channels (paper, section 3)

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
            mean_abs = stats[name]["mean_abs"] if criterion == "activation" else None
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
