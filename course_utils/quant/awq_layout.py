"""Where AWQ's scales go in a Llama decoder layer, and the checks that folding them changes nothing.

AWQ (:mod:`course_utils.quant.awq`) multiplies the input columns of a group of Linears by scales ``s`` and
divides the output of the module before them by ``s``. This module knows the Llama layout (also Mistral,
Qwen2, SmolLM): which Linears read one input and which module produces it (:data:`LLAMA_GROUPS`), how
o_proj's inputs map to v_proj's outputs under grouped-query attention (:func:`attention_expand`), how to
fold scales (:func:`fold_scales`), and how to refuse an architecture where folding would change the float
model (:func:`check_architecture`, :func:`check_groups`, :func:`random_fold`, :func:`fold_check`).
"""

from __future__ import annotations

import torch
from torch import nn

from course_utils.quant.layerwise import linear_groups, run_layer

# The Llama decoder layer (also Mistral, Qwen2, SmolLM): each group of Linears reading one input, the
# module whose output that input is (where 1/s is folded), and the group's label.
LLAMA_GROUPS = (
    ("qkv", "input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("o", "self_attn.v_proj", ("self_attn.o_proj",)),
    ("gate_up", "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("down", "mlp.up_proj", ("mlp.down_proj",)),
)
GROUP_LABELS = tuple(label for label, _, _ in LLAMA_GROUPS)


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


def attention_expand(layer: nn.Module, where: str) -> torch.Tensor:
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


def check_groups(layer: nn.Module, hidden: torch.Tensor, kwargs: dict, where: str) -> None:
    expected = [list(names) for _, _, names in LLAMA_GROUPS]
    found = linear_groups(layer, hidden, kwargs)
    if found != expected:
        raise ValueError(f"{where}: its Linears run as {found}, not as the Llama layout {expected} "
                         "(groups sharing one input): this architecture is not supported")


def random_fold(layer: nn.Module, where: str, generator: torch.Generator) -> None:
    """Fold random scales (0.5 to 2) into every group of ``layer``: its float output must not change."""
    modules = dict(layer.named_modules())
    for label, previous, names in LLAMA_GROUPS:
        expand = attention_expand(layer, where) if label == "o" else None
        width = modules[names[0]].in_features if expand is None else int(expand.max()) + 1
        s = 2 ** (2 * torch.rand(width, generator=generator) - 1)
        fold_scales(modules[previous], [modules[n] for n in names], s.to(modules[names[0]].weight.device), expand)


def fold_check(layer: nn.Module, probe: tuple[torch.Tensor, dict], reference: torch.Tensor, where: str) -> None:
    out = run_layer(layer, *probe)
    rel = float((out.float() - reference.float()).norm() / reference.float().norm().clamp(min=1e-12))
    tolerance = 1e-4 if reference.dtype == torch.float32 else 3e-2
    if not rel <= tolerance:
        raise ValueError(
            f"{where}: folding the AWQ scales changed the float layer's output (relative error {rel:.2g}); its "
            "norms or attention do not commute with a per-channel scale: this architecture is not supported"
        )
