"""Published results the course puts beside its own measurements, each with its source.

Perplexities are WikiText-2 unless stated; the course's own figures use another text (``course_utils.data``),
so comparisons are made on *relative* increases over each model's own 16-bit (or 32-bit) reference.
"""

from __future__ import annotations

# llama.cpp, tools/perplexity/README.md (revision f364eb6f): Llama-3-8B, Wikitext-2, FP16 reference, no
# importance matrix. type -> (file size GiB, perplexity, mean KL vs FP16, top-1 agreement or None).
LLAMACPP_LLAMA3_8B_SOURCE = "llama.cpp tools/perplexity/README.md, revision f364eb6f (Llama-3-8B, Wikitext-2)"
LLAMACPP_LLAMA3_8B: dict[str, tuple[float, float, float | None, float | None]] = {
    "F16": (14.97, 6.2332, None, None),
    "Q8_0": (7.96, 6.2343, 0.00136, 0.977),
    "Q6_K": (6.14, 6.2534, 0.00545, 0.960),
    "Q5_K_M": (5.33, 6.2886, 0.01076, None),
    "Q4_K_M": (4.58, 6.4071, 0.03127, 0.919),
    "Q4_0": (4.34, 6.7001, 0.07194, None),
    "Q3_K_M": (3.74, 6.8885, 0.10191, None),
    "Q2_K": (2.96, 9.7516, 0.44513, 0.711),
}

# Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers", ICLR 2023
# (arXiv:2210.17323), Table 3: OPT, WikiText-2, one scale per row (no groups).
GPTQ_OPT_SOURCE = "Frantar et al., ICLR 2023, Table 3 (OPT, WikiText-2, per-row scales)"
GPTQ_OPT: dict[str, dict[str, float]] = {
    "OPT-125M": {"FP16": 27.65, "RTN int4": 37.28, "GPTQ int4": 31.12, "RTN int3": 1.3e3, "GPTQ int3": 53.85},
    "OPT-1.3B": {"FP16": 14.63, "RTN int4": 48.17, "GPTQ int4": 15.47, "RTN int3": 1.3e4, "GPTQ int3": 20.97},
    "OPT-6.7B": {"FP16": 10.86, "RTN int4": 12.10, "GPTQ int4": 11.39, "RTN int3": 5.8e3, "GPTQ int3": 14.86},
    "OPT-175B": {"FP16": 8.34, "RTN int4": 10.54, "GPTQ int4": 8.37, "RTN int3": 7.3e3, "GPTQ int3": 8.68},
}

# Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration", MLSys 2024
# (arXiv:2306.00978), Table 4: Llama-2, WikiText-2, groups of 128.
AWQ_LLAMA2_SOURCE = "Lin et al., MLSys 2024, Table 4 (Llama-2, WikiText-2, groups of 128)"
AWQ_LLAMA2: dict[str, dict[str, float]] = {
    "Llama-2-7B": {"FP16": 5.47, "RTN int4": 5.73, "AWQ int4": 5.60, "RTN int3": 6.66, "GPTQ int3": 6.43, "AWQ int3": 6.24},
    "Llama-2-70B": {"FP16": 3.32, "RTN int4": 3.46, "AWQ int4": 3.41, "RTN int3": 3.98, "GPTQ int3": 3.86, "AWQ int3": 3.74},
}

# The rules of thumb of the page the course grew from (shared/source), as (low, high) quality loss in % and
# speed-up over FP16 (None where the page gives none).
RULES_OF_THUMB_SOURCE = "the course's source page, 'Quantization' quick reference (precision table)"
RULES_OF_THUMB: dict[str, dict[str, tuple[float, float] | None]] = {
    "INT8": {"loss_pct": (0.0, 1.0), "speedup": (1.2, 1.5)},
    "INT4 GPTQ": {"loss_pct": (2.0, 5.0), "speedup": (1.5, 2.0)},
    "INT4 AWQ": {"loss_pct": (1.0, 3.0), "speedup": (1.5, 2.0)},
    "INT3": {"loss_pct": (5.0, 15.0), "speedup": None},
}


def increase_pct(table: dict[str, float], key: str, reference: str = "FP16") -> float:
    """Perplexity increase of ``table[key]`` over ``table[reference]``, in %."""
    return 100 * (table[key] / table[reference] - 1)
