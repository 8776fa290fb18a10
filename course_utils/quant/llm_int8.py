"""LLM.int8 (Dettmers et al., 2022): vector-wise int8 matmul with a mixed-precision decomposition.

For ``y = x @ W.T`` with activations ``x`` (tokens, in) and an ``nn.Linear`` weight ``W`` (out, in):

1. *vector-wise absmax*: each row of ``x`` (one token) and each row of ``W`` (one output feature, a
   column of ``W.T``) gets its own scale ``absmax / 127``; both become int8; the int8 x int8 products
   are summed exactly (int32 in a real kernel, float64 here) and multiplied back by both scales;
2. *decomposition*: input features (columns of ``x``) in which any value reaches ``threshold``
   (6.0 by default) are taken out and multiplied in floating point; the rest go through int8.

``act_granularity="tensor"`` quantizes the activations with one scale per tensor instead: the
classic setting that an outlier feature ruins, which the lesson uses to show why (1) and (2) exist.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from course_utils.quant.activations import InputStats
from course_utils.quant.contract import QuantizedLayer, Report, check_finite, convert

DEFAULT_THRESHOLD = 6.0
_EXACT_CHUNK = 1024  # 1024 * 127 * 127 < 2**24: int8 dot products of this length are exact in float32


def check_threshold(threshold: float | None) -> None:
    """Raise ``ValueError`` unless ``threshold`` is None (no decomposition) or a positive number."""
    if threshold is None:
        return
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold > 0:
        raise ValueError(
            f"threshold must be a positive magnitude such as 6.0 (features reaching it go through the float "
            f"path), got {threshold!r}; pass threshold=None to switch the decomposition off"
        )


def absmax_int8(x: torch.Tensor, granularity: str = "row", name: str = "tensor") -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 of ``x`` (rows, cols): codes (rows, cols) int8 and scales (rows, 1) float32.

    ``granularity``: "row" (one scale per row: vector-wise) or "tensor" (one scale for all, repeated
    per row). ``scale = absmax / 127``; an all-zero row keeps scale 0 and codes 0. ``name`` names ``x``
    in the error raised for NaN or inf values.
    """
    if granularity not in ("row", "tensor"):
        raise ValueError(f"granularity must be 'row' or 'tensor', got {granularity!r}")
    check_finite(x, name)
    x = x.float()
    amax = x.abs().amax(dim=1, keepdim=True) if granularity == "row" else x.abs().amax().expand(x.shape[0], 1)
    scale = amax / 127
    codes = torch.round(x * (127 / amax.clamp(min=1e-30))).clamp(-127, 127).to(torch.int8)
    return codes, scale.contiguous()


def outlier_columns(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Indices (int64) of the columns (input features) of ``x`` (tokens, in) with any |value| >= threshold."""
    check_threshold(threshold)
    return torch.nonzero((x.abs() >= threshold).any(dim=0)).flatten()


def int8_matmul(x_codes: torch.Tensor, x_scale: torch.Tensor, w_codes: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """``(x_codes @ w_codes.T) * x_scale * w_scale.T``: (tokens, in) x (out, in) -> (tokens, out) float32.

    The integer products are summed exactly, as an int8 kernel would: float32 represents every integer
    up to 2**24, and a chunk of 1,024 products of at most 127 * 127 stays below it, so each chunk is an
    exact float32 matmul and the chunks are added in float64.
    """
    n_in = x_codes.shape[-1]
    acc = torch.zeros(x_codes.shape[0], w_codes.shape[0], dtype=torch.float64, device=x_codes.device)
    for k in range(0, n_in, _EXACT_CHUNK):
        acc += (x_codes[:, k : k + _EXACT_CHUNK].float() @ w_codes[:, k : k + _EXACT_CHUNK].float().T).double()
    return (acc * x_scale.double() * w_scale.double().T).float()


def llm_int8_matmul(x: torch.Tensor, w_codes: torch.Tensor, w_scale: torch.Tensor,
                    threshold: float | None = DEFAULT_THRESHOLD, act_granularity: str = "row") -> torch.Tensor:
    """LLM.int8 product of activations ``x`` (..., in) with an int8 weight (out, in) and its scales (out, 1).

    Outlier features (see :func:`outlier_columns`) are multiplied in float with the dequantized weight
    columns (the weight is stored in int8 only); the other features go through :func:`int8_matmul`.
    ``threshold=None`` quantizes every feature. Returns (..., out) in ``x.dtype``.
    """
    check_threshold(threshold)
    check_finite(x, "the activation tensor")  # before the split: an inf reaches any threshold
    lead, n_in = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, n_in).float()
    regular = x2
    out = None
    if threshold is not None:
        cols = outlier_columns(x2, threshold)
        if cols.numel():
            out = x2[:, cols] @ (w_codes[:, cols].float() * w_scale).T
            regular = x2.clone()
            regular[:, cols] = 0
    x_codes, x_scale = absmax_int8(regular, act_granularity, "the activation tensor")
    y = int8_matmul(x_codes, x_scale, w_codes, w_scale)
    if out is not None:
        y = y + out
    return y.reshape(*lead, -1).to(x.dtype)


class Int8Linear(QuantizedLayer):
    """``nn.Linear`` replacement: weight (out, in) stored as int8 codes + one float32 scale per row.

    ``threshold`` (float or None) and ``act_granularity`` ("row" or "tensor") choose how the
    activations are treated (see :func:`llm_int8_matmul`). ``n_outlier_calls`` counts forward calls
    that found at least one outlier feature.
    """

    def __init__(self, linear: nn.Linear, threshold: float | None = DEFAULT_THRESHOLD, act_granularity: str = "row"):
        super().__init__()
        check_threshold(threshold)
        codes, scale = absmax_int8(linear.weight.detach(), "row", "the weight")
        self.out_features, self.in_features = linear.weight.shape
        self.threshold, self.act_granularity = threshold, act_granularity
        self.register_buffer("weight_codes", codes)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = llm_int8_matmul(x, self.weight_codes, self.weight_scale, self.threshold, self.act_granularity)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, threshold={self.threshold}, "
                f"act_granularity={self.act_granularity}")


@dataclass(frozen=True)
class Int8Config:
    """LLM.int8 for every Linear: ``threshold`` (inputs reaching it go through the float path; None: no
    decomposition) and ``act_granularity`` ("row": one activation scale per token; "tensor": one for all)."""

    method: ClassVar[str] = "llm_int8"
    needs_calibration: ClassVar[bool] = False

    threshold: float | None = DEFAULT_THRESHOLD
    act_granularity: str = "row"

    def __post_init__(self):
        check_threshold(self.threshold)
        if self.act_granularity not in ("row", "tensor"):
            raise ValueError(f"act_granularity must be 'row' or 'tensor', got {self.act_granularity!r}")

    def label(self) -> str:
        """Short name such as ``LLM.int8 t6 row``."""
        return f"LLM.int8 {'no split' if self.threshold is None else f't{self.threshold:g}'} {self.act_granularity}"


def quantize_model(model: nn.Module, config: Int8Config = Int8Config(), calibration: torch.Tensor | None = None,
                   skip: tuple[str, ...] = ("lm_head",)) -> Report:
    """Replace every ``nn.Linear`` (except names containing a ``skip`` entry) by :class:`Int8Linear`, in place.

    ``calibration`` is not used (the outlier split happens at run time). Returns a
    :class:`~course_utils.quant.contract.Report`; refuses an already quantized model.
    """
    return convert(model, config, lambda linear: Int8Linear(linear, config.threshold, config.act_granularity), skip)[1]


# ------------------------------------------------------------------------------ measuring outliers


@dataclass(frozen=True)
class OutlierStats:
    """Input magnitudes per feature seen by the Linear layers reading the hidden state.

    ``absmax``: (n_inputs, hidden) float32, the largest |value| of each feature, one row per distinct
    Linear input (layers sharing an input, such as q/k/v, are counted once), in model order.
    ``position_share``: (n_inputs, hidden), the fraction of positions (tokens) where the feature's
    |value| reaches ``threshold``. ``names``: the first Linear reading each input.
    """

    absmax: torch.Tensor
    names: tuple[str, ...]
    position_share: torch.Tensor
    threshold: float = DEFAULT_THRESHOLD

    def per_feature(self) -> torch.Tensor:
        """(hidden,) largest magnitude of each feature across all layers and positions."""
        return self.absmax.amax(dim=0)

    def features_over(self, threshold: float | None = None) -> torch.Tensor:
        """Indices of features whose magnitude reaches ``threshold`` (default: the measured one) somewhere."""
        return torch.nonzero(self.per_feature() >= (threshold or self.threshold)).flatten()

    def layers_with(self, feature: int, threshold: float | None = None) -> int:
        """In how many of the measured inputs ``feature`` reaches ``threshold``."""
        return int((self.absmax[:, feature] >= (threshold or self.threshold)).sum())

    def _by_layer(self, values: torch.Tensor) -> torch.Tensor:
        index = [int(m.group(1)) if (m := re.search(r"\.layers\.(\d+)\.", n)) else 0 for n in self.names]
        out = torch.zeros(max(index) + 1, values.shape[1])
        for i, row in zip(index, values):
            out[i] = torch.maximum(out[i], row)
        return out

    def per_layer(self) -> torch.Tensor:
        """(n_layers, hidden): the largest magnitude of each feature over the inputs of each decoder
        layer (names containing ``.layers.<i>.``), layers in order."""
        return self._by_layer(self.absmax)

    def layer_share(self) -> torch.Tensor:
        """(hidden,) fraction of decoder layers in which each feature reaches the threshold."""
        return (self._by_layer(self.absmax) >= self.threshold).float().mean(0)

    def mean_position_share(self) -> torch.Tensor:
        """(hidden,) fraction of positions at which a feature reaches the threshold, averaged over the
        layers where it does so at all (0 for features that never do)."""
        share = self._by_layer(self.position_share)
        present = share > 0
        return (share * present).sum(0) / present.sum(0).clamp(min=1)

    def systematic(self, min_layer_share: float = 0.25, min_position_share: float = 0.06) -> torch.Tensor:
        """Features that are outliers by LLM.int8's definition: reaching the threshold in at least 25 % of
        the layers and at least 6 % of the positions."""
        keep = (self.layer_share() >= min_layer_share) & (self.mean_position_share() >= min_position_share)
        return torch.nonzero(keep).flatten()


@torch.inference_mode()
def measure_outliers(model: nn.Module, input_ids: torch.Tensor, threshold: float = DEFAULT_THRESHOLD) -> OutlierStats:
    """Run ``model`` on ``input_ids`` (batch, seq) and record, for every Linear whose input has the
    model's hidden width, each input feature's largest |activation| and the share of positions where it
    reaches ``threshold`` (:class:`~course_utils.quant.activations.InputStats`). Linears that read the
    very same tensor (q/k/v, gate/up) are counted once, under the first one's name."""
    check_threshold(threshold)
    hidden = model.config.hidden_size
    last: list = [None]  # the input tensor seen last: q/k/v (and gate/up) read the same tensor in a row
    stats: dict[str, InputStats] = {}
    handles = []

    def hook(name):
        def fn(module, args):
            if args[0] is last[0]:
                return
            last[0] = args[0]
            stats.setdefault(name, InputStats(hidden, args[0].device, threshold=threshold)).add(args[0])
        return fn

    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and m.in_features == hidden and "lm_head" not in name:
            handles.append(m.register_forward_pre_hook(hook(name)))
    try:
        model(input_ids=input_ids.to(next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    last[0] = None
    absmax = torch.stack([s.absmax for s in stats.values()]).cpu()
    return OutlierStats(absmax, tuple(stats), torch.stack([s.share_over for s in stats.values()]).cpu(), threshold)
