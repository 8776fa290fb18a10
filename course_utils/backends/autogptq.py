"""AutoGPTQ: reported, not used. Why it is skipped, and how its API maps onto GPTQModel's.

AutoGPTQ (``pip install auto-gptq``, import name ``auto_gptq``) was the common GPTQ library until its
maintainers declared it end-of-life in 2025 and pointed to GPTQModel, which the course uses
(:mod:`course_utils.backends.gptqmodel`). Its last release (0.7.1) bundles CUDA libraries and fails to
import with transformers 5 (``cannot import name 'no_init_weights'``), so the course does not install it.
Code written for it translates almost name for name: see ``API_RENAMES``.

``skip_reason()`` says in one sentence why AutoGPTQ is not run here (not installed, or the error its
import raises); ``available()`` reports like every adapter, ``{"auto_gptq": None}`` only if it imports.
Nothing here imports ``auto_gptq`` into the running process: the import is tried in a child process,
because a failed import leaves half-loaded modules (and, for this package, CUDA libraries) behind.
"""

from __future__ import annotations

from course_utils.backends.common import probe_import

SUCCESSOR = "GPTQModel"
END_OF_LIFE = (
    "AutoGPTQ is end-of-life (since 2025); its maintainers point users to GPTQModel, which reads "
    "and writes the same GPTQ checkpoints (course_utils.backends.gptqmodel)"
)

# AutoGPTQ name -> GPTQModel (or transformers) name for the same step.
API_RENAMES = {
    "auto_gptq.AutoGPTQForCausalLM.from_pretrained(path, quantize_config)": "gptqmodel.GPTQModel.load(path, quantize_config)",
    "auto_gptq.BaseQuantizeConfig(bits, group_size, desc_act, sym, damp_percent)": "gptqmodel.QuantizeConfig(bits, group_size, desc_act, sym, damp_percent)",
    "model.quantize(examples)": "model.quantize(calibration)",
    "model.save_quantized(out_dir)": "model.save(out_dir)",
    "AutoGPTQForCausalLM.from_quantized(path)": "gptqmodel.GPTQModel.load(path), or transformers.AutoModelForCausalLM.from_pretrained(path)",
}

_cached: dict[str, str | None] = {}


def _probe() -> str | None:
    """None if ``import auto_gptq`` works in a fresh interpreter, else why not (cached per process)."""
    if "reason" not in _cached:
        why = probe_import("auto_gptq")
        if why is None:
            _cached["reason"] = None
        elif why == "not installed":
            _cached["reason"] = f"auto-gptq is not installed (and is not part of the course's requirements). {END_OF_LIFE}."
        else:
            _cached["reason"] = f"auto-gptq is installed but {why}. {END_OF_LIFE}."
    return _cached["reason"]


def available() -> dict[str, str | None]:
    """``{"auto_gptq": None}`` if ``auto_gptq`` imports in this environment (it does not with transformers 5),
    else ``{"auto_gptq": why not}``."""
    return {"auto_gptq": _probe()}


def skip_reason() -> str | None:
    """Why AutoGPTQ is skipped here, naming its successor; None if it imports."""
    return _probe()
