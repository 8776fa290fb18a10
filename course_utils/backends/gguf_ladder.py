"""The type ladder: one float GGUF quantized to several llama.cpp types, each scored and timed.

:func:`type_ladder` quantizes the course model's F16 export (or another float GGUF) to each type with
:func:`course_utils.backends.llamacpp.quantize_gguf`, scores every file's logits against the F16 file's own
(``course_utils.evaluate``: perplexity, KL divergence, top-1 agreement) and, given a prompt, times prompt
processing and generation with all files taking turns. Lesson 09 draws its size / quality / speed table
from it; files are cached, so a second run only scores and times.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from course_utils.backends import gguf_file, llamacpp


@dataclass(frozen=True)
class TypeResult:
    """One llama.cpp type on the course model: file, quality against the F16 file, speed.

    ``comparison`` is against the F16 GGUF's own logits on the same windows (so F16 scores KL 0);
    ``quantize_s`` is 0 for the F16 file itself and close to 0 for a file reused from the cache.
    """

    type_name: str
    path: Path
    summary: gguf_file.GGUFSummary
    comparison: object  # course_utils.evaluate.Comparison
    quantize_s: float
    speed: llamacpp.LlamaCppSpeed | None


def type_ladder(
    type_names: list[str],
    windows,
    prompt: str | None = None,
    src: str | Path | None = None,
    n_tokens: int = 32,
    repeats: int = 2,
    imatrix: dict[str, np.ndarray] | None = None,
    progress: bool = False,
) -> list[TypeResult]:
    """Quantize ``src`` (a float GGUF; default: the course model's F16 export) to each type, then score
    every file on ``windows`` against the F16 logits and, with a ``prompt``, time prompt processing and
    generation (all files take turns, see :func:`course_utils.backends.llamacpp.decode_speeds`). The first
    row is F16 itself.
    """
    from course_utils import evaluate

    src = Path(src) if src is not None else gguf_file.export_f16_gguf()
    paths, seconds = {"F16": src}, {"F16": 0.0}
    for name in type_names:
        start = time.perf_counter()
        paths[name] = llamacpp.quantize_gguf(src, type_name=name, imatrix=imatrix)
        seconds[name] = time.perf_counter() - start
    with llamacpp.LlamaCppLogits(src, n_ctx=windows.window) as f16:
        reference = evaluate.reference_log_probs(f16, windows)
    comparisons = {}
    for name, path in paths.items():
        if progress:
            print(f"scoring {name} ...", flush=True)
        with llamacpp.LlamaCppLogits(path, n_ctx=windows.window) as model:
            comparisons[name] = evaluate.compare(model, reference, windows)
    speeds = llamacpp.decode_speeds(list(paths.values()), prompt, n_tokens=n_tokens, repeats=repeats) if prompt else {}
    return [
        TypeResult(name, path, gguf_file.gguf_summary(path), comparisons[name], seconds[name], speeds.get(path))
        for name, path in paths.items()
    ]
