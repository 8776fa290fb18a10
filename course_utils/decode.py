"""A low-overhead greedy decode loop for Llama-family models, to measure what the weights allow.

``model.generate`` in transformers spends most of a small model's decode step outside the matrix
products: Python calls through dozens of modules per layer, a cache object that grows by concatenation,
masks rebuilt at each step. For a 135M-parameter model on a CPU that overhead is larger than the time the
weights take to stream, so it hides the effect of quantization. :class:`Decoder` runs the same
computation with little else: a static KV cache allocated once, the rotary tables computed once, each layer
a handful of tensor operations, and each Linear resolved once to the function that multiplies by it (a
float matmul, or for a quantized layer the kernel :mod:`course_utils.quant.kernel_path` picks). It reads
the model's own modules and weights, so a model quantized in place decodes through it unchanged.

Supported: decoder-only models laid out like Llama (``model.layers[i].self_attn.{q,k,v,o}_proj``,
``mlp.{gate,up,down}_proj``, RMSNorm, rotary embeddings, grouped-query attention, optional q/k/v bias):
Llama, Mistral, Qwen2, SmolLM. Others are refused with the reason; ``timing.decode_tokens_per_second``
times any model through transformers. Logits equal transformers' within float rounding
(``tests/test_decode.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from course_utils import kernels, timing
from course_utils.quant import kernel_path

SUPPORTED = ("llama", "mistral", "qwen2")
LinearFn = Callable[[torch.Tensor], torch.Tensor]


def check_supported(model: nn.Module) -> None:
    """``ValueError`` unless :class:`Decoder` can run ``model`` (a Llama-family causal LM)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED:
        raise ValueError(f"the course's decode loop runs {', '.join(SUPPORTED)} models; this one is "
                         f"{model_type!r}. Time it with course_utils.timing.decode_tokens_per_second instead")
    inner = model.model
    for part in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if not hasattr(inner, part):
            raise ValueError(f"the model has no model.{part}: not laid out like Llama")
    attn = inner.layers[0].self_attn
    if hasattr(attn, "q_norm") or getattr(model.config, "sliding_window", None) and model_type == "mistral":
        raise ValueError("query/key norms and sliding-window attention are not in the course's decode loop")


_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _is_course_quantized(module: nn.Module) -> bool:
    return hasattr(module, "codes") and hasattr(module, "engine")


def _concatenated_bias(modules: list[nn.Module], dtype: torch.dtype) -> torch.Tensor | None:
    if all(m.bias is None for m in modules):
        return None
    return torch.cat([m.bias.detach() if m.bias is not None else m.weight.new_zeros(m.out_features)
                      for m in modules]).to(dtype)


def linear_function(modules: list[nn.Module], dtype: torch.dtype) -> tuple[LinearFn, str]:
    """One function computing the outputs of ``modules`` (Linear layers reading the same input, such as a
    layer's q, k and v projections), concatenated, for an input ``(rows, in)`` in ``dtype``; and its name.

    Float ``nn.Linear`` layers: their weights stacked into one matrix in ``dtype`` (a copy) for one
    ``F.linear``, named by dtype (``"fp32"``). Course quantized layers that one kernel fits
    (:mod:`course_utils.quant.kernel_path`): their codes packed together for one kernel call (``"int4"``,
    ``"int8"``). Anything else (a layer set to dequantize, a layer no kernel fits, another library's layer):
    each module called in turn, the outputs concatenated (``"dequantize"``, or the module's class name).
    """
    first = modules[0]
    if all(type(m) is nn.Linear for m in modules):
        weight = torch.cat([m.weight.detach() for m in modules]).to(dtype)
        bias = _concatenated_bias(modules, dtype)
        return _float_matmul(weight, bias), _DTYPE_NAMES.get(dtype, str(dtype))
    if all(_is_course_quantized(m) for m in modules):
        device = first.packed.device
        choices = {kernel_path.choose(m, device).kernel for m in modules}
        engines = {m.engine for m in modules}
        if "dequantize" not in engines and len(choices) == 1 and "dequantize" not in choices:
            packed = kernel_path.pack(modules, device)
            matmul, bias, kernel_dtype = packed.matmul, _concatenated_bias(modules, dtype), packed.act_dtype
            if dtype == kernel_dtype and bias is None:
                return matmul, packed.fmt
            return (lambda x: _plus(matmul(x.to(kernel_dtype)).to(dtype), bias)), packed.fmt
        for m in modules:
            kernel_path.kernel_for(m, 1, device)  # says once why a layer has no kernel
        name = "dequantize"
    else:
        name = type(first).__name__
    if len(modules) == 1:
        return (lambda x: first(x)), name
    return (lambda x: torch.cat([m(x) for m in modules], dim=-1)), name


def _float_matmul(weight: torch.Tensor, bias: torch.Tensor | None) -> LinearFn:
    """``x @ weight.T + bias``; one row as a matrix-vector product ``weight @ x``, which on CPU streams the weight
    about twice as fast as ``F.linear`` on a (1, in) input (measured in lesson 03)."""
    def matmul(x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:
            y = torch.mv(weight, x[0]).unsqueeze(0)
            return y if bias is None else y + bias
        return F.linear(x, weight, bias)
    return matmul


def _plus(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return y if bias is None else y + bias


@dataclass
class _Layer:
    ln1: torch.Tensor
    ln2: torch.Tensor
    qkv: LinearFn  # (rows, hidden) -> (rows, (heads + 2 kv_heads) * head_dim)
    o: LinearFn
    gate_up: LinearFn  # (rows, hidden) -> (rows, 2 intermediate)
    down: LinearFn
    keys: torch.Tensor  # (kv_heads, max_tokens, head_dim)
    values: torch.Tensor


class Decoder:
    """Greedy decoding of ``model`` (Llama family) in ``dtype`` with a static KV cache of ``max_tokens``.

    ``dtype`` (default: the model's) is the activations' dtype and that of the float weights, cast once
    (a copy of each float weight when it differs from the model's). ``head``: ``"float"`` keeps the output
    projection (tied to the embedding in small models) in ``dtype``; ``"int8"`` stores a copy rounded to
    nearest per output row for the int8 kernel (a quarter of fp32's bytes). ``kernels`` counts which function
    each Linear got, the output projection included (e.g. ``{"int4": 210, "int8": 1}``); ``head_label`` is the
    output projection's.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype | None = None, max_tokens: int = 512,
                 head: str = "float"):
        check_supported(model)
        cfg, inner = model.config, model.model
        self.device = inner.embed_tokens.weight.device
        self.dtype = dtype or inner.embed_tokens.weight.dtype
        self.max_tokens = max_tokens
        self.hidden = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or self.hidden // self.heads
        self.eps = cfg.rms_norm_eps
        self.embed = inner.embed_tokens.weight.detach().to(self.dtype)
        self.norm = inner.norm.weight.detach().to(self.dtype)
        self.kernels: dict[str, int] = {}
        self.layers = [self._layer(layer) for layer in inner.layers]
        self.head_fn, self.head_label = self._head(model, head)
        self.kernels[self.head_label] = self.kernels.get(self.head_label, 0) + 1
        positions = torch.arange(max_tokens, device=self.device)[None]
        probe = torch.zeros(1, device=self.device, dtype=torch.float32)
        cos, sin = inner.rotary_emb(probe, positions)
        self.cos, self.sin = cos[0].to(self.dtype), sin[0].to(self.dtype)  # (max_tokens, head_dim)
        self.length = 0

    def _fn(self, *modules: nn.Module) -> LinearFn:
        fn, name = linear_function(list(modules), self.dtype)
        self.kernels[name] = self.kernels.get(name, 0) + len(modules)
        return fn

    def _layer(self, layer: nn.Module) -> _Layer:
        attn, mlp = layer.self_attn, layer.mlp
        cache = torch.zeros(self.kv_heads, self.max_tokens, self.head_dim, dtype=self.dtype, device=self.device)
        return _Layer(
            ln1=layer.input_layernorm.weight.detach().to(self.dtype),
            ln2=layer.post_attention_layernorm.weight.detach().to(self.dtype),
            qkv=self._fn(attn.q_proj, attn.k_proj, attn.v_proj), o=self._fn(attn.o_proj),
            gate_up=self._fn(mlp.gate_proj, mlp.up_proj), down=self._fn(mlp.down_proj),
            keys=cache, values=cache.clone(),
        )

    def _head(self, model: nn.Module, head: str) -> tuple[LinearFn, str]:
        if head == "float":
            return linear_function([model.lm_head], self.dtype)
        if head == "int8":
            packed = kernels.pack_weight(model.lm_head.weight.detach().float(), "int8", act_dtype=kernel_path.KERNEL_DTYPE)
            matmul, dtype = packed.matmul, packed.act_dtype
            return (lambda x: matmul(x.to(dtype)).to(self.dtype)), "int8"
        raise ValueError(f"head must be 'float' or 'int8', got {head!r}")

    def _rope(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Rotate ``x: (heads, tokens, head_dim)`` by the angles of positions ``start...``."""
        n = x.shape[1]
        cos, sin = self.cos[start:start + n], self.sin[start:start + n]
        half = self.head_dim // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def forward(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        """Logits ``(tokens, vocab)`` for ``ids: (tokens,)`` at positions ``start...``, filling the KV cache.

        A prompt is one call with ``start=0``; each decode step is a call with one token."""
        n = ids.shape[0]
        if start + n > self.max_tokens:
            raise ValueError(f"{start + n} tokens exceed the cache of {self.max_tokens}; make a Decoder with a "
                             f"larger max_tokens")
        end = start + n
        x = self.embed[ids]
        shape, q_end, k_end = (self.hidden,), self.heads * self.head_dim, (self.heads + self.kv_heads) * self.head_dim
        for layer in self.layers:
            qkv = layer.qkv(F.rms_norm(x, shape, layer.ln1, self.eps))
            qk = self._rope(qkv[:, :k_end].view(n, self.heads + self.kv_heads, self.head_dim).transpose(0, 1), start)
            layer.keys[:, start:end] = qk[self.heads:]
            layer.values[:, start:end] = qkv[:, k_end:].view(n, self.kv_heads, self.head_dim).transpose(0, 1)
            a = F.scaled_dot_product_attention(qk[None, :self.heads], layer.keys[None, :, :end],
                                               layer.values[None, :, :end], is_causal=n > 1, enable_gqa=True)
            x = x + layer.o(a[0].transpose(0, 1).reshape(n, q_end))
            gate, up = layer.gate_up(F.rms_norm(x, shape, layer.ln2, self.eps)).chunk(2, dim=-1)
            x = x + layer.down(F.silu(gate) * up)
        self.length = end
        return self.head_fn(F.rms_norm(x, shape, self.norm, self.eps))

    def greedy(self, prompt_ids: torch.Tensor, new_tokens: int) -> tuple[list[int], float, list[float]]:
        """Greedy decode ``new_tokens`` after ``prompt_ids: (tokens,)``, restarting the cache.

        Returns the new token ids, the prefill time and each decode step's time, in seconds."""
        if prompt_ids.ndim != 1:
            raise ValueError(f"prompt_ids must be 1-D (tokens,), got shape {tuple(prompt_ids.shape)}")
        prompt_ids = prompt_ids.to(self.device)
        with torch.inference_mode():
            timing.synchronize(self.device)
            start = time.perf_counter()
            token = self.forward(prompt_ids, 0)[-1].argmax()
            timing.synchronize(self.device)
            prefill = time.perf_counter() - start
            out, steps = [int(token)], []
            for _ in range(new_tokens - 1):
                start = time.perf_counter()
                token = self.forward(token.view(1), self.length)[-1].argmax()
                out.append(int(token))  # reading the id waits for the step, on a GPU too
                steps.append(time.perf_counter() - start)
        return out, prefill, steps

    def speed(self, prompt_ids: torch.Tensor, new_tokens: int = 128, warmup_tokens: int = 4) -> timing.DecodeSpeed:
        """Prefill and decode speed of one greedy generation, after a short untimed one."""
        if warmup_tokens:
            self.greedy(prompt_ids, warmup_tokens)
        _, prefill, steps = self.greedy(prompt_ids, new_tokens + 1)
        return timing.DecodeSpeed(prompt_tokens=int(prompt_ids.shape[0]), prefill_s=prefill, step_s=tuple(steps))
