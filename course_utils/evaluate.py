"""Judge a model's quality: perplexity on identical tokens, KL divergence and top-1 agreement to a reference.

All functions take :class:`course_utils.data.TokenWindows`, so every model is scored on exactly the
same tokens (compare ``windows.fingerprint()``). A "model" is anything callable as
``model(input_ids=...)`` that returns an object with ``.logits`` of shape (batch, seq, vocab).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from course_utils.data import TokenWindows


def _device_of(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def _batches(windows: TokenWindows, batch_size: int):
    for i in range(0, windows.input_ids.shape[0], batch_size):
        yield windows.input_ids[i : i + batch_size], windows.labels[i : i + batch_size]


def _log_probs(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Float32 log-probabilities of the next token: (batch, seq-1, vocab)."""
    logits = model(input_ids=input_ids.to(_device_of(model))).logits[:, :-1]
    return F.log_softmax(logits.float(), dim=-1)


@dataclass(frozen=True)
class Perplexity:
    """Perplexity ``exp(mean NLL)`` over ``n_tokens`` scored tokens; ``window_nll`` is the mean NLL per window."""

    value: float
    mean_nll: float
    n_tokens: int
    window_nll: torch.Tensor


@torch.inference_mode()
def perplexity(model, windows: TokenWindows, batch_size: int = 4) -> Perplexity:
    """Perplexity of ``model`` on ``windows`` (each scored token counted once, natural log)."""
    sums, counts = [], []
    for ids, labels in _batches(windows, batch_size):
        logits = model(input_ids=ids.to(_device_of(model))).logits[:, :-1].float()
        target = labels[:, 1:].to(logits.device)
        flat = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100, reduction="none")
        nll = flat.view_as(target)  # (batch, seq-1); the flat layout keeps the vocabulary sum contiguous
        mask = target != -100
        sums.append((nll * mask).sum(dim=1).cpu())
        counts.append(mask.sum(dim=1).cpu())
    total, count = torch.cat(sums), torch.cat(counts)
    mean = float(total.sum() / count.sum())
    return Perplexity(math.exp(mean), mean, int(count.sum()), total / count)


@dataclass(frozen=True)
class Comparison:
    """A candidate model judged against a reference on the same tokens.

    ``kl_mean`` and ``kl_p99``: KL(reference || candidate) per token in nats, mean and 99th percentile.
    ``top1``: fraction of tokens where both models' most likely next token agree.
    ``token_nll``, ``token_ref_nll``, ``token_kl``: the per-token values (n_tokens,), in window order,
    for noise estimates such as :func:`bootstrap_delta_pct`.
    """

    ppl: float
    ref_ppl: float
    kl_mean: float
    kl_p99: float
    top1: float
    n_tokens: int
    token_nll: torch.Tensor = field(repr=False, default=None)
    token_ref_nll: torch.Tensor = field(repr=False, default=None)
    token_kl: torch.Tensor = field(repr=False, default=None)

    @property
    def ppl_delta_pct(self) -> float:
        """Perplexity change relative to the reference, in percent."""
        return 100.0 * (self.ppl / self.ref_ppl - 1.0)


@dataclass(frozen=True)
class Reference:
    """A reference model's next-token log-probabilities on ``windows``, computed once and reused.

    ``log_probs``: one float32 tensor (batch, window-1, vocab) per batch of ``batch_size`` windows. It
    costs windows x window x vocab x 4 bytes (8 x 512 x 49,152 x 4 = 805 MB for the default set), so
    build it for the windows you need, and compare many candidates against it without re-running
    the reference model.
    """

    log_probs: tuple[torch.Tensor, ...]
    fingerprint: str
    batch_size: int


@torch.inference_mode()
def reference_log_probs(reference, windows: TokenWindows, batch_size: int = 4) -> Reference:
    """Run the reference model once over ``windows`` and keep its log-probabilities (on the CPU)."""
    batches = tuple(_log_probs(reference, ids).cpu() for ids, _ in _batches(windows, batch_size))
    return Reference(batches, windows.fingerprint(), batch_size)


@torch.inference_mode()
def compare(model, reference, windows: TokenWindows, batch_size: int = 4) -> Comparison:
    """Perplexity of both models, KL divergence and top-1 agreement, in one pass over ``windows``.

    ``reference`` is a model (run batch by batch beside the candidate, so no full set of logits is
    stored) or a :class:`Reference` computed once on the same windows (checked by fingerprint).
    """
    if isinstance(reference, Reference):
        if reference.fingerprint != windows.fingerprint():
            raise ValueError("the Reference was computed on other windows than these; rebuild it with reference_log_probs")
        batch_size = reference.batch_size
    nll_c, nll_r, kls, agree = [], [], [], []
    for i, (ids, labels) in enumerate(_batches(windows, batch_size)):
        lp_r = reference.log_probs[i] if isinstance(reference, Reference) else _log_probs(reference, ids)
        lp_c = _log_probs(model, ids).to(lp_r.device)
        target = labels[:, 1:].to(lp_r.device)
        mask = target != -100
        safe = target.clamp(min=0).unsqueeze(-1)
        nll_r.append(-lp_r.gather(-1, safe).squeeze(-1)[mask].cpu())
        nll_c.append(-lp_c.gather(-1, safe).squeeze(-1)[mask].cpu())
        kls.append((lp_r.exp() * (lp_r - lp_c)).sum(-1)[mask].cpu())
        agree.append((lp_r.argmax(-1) == lp_c.argmax(-1))[mask].cpu())
    kl = torch.cat(kls).clamp(min=0.0)
    return Comparison(
        ppl=math.exp(float(torch.cat(nll_c).mean())),
        ref_ppl=math.exp(float(torch.cat(nll_r).mean())),
        kl_mean=float(kl.mean()),
        kl_p99=float(torch.quantile(kl, 0.99)),
        top1=float(torch.cat(agree).float().mean()),
        n_tokens=int(kl.numel()),
        token_nll=torch.cat(nll_c),
        token_ref_nll=torch.cat(nll_r),
        token_kl=kl,
    )


def generate_side_by_side(
    models: dict[str, object], tokenizer, prompts: list[str], max_new_tokens: int = 32
) -> list[dict[str, str]]:
    """Greedy continuations of each prompt by each model: one row per prompt, one column per model name."""
    from course_utils.models import chat

    return [
        {"prompt": p, **{name: chat(m, tokenizer, p, max_new_tokens) for name, m in models.items()}}
        for p in prompts
    ]


def _chunk_means(values: torch.Tensor, n_chunks: int) -> torch.Tensor:
    """The mean of each of ``n_chunks`` equal consecutive chunks of ``values`` (n,); a remainder of fewer
    than ``n_chunks`` values at the end is left out."""
    n = values.numel() // n_chunks * n_chunks
    if n == 0:
        raise ValueError(f"{values.numel()} tokens cannot be split into {n_chunks} chunks")
    return values[:n].float().view(n_chunks, -1).mean(1)


def _paired_interval(a: torch.Tensor, b: torch.Tensor, statistic, n_chunks: int, n_boot: int, seed: int) -> tuple[float, float]:
    """95 % interval of ``statistic(mean of a, mean of b)`` over chunk resamples drawn *together* for both."""
    ca, cb = _chunk_means(a, n_chunks), _chunk_means(b, n_chunks)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n_chunks, (n_boot, n_chunks), generator=gen)
    values = statistic(ca[idx].mean(1), cb[idx].mean(1))
    lo, hi = torch.quantile(values, torch.tensor([0.025, 0.975]))
    return float(lo), float(hi)


def _ppl_change_pct(nll_a: torch.Tensor, nll_b: torch.Tensor) -> torch.Tensor:
    return 100.0 * (torch.exp(nll_a - nll_b) - 1.0)


def bootstrap_delta_pct(comparison: Comparison, n_chunks: int = 32, n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95 % interval of the perplexity change (percent) by a paired bootstrap over chunks of text.

    The scored tokens are split into ``n_chunks`` equal consecutive chunks (a remainder of fewer than
    ``n_chunks`` tokens at the end is left out); each resample draws chunks with replacement and
    recomputes *both* perplexities on the same chunks, so the interval reflects how much the change
    depends on which text was used, not how much the two models' perplexities vary.
    """
    return _paired_interval(comparison.token_nll, comparison.token_ref_nll, _ppl_change_pct, n_chunks, n_boot, seed)


def _check_same_tokens(a: Comparison, b: Comparison) -> None:
    if a.n_tokens != b.n_tokens or not torch.equal(a.token_ref_nll, b.token_ref_nll):
        raise ValueError("the two comparisons were not made against the same reference on the same tokens; "
                         "a paired interval needs both candidates scored on one Reference")


def paired_ppl_change(a: Comparison, b: Comparison, n_chunks: int = 32, n_boot: int = 1000,
                      seed: int = 0) -> tuple[float, float, float]:
    """How much higher candidate ``a``'s perplexity is than ``b``'s, in percent, with its 95 % paired-bootstrap
    interval: ``(change, low, high)``. Both must be scored against the same reference on the same tokens;
    an interval that contains 0 means the text does not tell the two apart."""
    _check_same_tokens(a, b)
    change = 100.0 * (a.ppl / b.ppl - 1.0)
    return (change, *_paired_interval(a.token_nll, b.token_nll, _ppl_change_pct, n_chunks, n_boot, seed))


def paired_kl_difference(a: Comparison, b: Comparison, n_chunks: int = 32, n_boot: int = 1000,
                         seed: int = 0) -> tuple[float, float, float]:
    """Mean KL of ``a`` minus mean KL of ``b`` (nats per token) with its 95 % paired-bootstrap interval:
    ``(difference, low, high)``, resampling the same chunks of text for both."""
    _check_same_tokens(a, b)
    return (a.kl_mean - b.kl_mean,
            *_paired_interval(a.token_kl, b.token_kl, lambda x, y: x - y, n_chunks, n_boot, seed))


def share_removed(variant: Comparison, baseline: Comparison) -> float:
    """The share of ``baseline``'s perplexity increase over the float model that ``variant`` removes: 1 when
    it matches the float model, 0 when it is no better than the baseline, negative when it is worse."""
    increase = baseline.ppl - baseline.ref_ppl
    if not increase > 0:
        raise ValueError(f"the baseline's perplexity {baseline.ppl:.4g} is not above the reference's {baseline.ref_ppl:.4g}: "
                         "there is no increase to remove")
    return 1 - (variant.ppl - variant.ref_ppl) / increase


class Scoreboard:
    """Models scored against one float ``reference`` on the same ``windows``, one printed line each.

    :meth:`score` runs :func:`compare` and keeps ``rows[label] = (comparison, seconds)``; the line shows
    perplexity (and its change), mean KL, top-1 agreement and, if given, the quantizer's seconds, with
    labels padded to ``width`` characters so that the lines form a table.
    """

    def __init__(self, reference: Reference, windows: TokenWindows, width: int = 28):
        self.reference, self.windows, self.width = reference, windows, width
        self.rows: dict[str, tuple[Comparison, float | None]] = {}

    def score(self, label: str, model, seconds: float | None = None, show: bool = True) -> Comparison:
        """Compare ``model`` with the reference, keep it under ``label``, print its line (if ``show``)."""
        c = compare(model, self.reference, self.windows)
        self.rows[label] = (c, seconds)
        if show:
            t = "" if seconds is None else f"  {seconds:6.1f} s"
            print(f"{label:{self.width}} ppl {c.ppl:7.2f} ({c.ppl_delta_pct:+6.1f} %)  KL {c.kl_mean:.3f}  top-1 {c.top1:.1%}{t}")
        return c
