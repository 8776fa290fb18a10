"""Run a decoder-only model one decoder layer at a time: the plumbing GPTQ and AWQ share.

Both methods quantize a model layer by layer on calibration text. For each decoder layer they need the
hidden states that enter it (produced by the layers before it, already quantized), the keyword arguments
the model passes it (rotary embeddings, attention mask, positions), the order in which its Linears run,
and the inputs of some of those Linears. This module provides exactly that:

- :func:`decoder_layers`: the model's list of decoder layers (``model.model.layers``);
- :func:`layer_inputs`: run the model on calibration token ids and stop at a layer, keeping what enters it;
- :func:`run_layer`: run one layer on such an input (its output feeds the next layer);
- :func:`linear_groups`: the layer's Linears in running order, grouped by shared input (q/k/v, gate/up);
- :func:`record_inputs`: hand every input some Linears receive to callbacks, stopping the layer early;
- :func:`check_calibration`: refuse calibration data that is not token ids or is too short;
- :func:`check_model`: refuse a model that GPTQ or AWQ cannot quantize, before any work;
- :func:`each_layer`: the loop both drivers share: each decoder layer with its inputs, the next layer's
  inputs computed from the layer once the caller has quantized it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from course_utils.quant import rtn
from course_utils.quant.contract import check_finite, check_not_quantized


class StopForward(Exception):
    """Raised by a hook once it has what it needs, to skip the rest of a forward pass."""


def stop(module: nn.Module, args) -> None:
    """A forward pre-hook that ends the forward pass (raises :class:`StopForward`)."""
    raise StopForward


def decoder_layers(model: nn.Module, caller: str = "this quantizer") -> tuple[str, nn.ModuleList]:
    """``("model.layers", model.model.layers)``, or ``ValueError`` naming ``caller`` if the model has none."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(
            f"{caller} expects a decoder-only model whose blocks are model.model.layers "
            f"(Llama, Mistral, Qwen, SmolLM...); {type(model).__name__} has none"
        )
    return "model.layers", layers


def layer_inputs(model: nn.Module, layer: nn.Module, calibration: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, dict]]:
    """Run ``model`` on ``calibration`` in sub-batches, stopping at ``layer``: its (hidden state, keyword
    arguments) per sub-batch (the keyword arguments carry rotary embeddings, mask and positions)."""
    device = next(model.parameters()).device
    captured = []

    def grab(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, kwargs))
        raise StopForward

    handle = layer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for ids in calibration.split(batch_size):
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except StopForward:
                pass
    finally:
        handle.remove()
    return captured


def run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """The hidden state ``layer`` outputs for ``hidden`` (whatever the layer returns around it)."""
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def linear_groups(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> list[list[str]]:
    """Names of the Linears of ``layer`` (relative to it) in the order they run, grouped by shared input.

    Linears called one after the other on the very same tensor (q/k/v, gate/up) form a group: for a
    Llama layer ``[[q, k, v], [o], [gate, up], [down]]``. Found by running the layer once on ``hidden``.
    """
    names = {m: n for n, m in layer.named_modules() if type(m) is nn.Linear}
    calls: list[tuple[str, torch.Tensor]] = []
    handles = [m.register_forward_pre_hook(lambda m, args: calls.append((names[m], args[0]))) for m in names]
    try:
        run_layer(layer, hidden, kwargs)
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    for k, (name, x) in enumerate(calls):
        if k and x is calls[k - 1][1]:
            groups[-1].append(name)
        else:
            groups.append([name])
    missing = set(names.values()) - {n for n, _ in calls}
    if missing:
        raise ValueError(f"these Linear layers never ran in a forward pass, their inputs cannot be recorded: {sorted(missing)}")
    return groups


def record_inputs(
    layer: nn.Module,
    readers: list[nn.Module],
    inputs: list[tuple[torch.Tensor, dict]],
    callbacks: list[Callable[[torch.Tensor], None]],
) -> None:
    """Run ``layer`` on every captured input and call ``callbacks[i](x)`` with each input ``x`` that
    ``readers[i]`` receives; each forward pass stops at the last reader (readers in running order)."""
    handles = [m.register_forward_pre_hook(lambda module, args, f=f: f(args[0])) for m, f in zip(readers, callbacks)]
    handles.append(readers[-1].register_forward_pre_hook(stop))
    try:
        for hidden, kwargs in inputs:
            try:
                run_layer(layer, hidden, kwargs)
            except StopForward:
                pass
    finally:
        for h in handles:
            h.remove()


def check_calibration(calibration: torch.Tensor, minimum: int, why: str) -> None:
    """``ValueError`` unless ``calibration`` is a (n_samples, seq_len) tensor of token ids holding at
    least ``minimum`` tokens; ``why`` completes the message "fewer than ...: <why>"."""
    if not isinstance(calibration, torch.Tensor) or calibration.dim() != 2 or calibration.is_floating_point():
        raise ValueError("calibration must be a (n_samples, seq_len) tensor of token ids, e.g. data.calibration_batches(tokenizer)")
    if calibration.numel() < minimum:
        raise ValueError(
            f"calibration holds {calibration.numel()} tokens ({calibration.shape[0]} x {calibration.shape[1]}), fewer than "
            f"{why}. Use more, e.g. 32 x 512 (data.calibration_batches(tokenizer, 32, 512))"
        )


def check_group_size(group_size: rtn.Granularity, in_features: int, method: str) -> int:
    """Columns per group for ``method`` (GPTQ, AWQ): :func:`rtn.resolve_group_size`, refusing "tensor"."""
    if group_size == "tensor":
        raise ValueError(f"{method} quantizes per group or per channel ('channel'), not with one scale per tensor")
    return rtn.resolve_group_size(group_size, in_features)


def check_model(model: nn.Module, bits: int, group_size: rtn.Granularity, method: str, caller: str) -> tuple[str, nn.ModuleList]:
    """Refuse, before any work, a model ``method`` cannot quantize layer by layer: already quantized, no
    decoder layers, ``bits`` out of range, a group size that does not fit one of its Linears, or a Linear
    weight holding NaN or inf (named, with the index of its first bad value).
    Returns :func:`decoder_layers`."""
    check_not_quantized(model)
    prefix, layers = decoder_layers(model, caller)
    rtn.check_bits(bits)
    for name, m in layers.named_modules(prefix=prefix):
        if type(m) is nn.Linear:
            check_group_size(group_size, m.in_features, method)
            check_finite(m.weight, f"{name}.weight")
    return prefix, layers


def each_layer(
    model: nn.Module, calibration: torch.Tensor, batch_size: int, desc: str, progress: bool, caller: str,
) -> Iterator[tuple[int, str, nn.Module, list[tuple[torch.Tensor, dict]]]]:
    """``(index, name, layer, inputs)`` for each decoder layer, in order: ``inputs`` are what enters the
    layer on ``calibration`` (see :func:`layer_inputs`), produced by the layers before it *as the caller
    left them* (quantized). When the caller asks for the next layer, this one is run on its inputs to make
    the next one's. A tqdm bar labelled ``desc`` shows the progress if ``progress``."""
    from tqdm.auto import tqdm

    prefix, layers = decoder_layers(model, caller)
    inputs = layer_inputs(model, layers[0], calibration, batch_size)
    for index, layer in enumerate(tqdm(layers, desc=desc, disable=not progress)):
        yield index, f"{prefix}.{index}", layer, inputs
        inputs = [(run_layer(layer, hidden, kwargs), kwargs) for hidden, kwargs in inputs]
