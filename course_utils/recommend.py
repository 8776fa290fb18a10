"""Choosing a quantization approach for given hardware, memory, model size, goal and batch size.

:func:`recommend` turns the course's measurements and arithmetic into a decision you can check:

1. *Candidates.* On a CPU or Apple silicon: llama.cpp's GGUF types (what runs there). On an NVIDIA GPU:
   BF16, FP8 or INT8 weights and activations (W8A8), and 4-bit weight-only AWQ/GPTQ (W4A16). For
   fine-tuning: QLoRA, NF4 weights with LoRA adapters.
2. *Expected quality loss* of each candidate, from published results on 7B-70B models
   (:mod:`course_utils.anchors`: llama.cpp's Llama-3-8B table, the AWQ paper's Llama-2 table, the rules of
   thumb). Small models lose much more (lessons 07-10 measure it); below 2B parameters the result says so.
3. *Memory.* ``parameters x bits / 8`` (:func:`course_utils.memory.weight_gb`), plus :data:`OVERHEAD` for activations
   and buffers, plus the KV cache you expect: a candidate fits if that is within the budget.
4. *Speed, from the roofline (lesson 03).* One decode step of a batch of ``B`` sequences reads every weight
   once and does ``2 B P`` FLOPs, so it takes ``max(weight bytes / bandwidth, 2 B P / peak FLOPs)``;
   tokens/s = ``B / step``. At small batches the bytes decide (4-bit weights win); at large batches the
   FLOPs decide, and only formats that also compute in 8 bits (FP8/INT8 W8A8: twice the tensor-core
   rate) go faster. Weight-only 4-bit still computes in BF16, so it stops paying. These are ideal
   figures: speed-of-light bounds, not predictions.
5. *Choice.* Among the candidates that fit and stay within the quality budget, the fastest for the goal
   ("latency": batch-1 tokens/s; "throughput": total tokens/s at the batch size); ties go to the better
   quality. If none is fast enough for ``min_tokens_per_s``, the fastest acceptable one is returned with
   a reason saying so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from course_utils import anchors, hardware, memory, timing

HARDWARE_CLASSES = {
    "cpu": ("CPU only (laptop or server)", "DDR5-4800 dual channel"),
    "apple": ("Apple silicon (unified memory)", "Apple M2 Max"),
    "consumer_gpu": ("consumer NVIDIA GPU", "RTX 4090"),
    "datacenter_gpu": ("datacenter NVIDIA GPU", "H100 SXM"),
}
GOALS = ("latency", "throughput")
OVERHEAD = 0.2  # activations, buffers and runtime on top of the weights (20 %); the KV cache is separate

# Dense BF16/FP16 tensor-core TFLOPS (no sparsity) and FP8 support, from NVIDIA's datasheets and the Ada
# and Hopper whitepapers. FP8 and INT8 W8A8 run at twice these rates.
GPU_TFLOPS: dict[str, tuple[float, bool]] = {
    "H100 SXM": (989.0, True), "H100 PCIe": (756.0, True), "H200": (989.0, True),
    "A100 80GB SXM": (312.0, False), "A100 80GB PCIe": (312.0, False), "A100 40GB": (312.0, False),
    "L40S": (362.0, True), "L4": (121.0, True), "A10": (125.0, False), "T4": (65.0, False),
    "RTX 4090": (165.0, True), "RTX 3090": (71.0, False), "V100": (125.0, False),
}


@dataclass(frozen=True)
class Option:
    """One way to run the model: its name, bits per weight (scales included), expected perplexity loss in %
    (published, 7B-70B models), file format, engine, whether activations are 8-bit too (W8A8), and
    where the loss figure comes from."""

    name: str
    bits: float
    loss_pct: float
    file_format: str
    engine: str
    w8a8: bool = False
    evidence: str = ""


def gguf_options(apple: bool) -> list[Option]:
    """llama.cpp's GGUF types as candidates for a CPU (or, ``apple``, a Mac): bits and loss from llama.cpp's
    Llama-3-8B table."""
    f16_gib = anchors.LLAMACPP_LLAMA3_8B["F16"][0]
    engine = "llama.cpp with Metal, or Ollama / LM Studio (which run it)" if apple else "llama.cpp, or Ollama (which runs it)"
    out = []
    for t, (gib, ppl, _, _) in anchors.LLAMACPP_LLAMA3_8B.items():
        if t == "F16":
            continue
        loss = 100 * (ppl / anchors.LLAMACPP_LLAMA3_8B["F16"][1] - 1)
        out.append(Option(f"GGUF {t}", 16 * gib / f16_gib, loss, "GGUF", engine,
                          evidence=f"Llama-3-8B: +{loss:.1f} % perplexity ({anchors.LLAMACPP_LLAMA3_8B_SOURCE})"))
    return out


def gpu_options(fp8: bool) -> list[Option]:
    """The candidates on an NVIDIA GPU: BF16, 8-bit W8A8 (FP8 if ``fp8``, else INT8) and AWQ INT4 (W4A16)."""
    awq_loss = max(anchors.increase_pct(t, "AWQ int4") for t in anchors.AWQ_LLAMA2.values())
    int8_high = anchors.RULES_OF_THUMB["INT8"]["loss_pct"][1]
    eight = (Option("FP8 W8A8", 8.0, int8_high, "compressed-tensors FP8 (llm-compressor)", "vLLM or TGI", True,
                    f"8-bit: under {int8_high:.0f} % ({anchors.RULES_OF_THUMB_SOURCE})") if fp8 else
             Option("INT8 W8A8 (SmoothQuant)", 8.0, int8_high, "compressed-tensors INT8 (llm-compressor)", "vLLM or TGI", True,
                    f"8-bit: under {int8_high:.0f} % ({anchors.RULES_OF_THUMB_SOURCE})"))
    return [
        Option("BF16 (no quantization)", 16.0, 0.0, "safetensors", "vLLM or TGI (transformers for experiments)",
               evidence="the reference"),
        eight,
        Option("AWQ INT4 (W4A16, groups of 128)", memory.bits_per_weight(4, 128), awq_loss,
               "compressed-tensors or AutoAWQ format (llm-compressor)", "vLLM (Marlin kernels) or TGI",
               evidence=f"Llama-2 7B/70B: up to +{awq_loss:.1f} % ({anchors.AWQ_LLAMA2_SOURCE})"),
    ]


@dataclass(frozen=True)
class Recommendation:
    """What to run and why. ``weight_gb``: the weights alone; ``memory_gb``: with :data:`OVERHEAD` and the
    KV cache; ``tokens_per_s``: the speed-of-light estimate (batch 1 for "latency", the whole batch for
    "throughput"); ``alternatives``: the other candidates and why they lost."""

    method: str
    file_format: str
    engine: str
    bits_per_weight: float
    weight_gb: float
    memory_gb: float
    budget_gb: float
    tokens_per_s: float | None
    expected_loss_pct: float | None
    reasons: tuple[str, ...]
    alternatives: tuple[str, ...] = field(default=())

    def __str__(self) -> str:
        speed = "" if self.tokens_per_s is None else f"; up to {self.tokens_per_s:,.0f} tokens/s (speed of light)"
        loss = "" if self.expected_loss_pct is None else f"; expected loss about {self.expected_loss_pct:.1f} %"
        lines = [f"{self.method}: {self.file_format}, run with {self.engine}",
                 f"  {self.bits_per_weight:.2f} bits/weight: {self.weight_gb:.1f} GB of weights, about {self.memory_gb:.1f} GB "
                 f"needed of {self.budget_gb:.0f} GB{speed}{loss}"]
        lines += [f"  - {r}" for r in self.reasons]
        lines += [f"  (not chosen) {a}" for a in self.alternatives]
        return "\n".join(lines)


def _check(hardware_class: str, memory_gb: float, params: float, batch_size: int, goal: str, max_loss_pct: float,
           kv_cache_gb: float, min_tokens_per_s: float | None) -> None:
    if hardware_class not in HARDWARE_CLASSES:
        raise ValueError(f"unknown hardware {hardware_class!r}; choose among {sorted(HARDWARE_CLASSES)}")
    if goal not in GOALS:
        raise ValueError(f"goal must be one of {GOALS}, got {goal!r}")
    for name, value in (("memory_gb", memory_gb), ("params", params)):
        if not value > 0:
            raise ValueError(f"{name} must be positive, got {value!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
    if not max_loss_pct >= 0 or not kv_cache_gb >= 0 or (min_tokens_per_s is not None and not min_tokens_per_s > 0):
        raise ValueError("max_loss_pct and kv_cache_gb must be >= 0, min_tokens_per_s positive (or None)")


def _device(hardware_class: str, device: str | None) -> tuple[str, float, tuple[float, bool] | None]:
    name = device or HARDWARE_CLASSES[hardware_class][1]
    entry = hardware.peak_bandwidth_entry(name)
    if entry is None:
        raise ValueError(f"no datasheet bandwidth for {name!r}; known: {sorted(hardware.PEAK_BANDWIDTH_GBPS)}")
    key, peak = entry
    gpu = hardware_class.endswith("gpu")
    if gpu and key not in GPU_TFLOPS:
        raise ValueError(f"{key!r} is not a GPU the course knows the compute of; known: {sorted(GPU_TFLOPS)}")
    return key, peak.gbps, GPU_TFLOPS.get(key) if gpu else None


def step_tokens_per_s(params: float, bits: float, batch_size: int, bandwidth_gbps: float, tflops: float | None) -> float:
    """Ideal decode tokens/s of a batch: ``batch / max(weight bytes / bandwidth, 2 * batch * params / FLOPs)``
    (``tflops`` None: bandwidth only)."""
    read_s = 1 / timing.speed_of_light_tokens_per_s(memory.weight_gb(params, bits) * memory.GB, bandwidth_gbps)
    compute_s = 2 * batch_size * params / (tflops * 1e12) if tflops else 0.0
    return batch_size / max(read_s, compute_s)


def recommend(
    hardware_class: str,
    memory_gb: float,
    params: float,
    goal: str = "latency",
    batch_size: int = 1,
    fine_tune: bool = False,
    max_loss_pct: float = 3.0,
    kv_cache_gb: float = 0.0,
    min_tokens_per_s: float | None = None,
    device: str | None = None,
) -> Recommendation:
    """The approach for running (or fine-tuning) a ``params``-parameter model on ``hardware_class`` ("cpu",
    "apple", "consumer_gpu", "datacenter_gpu"; ``device`` names the exact part, e.g. "RTX 3090", "Apple M1",
    for its datasheet bandwidth) within ``memory_gb`` of memory (GPU memory, or the RAM you can give the
    model). ``goal`` "latency" (one user, tokens/s per sequence) or "throughput" (``batch_size`` sequences
    at once, total tokens/s). ``max_loss_pct``: the perplexity loss you accept. Raises ``ValueError`` for
    bad input, and when nothing fits, with what would.
    """
    _check(hardware_class, memory_gb, params, batch_size, goal, max_loss_pct, kv_cache_gb, min_tokens_per_s)
    key, bandwidth, compute = _device(hardware_class, device)
    reasons = [f"{HARDWARE_CLASSES[hardware_class][0]} ({key}): {bandwidth:,.0f} GB/s datasheet bandwidth"
               + (f", {compute[0]:,.0f} dense BF16 TFLOPS, FP8 {'yes' if compute[1] else 'no'}" if compute else "")]
    if params < 2e9:
        reasons.append("below 2B parameters the published losses are optimistic: lessons 07-10 measure several times "
                       "more on a 135M model, so prefer 8 bits or more there")
    if fine_tune:
        return _qlora(hardware_class, memory_gb, params, kv_cache_gb, reasons)
    batch = batch_size if goal == "throughput" else 1
    options = gguf_options(hardware_class == "apple") if compute is None else gpu_options(compute[1])
    scored, alternatives = [], []
    for o in options:
        weight_gb = memory.weight_gb(params, o.bits)
        need = weight_gb * (1 + OVERHEAD) + kv_cache_gb
        tflops = None if compute is None else compute[0] * (2 if o.w8a8 else 1)
        tps = step_tokens_per_s(params, o.bits, batch, bandwidth, tflops)
        if need > memory_gb:
            alternatives.append(f"{o.name}: needs {need:.1f} GB, more than {memory_gb:.0f} GB")
        elif o.loss_pct > max_loss_pct:
            alternatives.append(f"{o.name}: expected loss {o.loss_pct:.1f} % is over the {max_loss_pct:.1f} % budget")
        else:
            scored.append((o, weight_gb, need, tps))
    if not scored:
        raise ValueError(_nothing_fits(params, memory_gb, kv_cache_gb, max_loss_pct, options))
    fast_enough = [s for s in scored if min_tokens_per_s is None or s[3] >= min_tokens_per_s]
    pool = fast_enough or scored
    best = max(pool, key=lambda s: (round(s[3], 6), -s[0].loss_pct))
    o, weight_gb, need, tps = best
    for other in scored:
        if other is not best:
            alternatives.append(f"{other[0].name}: fits ({other[2]:.1f} GB), up to {other[3]:,.0f} tokens/s, "
                                f"expected loss {other[0].loss_pct:.1f} %")
    what = "per sequence (batch 1)" if goal == "latency" else f"in total at batch {batch}"
    reasons.append(f"{o.name} is the fastest candidate that fits and stays within {max_loss_pct:.1f} % loss: "
                   f"up to {tps:,.0f} tokens/s {what}")
    if compute is not None:
        for cand in [o] + [c[0] for c in scored if c[0] is not o and c[0].bits < o.bits]:
            intensity = 2 * batch / (cand.bits / 8)
            ridge = compute[0] * 1e12 * (2 if cand.w8a8 else 1) / (bandwidth * 1e9)
            bound = ("memory-bound: fewer bytes per weight give more tokens" if intensity < ridge else
                     "compute-bound: fewer bytes no longer help" + ("" if cand.w8a8 else
                     "; weight-only formats compute in BF16, W8A8 at twice that rate"))
            reasons.append(f"{cand.name} at batch {batch}: arithmetic intensity {intensity:,.0f} FLOP/byte against a "
                           f"ridge point of {ridge:,.0f}: {bound}")
    if o.evidence:
        reasons.append(f"quality: {o.evidence}")
    if min_tokens_per_s is not None and not fast_enough:
        reasons.append(f"no candidate reaches {min_tokens_per_s:,.0f} tokens/s here even at the speed of light: "
                       "a faster memory system (or a smaller model) is needed")
    return Recommendation(o.name, o.file_format, o.engine, o.bits, weight_gb, need, memory_gb, tps, o.loss_pct,
                          tuple(reasons), tuple(alternatives))


def _qlora(hardware_class, memory_gb, params, kv_cache_gb, reasons) -> Recommendation:
    bits = memory.blockwise_4bit_bits(64, double_quant=True)  # NF4 as QLoRA stores it (lesson 06)
    weight_gb = memory.weight_gb(params, bits)
    need = weight_gb * 1.5 + kv_cache_gb  # LoRA adapters, their optimizer state, activations for backprop
    if not hardware_class.endswith("gpu"):
        raise ValueError("QLoRA fine-tuning needs an NVIDIA GPU (bitsandbytes' 4-bit training kernels are CUDA code); "
                         f"on {HARDWARE_CLASSES[hardware_class][0]} fine-tune a smaller model with plain LoRA, or rent a GPU: "
                         f"this {params / 1e9:g}B model needs about {need:.0f} GB there")
    if need > memory_gb:
        raise ValueError(f"QLoRA on {params / 1e9:g}B parameters needs about {need:.0f} GB (NF4 weights {weight_gb:.1f} GB x 1.5 "
                         f"for adapters, optimizer and activations), more than {memory_gb:.0f} GB; models up to "
                         f"{memory_gb / 1.5 / (bits / 8):.1f}B parameters fit")
    reasons += [f"fine-tuning: the frozen base model in NF4 ({weight_gb:.1f} GB), small LoRA adapters trained in BF16 on top "
                "(QLoRA: Dettmers et al., 2023)",
                f"about {need:.1f} GB with adapters, optimizer state and activations (1.5 x the weights): fits in {memory_gb:.0f} GB",
                "afterwards: merge the adapters into the BF16 model and quantize it for serving (AWQ/GPTQ or GGUF)"]
    return Recommendation("QLoRA (NF4 + LoRA adapters)", "safetensors (BF16 base) + LoRA adapter files",
                          "transformers + PEFT + bitsandbytes", bits, weight_gb, need, memory_gb, None, None, tuple(reasons))


def _nothing_fits(params, memory_gb, kv_cache_gb, max_loss_pct, options) -> str:
    smallest = min(options, key=lambda o: o.bits)
    need = memory.weight_gb(params, smallest.bits) * (1 + OVERHEAD) + kv_cache_gb
    acceptable = [o for o in options if o.loss_pct <= max_loss_pct]
    room = memory_gb - kv_cache_gb
    if acceptable and room > 0:
        o = min(acceptable, key=lambda o: o.bits)
        largest = room / (1 + OVERHEAD) / (o.bits / 8)
        fits = f"with {memory_gb:g} GB, models up to {largest:.1f}B parameters fit as {o.name}"
    else:
        fits = f"the KV cache alone ({kv_cache_gb:g} GB) leaves no room" if room <= 0 else \
            f"no candidate is within {max_loss_pct:g} % loss: raise max_loss_pct"
    return (f"{params / 1e9:g}B parameters do not fit in {memory_gb:g} GB within {max_loss_pct:g} % loss: even "
            f"{smallest.name} needs {need:.1f} GB; {fits}")
