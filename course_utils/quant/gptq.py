"""GPTQ (Frantar et al., 2022): quantize a weight column by column and let the remaining columns absorb
each rounding error, weighted by how the layer's inputs correlate.

(About 400 lines, a quarter of them this docstring: the algorithm's steps are written out here once, as the
reference lesson 07 and lab 07 point to; the code below follows them step by step.)

For a Linear with weight ``W`` (out, in) and calibration inputs ``X`` (n tokens, in), GPTQ looks for
codes whose dequantized weight ``Q`` keeps the *outputs* close: it minimises ``||(W - Q) X^T||^2``.
That error only depends on the inputs through the Hessian ``H = 2 X^T X / n`` (in, in):
``||(W - Q) X^T||^2 / n = 1/2 tr((W - Q) H (W - Q)^T)``, the ``loss`` reported here. Each row of
``W`` is an independent problem with the same ``H``, so all rows are handled at once:

1. *dead features*: an input feature that is always 0 in the calibration data has ``H_ii = 0``; its
   weights cannot matter to the loss, so they are set to 0 and ``H_ii`` to 1 (a warning says so:
   those features may be active on other text);
2. *dampening*: ``lambda = damp * mean(diag H)`` is added to the diagonal so that ``H`` can be inverted
   (``damp = 0.01`` by default). If the Cholesky factorisation still fails, ``damp`` is raised tenfold
   until it succeeds, with a warning: the result never holds a NaN;
3. *inverse Hessian*: GPTQ needs, for each column ``j``, the inverse Hessian of the columns not yet
   quantized. All of them are rows of ``U``, the upper Cholesky factor of ``H^-1``;
4. *the loop*: column ``j`` is rounded to the grid, ``q_j``; its error ``e = (w_j - q_j) / U_jj`` is
   spread over the columns to its right: ``w_k -= e * U_jk`` for ``k > j``. Those columns then round
   with the error already compensated (error feedback);
5. *lazy batches*: the update of step 4 is applied at once only inside a block of ``block_size``
   columns; the columns to the right of the block get the block's accumulated errors in one matrix
   product ``W[:, right] -= E @ U[block, right]`` (same result, far fewer memory passes);
6. *groups*: with ``group_size`` columns per group, a group's scale (and zero point) is computed when
   its first column comes up, from the *current* weights of the group (already updated by the errors
   of the previous columns). Blocks are aligned with groups (:func:`aligned_block_size`) so that this
   current weight is always at hand.

*Act-order* (``act_order=True``) quantizes the columns by decreasing ``H_jj`` (the inputs with the
most energy first), while the columns that are left can still absorb errors. Here it uses *static
groups*: groups stay contiguous in the original column order and their scales are computed from the
(dead-feature-cleaned) ``W`` before the loop, so that a column's group is simply ``column //
group_size`` whatever the order. The result therefore stores exactly like round-to-nearest
(:class:`~course_utils.quant.rtn.QuantizedTensor`, held by :class:`~course_utils.quant.linear.QuantLinear`),
and ``g_idx`` is ``arange(in) // group_size``. (The other variant, a column's group being its position
in the permuted order, needs a ``g_idx`` gather at every dequantization; GPTQModel calls our choice
``static_groups`` and the exllama/Marlin kernels prefer it.) :func:`dequantize` is the general,
``g_idx``-based dequantization, for checking.

Scales are rounded to float16 as soon as they are computed, because ``QuantLinear`` stores them in
float16: the error feedback then works with exactly the weights the quantized model computes with.

:func:`quantize_model` runs this on every Linear of a decoder-only model, layer by layer: the
inputs of each decoder layer come from the already quantized layers before it, and inside a layer
(*true sequential*) each group of Linears reading the same input (q/k/v, then o, then gate/up, then
down) is quantized before the next group's inputs are recorded. The Linears of a group share one Hessian, so
:func:`gptq_quantize_weights` factorises it once and runs one column loop over their rows stacked. The layer-by-layer plumbing (capturing a
layer's inputs, running it, recording a Linear's inputs) lives in :mod:`course_utils.quant.layerwise`.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from course_utils import hardware
from course_utils.models import model_bytes
from course_utils.quant import rtn
from course_utils.quant.activations import InputStats
from course_utils.quant.contract import Report, check_finite, replace_linears
from course_utils.quant.layerwise import check_calibration, check_group_size, check_model, each_layer, linear_groups, record_inputs
from course_utils.quant.linear import QuantLinear

MAX_DAMP_INCREASES = 8  # damp x 10**8 at most: far more than a positive semi-definite H ever needs


# ------------------------------------------------------------------------------ one weight matrix


@dataclass(frozen=True)
class GPTQResult:
    """What :func:`gptq_quantize_weight` chose for one weight matrix.

    ``quantized``: codes, scales and zero points (a ``QuantizedTensor``: ``QuantLinear(quantized,
    bias)`` holds it). ``g_idx``: (in,) the group of each input column. ``perm``: (in,) the order in
    which the columns were quantized (``arange`` without act-order). ``damp``: the relative dampening
    actually used. ``loss``: ``1/2 tr((W - Q) H (W - Q)^T)`` with the given ``H``, i.e. the mean over the
    calibration tokens of the squared output error ``||(W - Q) x||^2``. ``dead``: input features with
    ``H_ii = 0`` (their weights were set to 0).
    """

    quantized: rtn.QuantizedTensor
    g_idx: torch.Tensor
    perm: torch.Tensor
    damp: float
    loss: float
    dead: int

    def dequantize(self) -> torch.Tensor:
        """The float32 weight (out, in) the quantized layer computes with."""
        q = self.quantized
        return dequantize(q.codes, q.scales, q.zeros, self.g_idx)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, g_idx: torch.Tensor) -> torch.Tensor:
    """Float32 weight (out, in) from codes (out, in), scales and zeros (out, n_groups) and ``g_idx`` (in,):
    column ``j`` uses group ``g_idx[j]``. Works for any grouping, contiguous or not."""
    q = codes.float()
    if zeros is not None:
        q = q - zeros.float()[:, g_idx]
    return q * scales.float()[:, g_idx]


def aligned_block_size(block_size: int, group_size: int) -> int:
    """The lazy-batch block actually used: a multiple of ``group_size`` (groups lie inside one block) or,
    for groups wider than ``block_size``, a divisor of it (each group starts where a block starts).

    Either way, when a group starts, its current weights are in the block's working copy or fully
    updated in ``W``. E.g. ``(128, 64) -> 128``, ``(128, 48) -> 96``, ``(128, 576) -> 96``.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be a positive number of columns, got {block_size!r}")
    if group_size <= block_size:
        return block_size // group_size * group_size
    return max(d for d in range(1, block_size + 1) if group_size % d == 0)


def _float16_scales(scales: torch.Tensor) -> torch.Tensor:
    """``scales`` rounded to the nearest float16 (what ``QuantLinear`` stores), their magnitudes kept
    within float16's range (from its smallest subnormal, 2**-24, to 65504); the sign is kept (the full grid's
    scales can be negative)."""
    sign = torch.where(scales < 0, -1.0, 1.0)
    return sign * scales.abs().to(torch.float16).float().clamp(min=2.0**-24, max=65504.0)


def _grid(w: torch.Tensor, bits: int, group_size: int, symmetric: bool,
          full_grid: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales (out, in // group_size), rounded to float16 values, and zero points (float, or None) that
    round-to-nearest gives ``w`` (out, in) with groups of ``group_size`` columns."""
    q = rtn.quantize(w, bits, group_size, symmetric, full_grid=full_grid)
    return _float16_scales(q.scales), None if q.zeros is None else q.zeros.float()


def inverse_hessian_factor(hessian: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor ``U`` of ``(H + damp * mean(diag H) * I)^-1`` (float64) and the ``damp`` used.

    Row ``j`` of ``U`` holds what GPTQ needs when it quantizes column ``j``: with ``F`` the columns
    ``j..in-1`` not yet quantized, ``U_jk / U_jj = [H_F^-1]_jk / [H_F^-1]_jj`` (how much of column
    ``j``'s error column ``k`` takes) and ``U_jj**2 = [H_F^-1]_jj``. If a factorisation fails, ``damp`` is raised
    tenfold (from 1e-6 when it was 0) with a warning; an ``H`` that still fails is not a Hessian
    (``ValueError``).
    """
    h = hessian.double()
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    mean_diag = float(h.diagonal().mean())
    tried = damp
    for _ in range(MAX_DAMP_INCREASES + 1):
        lower, info = torch.linalg.cholesky_ex(h + tried * mean_diag * eye)
        if info == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if info == 0 and torch.isfinite(upper).all():
                if tried != damp:
                    warnings.warn(
                        f"Cholesky factorisation failed with damp={damp:g}; used damp={tried:g} "
                        f"(lambda = {tried * mean_diag:.3g}, relative to mean(diag H) = {mean_diag:.3g})",
                        stacklevel=3,
                    )
                return upper, tried
        tried = tried * 10 if tried > 0 else 1e-6
    raise ValueError(
        f"the Hessian could not be factorised even with damp={tried / 10:g}: it is not positive "
        "semi-definite (a Hessian 2 X^T X / n always is; check how it was built)"
    )


def _column_loop(
    W: torch.Tensor, U: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
    order: list[int], g: int, bits: int, act_order: bool, symmetric: bool, block_size: int, full_grid: bool = False,
) -> None:
    """Steps 4-6 of the module docstring, in place: fill ``codes`` (and, without act-order, ``scales`` and
    ``zeros``) column by column in ``order``, spreading each error through ``U``; ``W`` is consumed.

    Written for speed on a CPU: the block is held transposed (a column of ``W`` is a contiguous row), codes
    stay in float until the block ends, and each error update is one ``addr_``. Each tensor operation costs
    microseconds, and a strided column costs several times a contiguous one."""
    cols = W.shape[1]
    low, high = rtn.code_range(bits, symmetric, full_grid)
    S = scales.T.contiguous()  # (n_groups, out): a group's scales are a contiguous row
    Z = None if zeros is None else zeros.T.contiguous()
    for b0 in range(0, cols, block_size):  # 5. lazy batches
        b1 = min(b0 + block_size, cols)
        T = W[:, b0:b1].T.contiguous()  # the block, transposed: T[i] is column b0 + i, updated column by column
        E = torch.zeros_like(T)  # scaled errors of the block's columns (transposed)
        Q = torch.zeros_like(T)  # the block's codes, in float until the block ends (transposed)
        U1 = U[b0:b1, b0:b1]
        diag = U1.diagonal().tolist()
        for i in range(b1 - b0):
            col = order[b0 + i]
            group = col // g
            if not act_order and col % g == 0:  # 6. a new group: its grid from the current weights
                # inside this block, or (a group wider than the block starts with it) fully updated in W
                current = T[i : i + g].T if i + g <= b1 - b0 else W[:, b0 : b0 + g]
                s, z = _grid(current, bits, g, symmetric, full_grid)
                S[group] = s[:, 0]
                if Z is not None:
                    Z[group] = z[:, 0]
            s, w, q, err = S[group], T[i], Q[i], E[i]
            # 4. round the column (as rtn.quantize does), then spread its error over the columns to its right
            torch.div(w, s, out=q).round_()
            if Z is None:
                q.clamp_(low, high)
                torch.mul(q, s, out=err)
            else:
                z = Z[group]
                q.add_(z).clamp_(low, high)
                torch.mul(q - z, s, out=err)
            torch.sub(w, err, out=err).div_(diag[i])
            T[i:].addr_(U1[i, i:], err, alpha=-1)
        codes[:, order[b0:b1]] = Q.T.to(torch.int16)
        W[:, b1:] -= E.T @ U[b0:b1, b1:]
    scales.copy_(S.T)
    if zeros is not None:
        zeros.copy_(Z.T)


def gptq_quantize_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int = 4,
    group_size: int | str = 64,
    symmetric: bool = True,
    act_order: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    full_grid: bool = False,
) -> GPTQResult:
    """GPTQ codes for ``weight`` (out, in) given the Hessian (in, in) of its inputs (see the module docstring).

    ``group_size``: columns per group (must divide ``in``) or "channel" (one group per row).
    ``symmetric``: absmax grid (codes in ``[-(2**(b-1)-1), 2**(b-1)-1]``) or zero-point grid (``0..2**b-1``),
    as :func:`rtn.quantize`. ``act_order``: quantize columns by decreasing ``H_jj``, with static groups.
    ``damp``: dampening relative to ``mean(diag H)``. ``block_size``: columns per lazy batch.
    ``full_grid``: symmetric codes on all 2**bits levels (``-2**(b-1)..2**(b-1)-1``, see :mod:`rtn`).
    """
    return gptq_quantize_weights([weight], hessian, bits, group_size, symmetric, act_order, damp, block_size, full_grid)[0]


def gptq_quantize_weights(
    weights: list[torch.Tensor],
    hessian: torch.Tensor,
    bits: int = 4,
    group_size: int | str = 64,
    symmetric: bool = True,
    act_order: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    full_grid: bool = False,
) -> list[GPTQResult]:
    """:func:`gptq_quantize_weight` for several weights (out_i, in) that read the same inputs, so share one
    Hessian (q/k/v; gate/up): one factorisation and one column loop over their rows stacked, since every
    row is its own problem with the same ``H``. Each result equals what that weight gets alone (bit for bit on
the CPU, tested; on a GPU, up to the rounding of differently blocked matrix products)."""
    rtn.check_bits(bits)
    rtn.check_grid(symmetric, full_grid)
    for weight in weights:
        if weight.dim() != 2:
            raise ValueError(f"expected a 2-D weight (out_features, in_features), got shape {tuple(weight.shape)}")
        check_finite(weight, "the weight")
    cols = weights[0].shape[1]
    if any(w.shape[1] != cols for w in weights):
        raise ValueError(f"weights that share a Hessian must have the same in_features, got {[tuple(w.shape) for w in weights]}")
    g = check_group_size(group_size, cols, "GPTQ")
    if tuple(hessian.shape) != (cols, cols):
        raise ValueError(f"the Hessian must be (in, in) = ({cols}, {cols}) for this weight, got {tuple(hessian.shape)}")
    check_finite(hessian, "the Hessian")
    if not damp >= 0:
        raise ValueError(f"damp must be >= 0 (a fraction of mean(diag H), 0.01 is usual), got {damp!r}")
    block_size = aligned_block_size(block_size, g)
    stacked = torch.cat([w.detach().float() for w in weights])
    result, row_losses = _gptq(stacked, hessian, bits, g, symmetric, act_order, damp, block_size, full_grid)
    return _split_rows(result, row_losses, [w.shape[0] for w in weights])


def _split_rows(result: GPTQResult, row_losses: torch.Tensor, rows: list[int]) -> list[GPTQResult]:
    """One :class:`GPTQResult` per block of ``rows`` of a stacked result (``row_losses``: (out,) each
    row's share of the loss)."""
    q, parts, start = result.quantized, [], 0
    for n in rows:
        take = slice(start, start + n)
        part = rtn.QuantizedTensor(q.codes[take].contiguous(), q.scales[take].contiguous(),
                                   None if q.zeros is None else q.zeros[take].contiguous(), q.bits, q.group_size, q.symmetric)
        parts.append(GPTQResult(part, result.g_idx, result.perm, result.damp, float(row_losses[take].sum()), result.dead))
        start += n
    return parts


def _gptq(
    weight: torch.Tensor, hessian: torch.Tensor, bits: int, g: int, symmetric: bool, act_order: bool,
    damp: float, block_size: int, full_grid: bool = False,
) -> tuple[GPTQResult, torch.Tensor]:
    """The body of :func:`gptq_quantize_weights`, after its checks (``g``: resolved group size), on the
    stacked float32 ``weight``; also returns each row's share of the loss, (out,)."""
    out, cols = weight.shape
    W = weight.clone()
    H = hessian.detach().to(W.device, torch.float64).clone()

    # 1. dead input features: never active in the calibration data
    dead = H.diagonal() == 0
    if dead.any():
        warnings.warn(
            f"{int(dead.sum())} input feature(s) are 0 on every calibration token; their weights are set "
            "to 0 (more or other calibration text may activate them)",
            stacklevel=4,
        )
        H[dead, dead] = 1.0
        W[:, dead] = 0.0

    # act-order: highest-energy inputs first; static groups: every scale computed now, from W
    perm = torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else torch.arange(cols, device=W.device)
    n_groups = cols // g
    scales = torch.zeros(out, n_groups, device=W.device)
    zeros = None if symmetric else torch.zeros(out, n_groups, device=W.device)
    if act_order:
        scales, zeros = _grid(W, bits, g, symmetric, full_grid)
        W, H = W[:, perm], H[perm][:, perm]

    # 2.-3. dampening and the Cholesky factor of the inverse Hessian (a few large operations: all threads)
    U, damp_used = inverse_hessian_factor(H, damp)
    U = U.float()

    codes = torch.zeros(out, cols, dtype=torch.int16, device=W.device)
    order = perm.tolist()  # order[p]: the original column quantized at position p
    with hardware.one_cpu_thread(W.device):  # thousands of small operations: see its docstring
        _column_loop(W, U, codes, scales, zeros, order, g, bits, act_order, symmetric, block_size, full_grid)

    quantized = rtn.QuantizedTensor(
        codes, scales.contiguous(), None if zeros is None else zeros.to(torch.int16).contiguous(), bits, g, symmetric
    )
    delta = weight - quantized.dequantize()
    row_losses = 0.5 * ((delta @ hessian.to(delta.device, torch.float32)) * delta).sum(dim=1)
    g_idx = torch.arange(cols, device=W.device) // g
    return GPTQResult(quantized, g_idx, perm, damp_used, float(row_losses.sum()), int(dead.sum())), row_losses


# ------------------------------------------------------------------------------ a whole model


@dataclass(frozen=True)
class GPTQConfig:
    """How GPTQ quantizes each Linear: ``bits`` (2-8), ``group_size`` (int or "channel"), ``symmetric``
    (absmax) or zero-point, ``act_order`` (static groups), ``damp`` (relative dampening),
    ``block_size`` (lazy-batch columns), ``true_sequential`` (record each group of Linears' inputs after
    the previous groups of the same decoder layer are quantized), ``full_grid`` (symmetric codes on all
    2**bits levels, -8..7 for 4 bits, as llama.cpp's Q4_0)."""

    method: ClassVar[str] = "gptq"
    needs_calibration: ClassVar[bool] = True

    bits: int = 4
    group_size: int | str = 64
    symmetric: bool = True
    act_order: bool = False
    damp: float = 0.01
    block_size: int = 128
    true_sequential: bool = True
    full_grid: bool = False

    def __post_init__(self):
        rtn.check_bits(self.bits)
        rtn.check_grid(self.symmetric, self.full_grid)
        if self.group_size == "tensor":
            raise ValueError("GPTQ quantizes per group or per channel ('channel'), not with one scale per tensor")

    def label(self) -> str:
        """Short name such as ``gptq int4 g64 sym act-order``."""
        g = self.group_size if isinstance(self.group_size, str) else f"g{self.group_size}"
        grid = "sym full" if self.full_grid else "sym" if self.symmetric else "asym"
        return f"gptq int{self.bits} {g} {grid}{' act-order' if self.act_order else ''}"


@dataclass(frozen=True)
class GPTQReport(Report):
    """:class:`~course_utils.quant.contract.Report` plus ``losses`` and ``damp`` (as used) per Linear name;
    ``notes`` tell of raised dampening and dead input features."""

    losses: dict[str, float]
    damp: dict[str, float]


def _check_calibration(calibration: torch.Tensor, widest: int) -> None:
    check_calibration(calibration, widest, f"the widest Linear input ({widest} features): the Hessian would be singular")


def _hessians(layer: nn.Module, readers: list[nn.Module], inputs: list[tuple[torch.Tensor, dict]]) -> list[InputStats]:
    """Input statistics with the Hessian of each of ``readers`` (in running order), over all calibration
    sub-batches; each forward pass stops at the last reader."""
    stats = [InputStats(m.in_features, m.weight.device, gram=True) for m in readers]
    record_inputs(layer, readers, inputs, [s.add for s in stats])
    return stats


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    config: GPTQConfig = GPTQConfig(),
    calibration: torch.Tensor | None = None,
    progress: bool = True,
    batch_size: int = 8,
) -> GPTQReport:
    """Quantize every Linear of the decoder layers of ``model`` with GPTQ, in place, layer by layer.

    ``calibration``: (n_samples, seq_len) token ids (:func:`course_utils.data.calibration_batches`),
    run through the model in sub-batches of ``batch_size`` samples. Each decoder layer sees the outputs
    of the already quantized layers before it; after quantization it runs once more, quantized, to
    produce the next layer's inputs. Embeddings, norms and the output head stay in float. Works on the
    model's device. Returns a :class:`GPTQReport`; warns about raised dampening and dead features.
    """
    _, layers = check_model(model, config.bits, config.group_size, "GPTQ", "gptq.quantize_model")
    _check_calibration(calibration, max(m.in_features for m in layers.modules() if type(m) is nn.Linear))

    before, start = model_bytes(model), time.perf_counter()
    losses, damps, notes, stages = {}, {}, [], None
    for _, where, layer, inputs in each_layer(model, calibration, batch_size, config.label(), progress, "gptq.quantize_model"):
        if stages is None:  # true sequential: one group at a time, each recorded after the previous ones are quantized
            groups = linear_groups(layer, *inputs[0])
            stages = [[group] for group in groups] if config.true_sequential else [groups]
        modules = dict(layer.named_modules())
        for stage in stages:
            results = {}
            for group, stats in zip(stage, _hessians(layer, [modules[group[0]] for group in stage], inputs)):
                linears = [modules[name] for name in group]
                shared = gptq_quantize_weights(
                    [linear.weight for linear in linears], stats.hessian, config.bits, config.group_size,
                    config.symmetric, config.act_order, config.damp, config.block_size, config.full_grid,
                )
                for name, linear, result in zip(group, linears, shared):
                    results[linear] = result
                    full = f"{where}.{name}"
                    losses[full], damps[full] = result.loss, result.damp
                    if result.damp != config.damp:
                        notes.append(f"{full}: damping raised from {config.damp:g} to {result.damp:g}")
                    if result.dead:
                        notes.append(f"{full}: {result.dead} dead input feature(s), weights set to 0")
            replace_linears(layer, lambda lin: QuantLinear(results[lin].quantized, lin.bias, dtype=lin.weight.dtype),
                            only=[name for group in stage for name in group])
    return GPTQReport(config, len(losses), calibration.numel(), time.perf_counter() - start, before, model_bytes(model),
                      tuple(notes), losses, damps)
