"""AutoAWQ: reported, not used. Why it is skipped, and how its API maps onto llm-compressor's.

AutoAWQ (``pip install autoawq``, import name ``awq``) was the common AWQ library; its maintainers
deprecated it in May 2025 and pointed to llm-compressor (vLLM project), whose ``AWQModifier`` implements
the same algorithm (:mod:`course_utils.backends.llmcompressor`). The course does not install it, for three
reasons: it is deprecated; its last release (0.2.9) targets older transformers and CUDA kernels; and on a
CPU it ran but produced a broken model when tried for the course (perplexity about 63,000 on the
evaluation text, generations of "EEEE"). Code written for it translates step by step: see ``API_RENAMES``.

``skip_reason()`` says in one sentence why AutoAWQ is not run here (it always gives a reason: even an
importable AutoAWQ is not used); ``available()`` reports like every adapter, ``{"awq": None}`` only if
``import awq`` works, else why not. The import is tried in a child process, never in the running one.
"""

from __future__ import annotations

from course_utils.backends.common import probe_import

SUCCESSOR = "llm-compressor"
DEPRECATED = (
    "AutoAWQ is deprecated (since May 2025); its maintainers point users to llm-compressor, whose AWQModifier "
    "implements the same algorithm (course_utils.backends.llmcompressor)"
)
BROKEN_ON_CPU = (
    "on a CPU, autoawq 0.2.9 ran but returned a broken model (perplexity about 63,000, text 'EEEE')"
)

# AutoAWQ name -> llm-compressor (or transformers) name for the same step.
API_RENAMES = {
    "awq.AutoAWQForCausalLM.from_pretrained(path)": "transformers.AutoModelForCausalLM.from_pretrained(path)",
    "quant_config = {'w_bit': 4, 'q_group_size': 128, 'zero_point': True, 'version': 'GEMM'}":
        "QuantizationModifier(config_groups={'group_0': QuantizationScheme(targets=['Linear'], weights=QuantizationArgs("
        "num_bits=4, group_size=128, symmetric=False, strategy='group'))}, ignore=['lm_head']), or scheme='W4A16_ASYM'",
    "model.quantize(tokenizer, quant_config=quant_config, calib_data=texts)":
        "llmcompressor.oneshot(model=model, tokenizer=tokenizer, dataset=dataset, "
        "recipe=[AWQModifier(duo_scaling=False), QuantizationModifier(...)])",
    "model.save_quantized(out_dir)": "model.save_pretrained(out_dir, save_compressed=True) (compressed-tensors format)",
    "AutoAWQForCausalLM.from_quantized(path)": "transformers.AutoModelForCausalLM.from_pretrained(path) (needs compressed-tensors)",
}

_cached: dict[str, str | None] = {}


def _import_problem() -> str | None:
    """None if ``import awq`` works in a fresh interpreter, else why not (cached per process)."""
    if "why" not in _cached:
        _cached["why"] = probe_import("awq")
    return _cached["why"]


def available() -> dict[str, str | None]:
    """``{"awq": None}`` if AutoAWQ (import name ``awq``) imports in this environment, else ``{"awq": why not}``."""
    return {"awq": _import_problem()}


def skip_reason() -> str:
    """Why AutoAWQ is not used here, in one sentence naming its successor."""
    why = _import_problem()
    if why is None:
        state = "autoawq imports here but is not used"
    elif why == "not installed":
        state = "autoawq is not installed (and is not part of the course's requirements)"
    else:
        state = f"autoawq is installed but {why}"
    return f"{state}: {DEPRECATED}; {BROKEN_ON_CPU}."
