"""What each Linear layer's inputs look like on calibration text: per input column statistics.

Several methods weigh a weight's rounding error by how strongly its input column is driven:
llama.cpp's importance matrix (the mean squared activation per column), AWQ (the mean magnitude),
GPTQ (the full second moment ``X^T X``, whose diagonal is the mean square again). This module runs
the calibration batches through the model once, with forward hooks on the chosen Linear layers.
"""

from __future__ import annotations

import torch
from torch import nn

from course_utils.quant.linear import linear_layers


@torch.inference_mode()
def input_statistics(
    model: nn.Module,
    calibration: torch.Tensor,
    names: list[str] | None = None,
    batch_size: int = 4,
) -> dict[str, dict[str, torch.Tensor]]:
    """Per Linear layer (every plain Linear but ``lm_head``, or ``names``), per input column, over all
    calibration tokens: ``{"mean_square": E[x^2], "mean_abs": E[|x|], "n_tokens": n}`` (float32, CPU).

    ``calibration``: (n_samples, seq_len) token ids, e.g. from ``course_utils.data.calibration_batches``.
    """
    layers = linear_layers(model)
    if names is not None:
        missing = [n for n in names if n not in layers]
        if missing:
            raise ValueError(f"not plain Linear layers of this model: {missing}")
        layers = {n: layers[n] for n in names}
    sums: dict[str, list] = {n: [0.0, 0.0, 0] for n in layers}

    def hook(name: str):
        def record(_module, args, _output):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            acc = sums[name]
            acc[0] = acc[0] + x.square().sum(0)
            acc[1] = acc[1] + x.abs().sum(0)
            acc[2] += x.shape[0]

        return record

    handles = [layer.register_forward_hook(hook(n)) for n, layer in layers.items()]
    device = next(model.parameters()).device
    try:
        for i in range(0, calibration.shape[0], batch_size):
            model(input_ids=calibration[i : i + batch_size].to(device))
    finally:
        for h in handles:
            h.remove()
    return {
        n: {"mean_square": (sq / count).cpu(), "mean_abs": (ab / count).cpu(), "n_tokens": torch.tensor(count)}
        for n, (sq, ab, count) in sums.items()
    }
