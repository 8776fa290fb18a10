"""What a Linear layer's inputs look like on calibration text: the one place input statistics are gathered.

Several methods weigh a weight's rounding error by how strongly its input column is driven: llama.cpp's
importance matrix (the mean squared activation per column), AWQ (the mean magnitude and the Gram matrix
``X^T X / n``), GPTQ (the Hessian ``2 X^T X / n``, whose diagonal is twice the mean square), LLM.int8
(the largest magnitude per column, and how often it passes the outlier threshold). :class:`InputStats`
keeps all of them as running sums over batches of inputs ``x`` (..., in); :func:`capture_inputs` records
what given modules receive; :func:`input_statistics` runs calibration text through a model once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from course_utils.quant.contract import check_finite, linear_layers


class InputStats:
    """Running statistics of inputs ``x`` (..., in) over ``n_tokens`` tokens (rows), float32.

    Per input column: ``mean_abs`` E|x_j|, ``mean_square`` E[x_j^2], ``absmax`` max|x_j| and, with a
    ``threshold``, ``share_over`` (the fraction of tokens where |x_j| >= threshold). With ``gram=True``
    also the (in, in) matrices ``gram`` = X^T X / n (AWQ) and ``hessian`` = 2 X^T X / n (GPTQ), kept as a
    running mean so that adding a batch costs one matrix product. Batches holding NaN or inf are refused.
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None, gram: bool = False,
                 threshold: float | None = None):
        self.n_tokens = 0
        self.threshold = threshold
        zeros = lambda: torch.zeros(in_features, dtype=torch.float32, device=device)  # noqa: E731
        self._abs, self._square, self._absmax, self._over = zeros(), zeros(), zeros(), zeros()
        self._hessian = torch.zeros(in_features, in_features, dtype=torch.float32, device=device) if gram else None

    @classmethod
    def from_inputs(cls, x: torch.Tensor, gram: bool = True) -> InputStats:
        """Statistics of one batch of inputs (..., in)."""
        stats = cls(x.shape[-1], x.device, gram=gram)
        stats.add(x)
        return stats

    def add(self, x: torch.Tensor) -> None:
        """Fold a batch of inputs (..., in) into the statistics."""
        x = x.detach().reshape(-1, self._abs.shape[0]).to(self._abs.device, torch.float32)
        check_finite(x, "a batch of layer inputs")
        total = self.n_tokens + x.shape[0]
        if self._hessian is not None:  # H_new = n/total * H_old + 2/total * x^T x
            self._hessian.addmm_(x.T, x, beta=self.n_tokens / total, alpha=2.0 / total)
        magnitude = x.abs()
        self._abs += magnitude.sum(0)
        self._square += x.square().sum(0)
        self._absmax = torch.maximum(self._absmax, magnitude.amax(0))
        if self.threshold is not None:
            self._over += (magnitude >= self.threshold).float().sum(0)
        self.n_tokens = total

    def attach(self, module: nn.Module) -> torch.utils.hooks.RemovableHandle:
        """Add every input ``module`` receives from now on; call ``.remove()`` on the handle to stop."""
        return module.register_forward_pre_hook(lambda m, args: self.add(args[0]))

    @property
    def mean_abs(self) -> torch.Tensor:
        return self._abs / max(self.n_tokens, 1)

    @property
    def mean_square(self) -> torch.Tensor:
        return self._square / max(self.n_tokens, 1)

    @property
    def absmax(self) -> torch.Tensor:
        return self._absmax

    @property
    def share_over(self) -> torch.Tensor:
        if self.threshold is None:
            raise ValueError("share_over needs InputStats(..., threshold=...) set before the inputs were added")
        return self._over / max(self.n_tokens, 1)

    @property
    def hessian(self) -> torch.Tensor:
        if self._hessian is None:
            raise ValueError("the Hessian needs InputStats(..., gram=True) set before the inputs were added")
        return self._hessian

    @property
    def gram(self) -> torch.Tensor:
        return self.hessian / 2

    def to(self, device: torch.device | str) -> InputStats:
        """The same statistics held on ``device`` (e.g. gathered on a GPU, read on the CPU)."""
        out = InputStats(self._abs.shape[0], device, gram=False, threshold=self.threshold)
        out.n_tokens = self.n_tokens
        out._abs, out._square, out._absmax, out._over = (t.to(device) for t in (self._abs, self._square, self._absmax, self._over))
        out._hessian = None if self._hessian is None else self._hessian.to(device)
        return out

    def scaled(self, column: torch.Tensor) -> InputStats:
        """The statistics of the inputs ``x / column`` (what a Linear reads once AWQ folded its scales)."""
        column = column.to(self._abs.device, torch.float32)
        out = InputStats(column.shape[0], column.device, gram=False, threshold=None)
        out.n_tokens = self.n_tokens
        out._abs, out._square, out._absmax = self._abs / column, self._square / column.square(), self._absmax / column
        if self._hessian is not None:
            out._hessian = self._hessian / column.unsqueeze(0) / column.unsqueeze(1)
        return out


@contextlib.contextmanager
def capture_inputs(*modules: nn.Module) -> Iterator[list[list[torch.Tensor]]]:
    """Record the first positional input of each of ``modules`` while the ``with`` block runs.

    Yields one list per module; each forward call appends its input, detached and flattened to
    (tokens, in). The hooks are removed when the block ends, even after an error::

        with capture_inputs(layer.mlp.down_proj) as (seen,):
            model(input_ids=ids)
        X = torch.cat(seen)   # (tokens, in_features)
    """
    seen: list[list[torch.Tensor]] = [[] for _ in modules]
    handles = [m.register_forward_pre_hook(lambda _m, args, out=out: out.append(args[0].detach().reshape(-1, args[0].shape[-1])))
               for m, out in zip(modules, seen)]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


@torch.inference_mode()
def run_batches(model: nn.Module, token_ids: torch.Tensor, batch_size: int = 4) -> None:
    """Run ``model`` on ``token_ids`` (n_samples, seq_len) in sub-batches of ``batch_size`` rows, for its hooks."""
    device = next(model.parameters()).device
    for rows in token_ids.split(batch_size):
        model(input_ids=rows.to(device))


def input_statistics(
    model: nn.Module,
    calibration: torch.Tensor,
    names: list[str] | None = None,
    batch_size: int = 4,
) -> dict[str, InputStats]:
    """:class:`InputStats` (no Gram matrix) of every plain Linear but ``lm_head`` (or of ``names``) over
    the calibration tokens (n_samples, seq_len), e.g. from ``course_utils.data.calibration_batches``;
    gathered on the model's device, returned on the CPU."""
    layers = linear_layers(model)
    if names is not None:
        missing = [n for n in names if n not in layers]
        if missing:
            raise ValueError(f"not plain Linear layers of this model: {missing}")
        layers = {n: layers[n] for n in names}
    device = next(model.parameters()).device
    stats = {n: InputStats(layer.in_features, device) for n, layer in layers.items()}
    handles = [stats[n].attach(layer) for n, layer in layers.items()]
    try:
        run_batches(model, calibration, batch_size)
    finally:
        for h in handles:
            h.remove()
    return {n: s.to("cpu") for n, s in stats.items()}  # reduced on the model's device, read on the CPU
