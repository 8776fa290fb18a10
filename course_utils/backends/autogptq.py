"""AutoGPTQ: reported, not used. Why it is skipped, and how its API maps onto GPTQModel's.

AutoGPTQ (``pip install auto-gptq``, import name ``auto_gptq``) was the common GPTQ library until its
maintainers declared it end-of-life in 2025 and pointed to GPTQModel, which the course uses
(:mod:`course_utils.backends.gptqmodel`). Its last release (0.7.1) bundles CUDA libraries and fails to
import with transformers 5 (``cannot import name 'no_init_weights'``), so the course does not install it.
Code written for it translates almost name for name: see ``API_RENAMES``.

``skip_reason()`` says in one sentence why AutoGPTQ is not run here (not installed, or the error its
import raises); ``available()`` is True only if it imports. Nothing here imports ``auto_gptq`` into the
running process: the import is tried in a child process, because a failed import leaves half-loaded
modules (and, for this package, CUDA libraries) behind.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

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
    if "reason" in _cached:
        return _cached["reason"]
    if importlib.util.find_spec("auto_gptq") is None:
        reason = f"auto-gptq is not installed (and is not part of the course's requirements). {END_OF_LIFE}."
    else:
        try:
            proc = subprocess.run([sys.executable, "-c", "import auto_gptq"], capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            reason = f"`import auto_gptq` did not finish within 300 s. {END_OF_LIFE}."
        else:
            if proc.returncode == 0:
                reason = None
            else:
                lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
                error = lines[-1] if lines else f"exit status {proc.returncode}"
                reason = f"auto-gptq is installed but `import auto_gptq` fails here ({error}). {END_OF_LIFE}."
    _cached["reason"] = reason
    return reason


def available() -> bool:
    """True only if ``auto_gptq`` imports in this environment (it does not with transformers 5)."""
    return _probe() is None


def skip_reason() -> str | None:
    """Why AutoGPTQ is skipped here, naming its successor; None if it imports."""
    return _probe()
