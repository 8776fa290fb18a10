"""A low-overhead greedy decode loop for Llama-family models, to measure what the weights allow.

``model.generate`` in transformers spends most of a small model's decode step outside the matrix
products: Python calls through dozens of modules per layer, a cache object that grows by concatenation,
masks rebuilt at each step. For a 135M-parameter model on a CPU that overhead is larger than the time the
weights take to stream, so it hides the effect of quantization. :class:`Decoder` runs the same
computation with little else: a static KV cache allocated once, the rotary tables computed once, each layer
a handful of tensor operations, and each Linear resolved once to the function that multiplies by it (a
float matmul, or for a quantized layer the kernel :mod:`course_utils.quant.kernel_path` picks). It takes its
weights from the model when it is built (float weights stacked and cast into copies, quantized codes
repacked for their kernel), so any model the course quantized in place decodes through it; a change to the
model afterwards needs a new Decoder, and the copies take memory while it lives.

Supported: decoder-only models laid out like Llama (``model.layers[i].self_attn.{q,k,v,o}_proj``,
``mlp.{gate,up,down}_proj``, RMSNorm, rotary embeddings, grouped-query attention, optional q/k/v bias):
Llama, Mistral, Qwen2, SmolLM. Others are refused with the reason; ``timing.decode_tokens_per_second``
times any model through transformers. In float32, logits equal transformers' within float rounding
(``tests/test_decode.py``); in bf16, or on the int4 kernel, they differ by bf16 rounding.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from course_utils import kernels, models, timing
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
    return torch.cat([m.bias.detach().to(dtype) if m.bias is not None else torch.zeros(m.out_features, dtype=dtype)
                      for m in modules])


@dataclass(frozen=True)
class Matmul:
    """How a Decoder multiplies by one or more Linear layers: ``fn`` maps ``(rows, in)`` to their outputs side by
    side; ``name`` (``"fp32"``, ``"int4"``, ``"dequantize"``...); ``nbytes``: what one call reads and writes in
    memory at least (the stored weights and scales; for a layer that dequantizes, also the float weight it
    rebuilds, written and read back); ``n_weights``: how many weights they hold; ``stored_nbytes``: the bytes
    they are stored in (``nbytes`` when 0)."""

    fn: LinearFn
    name: str
    nbytes: int
    n_weights: int
    stored_nbytes: int = 0

    @property
    def stored(self) -> int:
        return self.stored_nbytes or self.nbytes


def linear_function(modules: list[nn.Module], dtype: torch.dtype) -> Matmul:
    """One :class:`Matmul` computing the outputs of ``modules`` (Linear layers reading the same input, such as
    a layer's q, k and v projections), concatenated, for an input ``(rows, in)`` in ``dtype``.

    Float ``nn.Linear`` layers: their weights stacked into one matrix in ``dtype`` (a copy) for one
    matrix product, named by dtype (``"fp32"``). Course quantized layers that one kernel fits
    (:mod:`course_utils.quant.kernel_path`): their codes packed together for one kernel call (``"int4"``,
    ``"int8"``). Anything else (a layer set to dequantize, a layer no kernel fits, another library's layer):
    each module called in turn, the outputs concatenated (``"dequantize"``, or the module's class name).
    """
    first = modules[0]
    n_weights = sum(m.in_features * m.out_features for m in modules)
    if all(type(m) is nn.Linear for m in modules):
        weight = torch.cat([m.weight.detach() for m in modules]).to(dtype)
        bias = _concatenated_bias(modules, dtype)
        return Matmul(_float_matmul(weight, bias), _DTYPE_NAMES.get(dtype, str(dtype)),
                      weight.numel() * weight.element_size(), n_weights)
    if all(_is_course_quantized(m) for m in modules):
        device = first.packed.device
        choices = {kernel_path.choose(m, device).kernel for m in modules}
        engines = {m.engine for m in modules}
        if "dequantize" not in engines and len(choices) == 1 and "dequantize" not in choices:
            packed = kernel_path.pack(modules, device)
            matmul, bias, kernel_dtype = packed.matmul, _concatenated_bias(modules, dtype), packed.act_dtype
            if dtype == kernel_dtype and bias is None:
                return Matmul(matmul, packed.fmt, packed.nbytes, n_weights)
            return Matmul(lambda x: _plus(matmul(x.to(kernel_dtype)).to(dtype), bias), packed.fmt, packed.nbytes, n_weights)
        for m in modules:
            kernel_path.kernel_for(m, 1, device)  # says once why a layer has no kernel
        name = "dequantize"
    else:
        name = type(first).__name__
    stored = sum(models.model_bytes(m) for m in modules)
    nbytes = stored + (2 * n_weights * torch.finfo(dtype).bits // 8 if name == "dequantize" else 0)  # write + read
    if len(modules) == 1:
        return Matmul(lambda x: first(x), name, nbytes, n_weights, stored)
    return Matmul(lambda x: torch.cat([m(x) for m in modules], dim=-1), name, nbytes, n_weights, stored)


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
        self.matmuls: list[Matmul] = []
        self.layers = [self._layer(layer) for layer in inner.layers]
        self.head = self._head(model, head)
        self.head_fn, self.head_label = self.head.fn, self.head.name
        self.kernels[self.head_label] = self.kernels.get(self.head_label, 0) + 1
        positions = torch.arange(max_tokens, device=self.device)[None]
        probe = torch.zeros(1, device=self.device, dtype=torch.float32)
        cos, sin = inner.rotary_emb(probe, positions)
        self.cos, self.sin = cos[0].to(self.dtype), sin[0].to(self.dtype)  # (max_tokens, head_dim)
        self.length = 0

    def _fn(self, *modules: nn.Module) -> LinearFn:
        matmul = linear_function(list(modules), self.dtype)
        self.kernels[matmul.name] = self.kernels.get(matmul.name, 0) + len(modules)
        self.matmuls.append(matmul)
        return matmul.fn

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

    def _head(self, model: nn.Module, head: str) -> Matmul:
        if head == "float":
            return linear_function([model.lm_head], self.dtype)
        if head == "int8":
            weight = model.lm_head.weight.detach().float()
            packed = kernels.pack_weight(weight, "int8", act_dtype=kernel_path.KERNEL_DTYPE)
            matmul, dtype = packed.matmul, packed.act_dtype
            return Matmul(lambda x: matmul(x.to(dtype)).to(self.dtype), "int8", packed.nbytes, weight.numel())
        raise ValueError(f"head must be 'float' or 'int8', got {head!r}")

    def linear_bits_per_weight(self) -> float:
        """Stored bits per weight of the decoder layers' Linear weights (scales included; the head apart)."""
        return 8 * sum(m.stored for m in self.matmuls) / sum(m.n_weights for m in self.matmuls)

    def bytes_per_token(self, context_tokens: int = 0) -> int:
        """Bytes one decode step must read at least: every layer's weights as stored for its matmul (for a layer
        that dequantizes, also its float weight, written and read back), the output projection, the norms, one
        embedding row and the keys and values of ``context_tokens`` earlier tokens."""
        norms = sum((layer.ln1.numel() + layer.ln2.numel()) * layer.ln1.element_size() for layer in self.layers)
        norms += self.norm.numel() * self.norm.element_size()
        row = self.embed.shape[1] * self.embed.element_size()
        kv = 2 * len(self.layers) * self.kv_heads * self.head_dim * self.embed.element_size() * context_tokens
        return sum(m.nbytes for m in self.matmuls) + self.head.nbytes + norms + row + kv

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
        if n > 1 and start > 0:
            raise ValueError("several tokens at once only from position 0 (a prompt); decode one token per call")
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


@contextlib.contextmanager
def _without_native_stderr():
    """Send what native code writes to file descriptor 2 to /dev/null meanwhile (Python's own errors still raise)."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


WEIGHT_OPS = ("_weight_int4pack_mm", "_weight_int8pack_mm", "aten::mv", "aten::addmv", "aten::mm", "aten::addmm",
              "aten::linear")
ATTENTION_OPS = ("scaled_dot_product",)


def profile_step(decoder: Decoder, prompt_ids: torch.Tensor, steps: int = 16) -> dict[str, float]:
    """Where a decode step's time goes, in ms per step, from ``torch.profiler`` on the CPU.

    Each operator the loop calls is counted with everything it runs inside (its CPU total):
    ``"weight matmuls"``, the operators that multiply by a weight (the kernels and float matrix products:
    reading the weights, and for int4 also unpacking them); ``"attention"``; ``"other operators"`` (norms,
    rotary embedding, copies into the cache, activations, indexing); ``"between operators"``: the rest of the
    wall time, spent in Python before each operator starts, and in the profiler itself. ``"total"``: the
    profiled step; ``"unprofiled"``: the same step timed without the profiler, to show what it adds.
    CPU time only: on a GPU the kernels run asynchronously and this split does not apply."""
    from torch.profiler import ProfilerActivity, profile

    decoder.greedy(prompt_ids, 2)
    unprofiled_ms = statistics.median(decoder.greedy(prompt_ids, steps + 1)[2]) * 1e3
    with torch.inference_mode(), _without_native_stderr():  # the profiler's own start/stop log lines
        token = decoder.forward(prompt_ids.to(decoder.device), 0)[-1].argmax()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(steps):
                token = decoder.forward(token.view(1), decoder.length)[-1].argmax()
            wall_ms = (time.perf_counter() - start) * 1e3 / steps
    split = {"weight matmuls": 0.0, "attention": 0.0, "other operators": 0.0}
    for event in prof.events():
        if event.cpu_parent is not None:
            continue
        ms = event.cpu_time_total / 1e3 / steps
        if any(name in event.name for name in WEIGHT_OPS):
            split["weight matmuls"] += ms
        elif any(name in event.name for name in ATTENTION_OPS):
            split["attention"] += ms
        else:
            split["other operators"] += ms
    split["between operators"] = max(0.0, wall_ms - sum(split.values()))
    split["total"] = wall_ms
    split["unprofiled"] = unprofiled_ms
    return split


class DecoderLogits:
    """A :class:`Decoder` that answers like a transformers model, ``model(input_ids=ids).logits``, so that
    :func:`course_utils.evaluate.compare` scores exactly the computation that is timed (its dtype, kernels and
    output projection). Each row is evaluated from an empty cache, as a prompt."""

    def __init__(self, decoder: Decoder):
        self.decoder = decoder

    def __call__(self, input_ids: torch.Tensor, **_):
        import types

        rows = [self.decoder.forward(row.to(self.decoder.device), 0).float() for row in torch.as_tensor(input_ids)]
        return types.SimpleNamespace(logits=torch.stack(rows))

    def parameters(self):
        yield self.decoder.embed


def fastest_decoder(model: nn.Module, max_tokens: int = 512) -> Decoder | None:
    """The :class:`Decoder` the course runs ``model`` with, or ``None`` for a model it does not support or whose
    projections are not all float ``nn.Linear`` or course ``QuantLinear`` layers (bitsandbytes', GPTQModel's,
    the course's LLM.int8 and NF4 layers: timed through transformers, as their libraries run them).

    In bf16 activations when the model holds course quantized layers that a kernel fits (the kernels' fast
    path), else in the model's dtype; the output projection as it is."""
    try:
        check_supported(model)
    except ValueError:
        return None
    projections = [m for layer in model.model.layers for m in (*layer.self_attn.children(), *layer.mlp.children())
                   if hasattr(m, "weight") or _is_course_quantized(m) or hasattr(m, "in_features")]
    if any(type(m) is not nn.Linear and not _is_course_quantized(m) for m in projections):
        return None  # another library's layers (or the course's LLM.int8/NF4 ones) run as that library runs them
    with_kernel = [m for m in model.modules() if _is_course_quantized(m) and m.engine != "dequantize"
                   and kernel_path.choose(m, m.packed.device).kernel != "dequantize"]
    return Decoder(model, dtype=kernel_path.KERNEL_DTYPE if with_kernel else None, max_tokens=max_tokens)


def speed_timer(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 32) -> Callable[..., timing.DecodeSpeed]:
    """``timer(new_tokens, warmup_tokens=4)``: prefill and decode speed of one greedy generation of ``model`` after
    ``prompt`` (``new_tokens`` up to ``max_new_tokens``), the fastest way the course runs it: through
    :func:`fastest_decoder` (built once, here), or through transformers
    (:func:`course_utils.timing.decode_tokens_per_second`) for a model the lean loop does not support."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids[0]
    decoder = fastest_decoder(model, max_tokens=ids.shape[0] + max_new_tokens + 8)

    def timer(new_tokens: int, warmup_tokens: int = 4) -> timing.DecodeSpeed:
        if decoder is None:
            return timing.decode_tokens_per_second(model, tokenizer, prompt, new_tokens=new_tokens, warmup_tokens=warmup_tokens)
        return decoder.speed(ids, new_tokens, warmup_tokens=warmup_tokens)
    return timer