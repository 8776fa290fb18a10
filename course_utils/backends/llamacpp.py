"""Running llama.cpp through ``llama-cpp-python``: quantize a GGUF, time it, score its logits.

(About 400 lines: quantizing, timing and scoring share how a model is opened, ``_open`` with the AMX
fallback below; the timing part moves out when ``python -m course_utils bench`` takes over decode timing.)

What it does:

- ``quantize_gguf``: make any llama.cpp type (Q8_0, Q4_0, Q4_K_M, ...) with
  ``llama_cpp.llama_model_quantize``, with an importance matrix if given;
- ``decode_speeds`` / ``decode_speed``: load GGUFs with llama.cpp and time prompt processing and greedy
  generation;
- ``LlamaCppLogits``: a GGUF that answers ``model(input_ids=ids).logits`` like a transformers model;
- ``extra_buffer_types_work``: whether llama.cpp's extra CPU buffer types (AMX tiles, repacked weight
  layouts) run on this machine. Some virtual machines advertise Intel AMX but fault on its instructions,
  and llama.cpp then dies with a segmentation fault on its first evaluation; there every model is opened
  with the extra buffer types off (plain CPU kernels: slower prompt processing, the same results).

Reading, summarising, exporting and rewriting GGUF files (with the ``gguf`` package, no llama.cpp) is
:mod:`course_utils.backends.gguf_file`; files are cached under ``<cache>/gguf``, named after their source
and type.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from course_utils.backends import gguf_file
from course_utils.backends.common import BackendUnavailableError  # noqa: F401 (re-exported for callers)
from course_utils.backends.common import import_library, import_status
from course_utils import cache
from course_utils.backends.gguf_file import INSTALL_HINT, _base_stem, _is_fresh, _made


def _import_llama_cpp():
    """``llama_cpp``, or :class:`BackendUnavailableError` saying how to install llama-cpp-python."""
    return import_library("llama_cpp", why=lambda err: (
        f"the Python package 'llama-cpp-python' is needed to quantize and run GGUF models but "
        f"could not be imported ({err}); {INSTALL_HINT}, or `pip install llama-cpp-python==0.3.36` "
        f"(it compiles llama.cpp: needs cmake and a C++ compiler, about 5 minutes)"))


def available() -> dict[str, str | None]:
    """Which of ``gguf`` and ``llama_cpp`` can be used: name -> None when importable, else the reason."""
    return {**gguf_file.available(), **import_status({"llama_cpp": _import_llama_cpp})}


# ---------------------------------------------------------------------------------------- quantize


def llama_ftype(type_name: str) -> int:
    """llama.cpp's file-type number for a type name such as ``"Q8_0"``, ``"Q4_K_M"`` or ``"F16"``."""
    llama_cpp = _import_llama_cpp()
    key = f"LLAMA_FTYPE_MOSTLY_{type_name.upper()}"
    if key == "LLAMA_FTYPE_MOSTLY_F32":
        return int(llama_cpp.LLAMA_FTYPE_ALL_F32)
    if not hasattr(llama_cpp, key):
        known = sorted(n[len("LLAMA_FTYPE_MOSTLY_") :] for n in dir(llama_cpp) if n.startswith("LLAMA_FTYPE_MOSTLY_"))
        raise ValueError(f"unknown llama.cpp type {type_name!r}; known types: {', '.join(known)}")
    return int(getattr(llama_cpp, key))


@contextlib.contextmanager
def _quiet_llama_log(verbose: bool):
    """Keep llama.cpp's log lines (printed through the 'llama-cpp-python' logger) out of the output."""
    logger = logging.getLogger("llama-cpp-python")
    old = logger.level
    if not verbose:
        logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()) if not verbose else contextlib.nullcontext():
            yield
    finally:
        logger.setLevel(old)


def quantize_gguf(src: str | Path | None, dst: str | Path | None = None, type_name: str = "Q8_0",
                  n_threads: int | None = None, overwrite: bool = False, verbose: bool = False,
                  imatrix: dict[str, np.ndarray] | None = None, allow_requantize: bool = False) -> Path:
    """Quantize a float GGUF to llama.cpp type ``type_name`` with ``llama_model_quantize``.

    ``src``: a float GGUF (``None``: the course model's F16 export from ``export_f16_gguf``).
    ``dst`` defaults to ``<cache>/gguf/<name>.<TYPE>.gguf`` (``<name>.<TYPE>.imatrix-<hash>.gguf`` with
    an importance matrix) and is reused when newer than ``src``.
    Tensors whose row length does not fit a type's block (e.g. 576 for K-quants, blocks of 256)
    get a fallback type chosen by llama.cpp; ``gguf_file.gguf_summary(dst)`` shows what each tensor got.
    ``imatrix``: GGUF tensor name -> importance of each input column (the mean squared activation that
    column sees, length = row length); llama.cpp then weighs each weight's rounding error by it.
    ``allow_requantize``: accept a source that is already quantized (see lesson 09 for why not to).
    """
    llama_cpp = _import_llama_cpp()
    src = Path(src) if src is not None else gguf_file.export_f16_gguf()
    if dst is None:
        tag = f".imatrix-{_imatrix_hash(imatrix)}" if imatrix else ""
        dst = gguf_file.gguf_cache_dir() / f"{_base_stem(src)}.{type_name.upper()}{tag}.gguf"
    dst = Path(dst)
    key = cache.key({"type": type_name.upper(), "src": src.name, "imatrix": _imatrix_hash(imatrix) if imatrix else None,
                     "allow_requantize": allow_requantize}, code=(__name__,), libraries={"llama_cpp": llama_cpp.__version__})
    if _is_fresh(dst, src, key) and not overwrite:
        return dst
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_ftype(type_name)
    params.nthread = n_threads or 0
    params.allow_requantize = allow_requantize
    keep_alive = None
    if imatrix:
        keep_alive = _imatrix_entries(llama_cpp, imatrix)
        params.imatrix = keep_alive[0]
    partial = dst.with_name(dst.name + ".partial")
    with _quiet_llama_log(verbose):
        code = llama_cpp.llama_model_quantize(str(src).encode(), str(partial).encode(), params)
    if code != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"llama.cpp could not quantize {src} to {type_name} (return code {code}); rerun with verbose=True")
    del keep_alive
    partial.replace(dst)
    return _made(dst, key)


def _imatrix_hash(imatrix: dict[str, np.ndarray]) -> str:
    import hashlib

    h = hashlib.sha256()
    for name in sorted(imatrix):
        h.update(name.encode() + np.ascontiguousarray(imatrix[name], dtype=np.float32).tobytes())
    return h.hexdigest()[:8]


def _imatrix_entries(llama_cpp, imatrix: dict[str, np.ndarray]):
    """A C array of ``llama_model_imatrix_data`` (name, float*, size), ended by an empty entry.

    Returns the array and the objects that own its memory; keep them alive during the call.
    """
    import ctypes

    arrays = {name: np.ascontiguousarray(v, dtype=np.float32) for name, v in imatrix.items()}
    names = {name: ctypes.c_char_p(name.encode()) for name in arrays}
    entries = (llama_cpp.llama_model_imatrix_data * (len(arrays) + 1))()
    for i, (name, values) in enumerate(arrays.items()):
        entries[i].name = names[name].value
        entries[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entries[i].size = values.size
    entries[len(arrays)].name = None
    entries[len(arrays)].size = 0
    return ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data)), (entries, arrays, names)


# ------------------------------------------------------------------------------------ decode speed


@dataclass(frozen=True)
class LlamaCppSpeed:
    """Prompt processing and generation speed of one GGUF under llama.cpp, over several runs.

    Wall-clock figures time the Python calls (``Llama.eval`` plus a greedy argmax over the
    logits): ``prompt_s`` and ``gen_s`` are medians over the timed runs, ``step_s`` holds every
    timed single-token step of every run. ``*_llama`` figures are llama.cpp's own counters (no
    Python) for the run with the median generation time. ``model_bytes`` and ``n_params`` are
    what llama.cpp reports for the loaded model.
    """

    path: Path
    n_threads: int
    prompt_tokens: int
    gen_tokens: int
    prompt_s: float
    gen_s: float
    step_s: tuple[float, ...]
    prompt_tokens_per_s_llama: float
    gen_tokens_per_s_llama: float
    model_bytes: int
    n_params: int

    @property
    def prompt_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prompt_s

    @property
    def gen_tokens_per_s(self) -> float:
        """Generated tokens per second of the median run."""
        return self.gen_tokens / self.gen_s

    @property
    def median_step_s(self) -> float:
        return statistics.median(self.step_s)

    def step_quantile_s(self, q: float) -> float:
        """The ``q`` quantile of single-step times (e.g. 0.1: the fastest tenth of steps).

        On a shared machine other programs slow some steps down; a low quantile estimates what
        the hardware does when left alone, the median what a user typically gets.
        """
        ordered = sorted(self.step_s)
        return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def default_threads() -> int:
    """Threads for llama.cpp: the CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_advertises_amx() -> bool:
    """Whether the CPU lists Intel AMX tile instructions (Linux ``/proc/cpuinfo``; False elsewhere)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_tile" in flags


_PROBE = """
import sys, llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=64, n_threads=1, verbose=False)
llm.eval(llm.tokenize(b"one two three"))
"""


@functools.lru_cache(maxsize=1)
def extra_buffer_types_work() -> bool:
    """Whether llama.cpp may use its extra CPU buffer types here. Only a CPU advertising AMX has been seen to
    fault, so only there is it tried, once per process, in a child process (a fault would kill this one) on
    the course's shipped GGUF; when that file is missing, AMX is assumed not to work."""
    if not cpu_advertises_amx():
        return True
    from course_utils import models

    try:
        gguf = models.default_gguf_path()
    except models.ModelNotAvailableError:
        return False
    try:
        probe = subprocess.run([sys.executable, "-c", _PROBE, str(gguf)], capture_output=True, timeout=300)
    except subprocess.TimeoutExpired:
        return False
    return probe.returncode == 0


@contextlib.contextmanager
def _without_extra_buffer_types(llama_cpp):
    """While open: every llama.cpp model is loaded with ``use_extra_bufts`` off (then the default comes back)."""
    low = llama_cpp.llama_cpp
    default = low.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    low.llama_model_default_params = params
    try:
        yield
    finally:
        low.llama_model_default_params = default


def _open(path: Path, n_ctx: int, n_threads: int, **options):
    """A quiet ``llama_cpp.Llama`` for ``path``: ``n_ctx`` tokens of context, evaluated in one batch (without
    the extra CPU buffer types where they fault: :func:`extra_buffer_types_work`)."""
    llama_cpp = _import_llama_cpp()
    safe = contextlib.nullcontext() if extra_buffer_types_work() else _without_extra_buffer_types(llama_cpp)
    with _quiet_llama_log(False), safe:
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=n_threads,
                               n_threads_batch=n_threads, verbose=False, **options)


def _close(llm) -> None:
    with _quiet_llama_log(False):
        llm.close()


class _Runner:
    """One loaded GGUF that can time a prompt plus greedy single-token steps."""

    def __init__(self, path: Path, n_threads: int, n_ctx: int):
        self.lib, self.path = _import_llama_cpp(), path
        self.llm = _open(path, n_ctx, n_threads, seed=0)
        self.n_vocab = self.llm.n_vocab()
        self.runs: list[tuple] = []

    def _greedy(self) -> int:
        logits = self.lib.llama_get_logits_ith(self.llm.ctx, -1)
        return int(np.ctypeslib.as_array(logits, shape=(self.n_vocab,)).argmax())

    def run(self, tokens: list[int], n_tokens: int) -> None:
        llm, lib = self.llm, self.lib
        llm.reset()
        lib.llama_perf_context_reset(llm.ctx)
        start = time.perf_counter()
        llm.eval(tokens)
        token = self._greedy()
        prompt_s = time.perf_counter() - start
        steps = []
        for _ in range(n_tokens):
            start = time.perf_counter()
            llm.eval([token])
            token = self._greedy()
            steps.append(time.perf_counter() - start)
        perf = lib.llama_perf_context(llm.ctx)
        self.runs.append((prompt_s, steps, perf.t_p_eval_ms, perf.n_p_eval, perf.t_eval_ms, perf.n_eval))

    def result(self, n_threads: int, n_prompt: int, n_tokens: int, skip: int) -> LlamaCppSpeed:
        timed = self.runs[skip:]
        median_run = sorted(timed, key=lambda run: sum(run[1]))[len(timed) // 2]
        _, _, t_p_ms, n_p, t_e_ms, n_e = median_run
        return LlamaCppSpeed(
            path=self.path, n_threads=n_threads, prompt_tokens=n_prompt, gen_tokens=n_tokens,
            prompt_s=statistics.median(run[0] for run in timed), gen_s=statistics.median(sum(run[1]) for run in timed),
            step_s=tuple(step for run in timed for step in run[1]),
            prompt_tokens_per_s_llama=n_p / (t_p_ms / 1e3) if t_p_ms > 0 else float("nan"),
            gen_tokens_per_s_llama=n_e / (t_e_ms / 1e3) if t_e_ms > 0 else float("nan"),
            model_bytes=int(self.lib.llama_model_size(self.llm.model)),
            n_params=int(self.lib.llama_model_n_params(self.llm.model)),
        )

    def close(self) -> None:
        _close(self.llm)


def decode_speeds(paths: list[str | Path], prompt: str, n_tokens: int = 64, n_threads: int | None = None,
                  repeats: int = 3, n_ctx: int = 512) -> dict[Path, LlamaCppSpeed]:
    """Time llama.cpp on several GGUFs, taking turns, so that a busy moment affects them alike.

    Each run evaluates the prompt in one batch, then ``n_tokens`` greedy single-token steps; every
    step feeds the most likely token (end-of-text included), so every run does the same work.
    One untimed run per model warms up (memory-mapped pages, thread pool), then ``repeats``
    rounds in turn. All models stay loaded meanwhile. ``n_threads`` defaults to the usable cores.
    """
    n_threads = n_threads or default_threads()
    runners = []
    try:
        for path in paths:
            runners.append(_Runner(Path(path), n_threads, n_ctx))
        tokens = runners[0].llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
        if len(tokens) + n_tokens > n_ctx:
            raise ValueError(f"prompt ({len(tokens)} tokens) + {n_tokens} new tokens exceed n_ctx={n_ctx}")
        for _ in range(1 + repeats):
            for runner in runners:
                runner.run(tokens, n_tokens)
        return {runner.path: runner.result(n_threads, len(tokens), n_tokens, skip=1) for runner in runners}
    finally:
        for runner in runners:
            runner.close()


def decode_speed(path: str | Path, prompt: str, n_tokens: int = 64, n_threads: int | None = None,
                 repeats: int = 3, n_ctx: int = 512) -> LlamaCppSpeed:
    """Time llama.cpp on one GGUF: the prompt in one batch, then ``n_tokens`` greedy steps (see ``decode_speeds``)."""
    return decode_speeds([path], prompt, n_tokens, n_threads, repeats, n_ctx)[Path(path)]


# ------------------------------------------------------------------------------------ logits


class LlamaCppLogits:
    """A GGUF run by llama.cpp that answers like a transformers model: ``model(input_ids=ids).logits``.

    So :func:`course_utils.evaluate.perplexity` and :func:`course_utils.evaluate.compare` score a
    llama.cpp model on exactly the same token windows as a PyTorch one. Each row of ``input_ids`` is
    evaluated from an empty context in one batch (``n_ctx`` must hold a row). Use as a context
    manager, or call ``close()``, to free the model.
    """

    def __init__(self, path: str | Path, n_ctx: int = 512, n_threads: int | None = None):
        self.path, self.n_ctx = Path(path), n_ctx
        self.llm = _open(self.path, n_ctx, n_threads or default_threads(), logits_all=True)

    def __call__(self, input_ids):
        import types

        import torch

        ids = torch.as_tensor(input_ids)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.shape[1] > self.n_ctx:
            raise ValueError(f"rows of {ids.shape[1]} tokens do not fit n_ctx={self.n_ctx}; open the model with a larger n_ctx")
        rows = []
        for row in ids.tolist():
            self.llm.reset()
            self.llm.eval(row)
            rows.append(torch.from_numpy(np.array(self.llm.scores[: len(row)], dtype=np.float32)))
        return types.SimpleNamespace(logits=torch.stack(rows))

    def close(self) -> None:
        _close(self.llm)

    def __enter__(self) -> "LlamaCppLogits":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
