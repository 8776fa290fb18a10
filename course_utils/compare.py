"""Every method of the course on this machine and model, measured alike: ``python -m course_utils compare``.

One row per method and precision: the float model; round-to-nearest at 8, 4 and 3 bits; LLM.int8 and NF4
(the course's own layers and bitsandbytes); GPTQ and AWQ at 4 and 3 bits from scratch, and at 4 bits through
GPTQModel and llm-compressor (``library_bits=(4, 3)`` adds their 3-bit rows); and llama.cpp's GGUF types.
Every row is judged on the same evaluation windows against the same float reference (perplexity, KL, top-1
agreement), timed with the same prompt, and sized in memory and on disk. The decoding rows are timed in
turns (:data:`ROUNDS` rounds, each timing every row once, so a busy moment of a shared machine slows all rows
alike): a speed is the median of its rounds, with the first and third quartile beside it. A row that cannot
run here stays in the table with the reason.

Nothing is copied from the lessons: each row calls the module the lesson taught (``quant.methods`` for the
course's own RTN, LLM.int8, NF4, GPTQ and AWQ, the slow ones cached; the adapters in ``backends``).
Quantized models come from those caches when a lesson already made them, so after lessons 06-09 a run
mostly measures. The settings are the lessons' own: groups of 64, 8 calibration samples of 512 tokens
(4 x 256 for llm-compressor, as in lesson 08), 4 evaluation windows of 512 tokens.

:func:`run` returns the rows (:class:`Row`, plain data); :mod:`course_utils.compare_report` writes them as
``compare.csv``, ``compare.md`` and two plots (quality against size, quality against generation speed) into
a folder (``build/compare`` from the command line).
"""

from __future__ import annotations

import gc
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from course_utils import bench, cache, config, data, decode, evaluate, memory, models
from course_utils.quant import kernel_path

PROMPT = "Explain in one paragraph why a smaller model file can generate text faster."
NEW_TOKENS = 16
ROUNDS = 3
SLOW_TOKENS_PER_S = 10.0  # a PyTorch row slower than this in a probe generates SLOW_NEW_TOKENS per turn
SLOW_NEW_TOKENS = 4
GROUP = 64
GGUF_TYPES = ("F16", "Q8_0", "Q6_K", "Q4_K_M", "Q4_0", "Q2_K")  # F16: llama.cpp's own baseline for speed


@dataclass
class Row:
    """One measured (or skipped) configuration. Sizes in bytes; ``bits_per_weight`` = memory bytes x 8 /
    the float model's parameter count (embedding and norms included, as they stay in memory too);
    ``linear_bits``: bits per weight of the decoder layers' Linear weights alone, scales included (what
    the quantization method decides; the embedding is stored differently by each runtime);
    speeds in tokens/s, medians over :data:`ROUNDS` rounds taken in turn with the other rows (prompt: one
    batched pass over :data:`PROMPT`; generation: :data:`NEW_TOKENS` greedy steps, :data:`SLOW_NEW_TOKENS` for
    a PyTorch row under :data:`SLOW_TOKENS_PER_S`, ``gen_tps_q1`` and
    ``gen_tps_q3`` its first and third quartile; PyTorch rows through :func:`course_utils.decode.fastest_decoder`,
    the course's own int4/int8 layers on their kernels); ``quantize_s``: the quantizer's run time when it ran (loading included for the
    libraries, read from their cache when reused). ``note``: why a row was skipped, or what to know.
    ``library``: what computed the quantized weights ("course_utils", "bitsandbytes", "GPTQModel",
    "llm-compressor", "llama.cpp", "transformers" for the float model); ``source``: "from scratch" (the
    course's own code) or "library". ``implementation``: the same with versions, for people to read."""

    method: str
    precision: str
    implementation: str
    memory_bytes: int | None = None
    disk_bytes: int | None = None
    bits_per_weight: float | None = None
    linear_bits: float | None = None
    ppl: float | None = None
    ppl_delta_pct: float | None = None
    kl_mean: float | None = None
    top1: float | None = None
    prompt_tps: float | None = None
    gen_tps: float | None = None
    quantize_s: float | None = None
    note: str = ""
    library: str = ""
    source: str = ""
    gen_tps_q1: float | None = None
    gen_tps_q3: float | None = None

    @property
    def label(self) -> str:
        return f"{self.method} {self.precision} ({self.implementation})"

    @property
    def measured(self) -> bool:
        return self.ppl is not None


@dataclass
class Context:
    """What every row needs: the float model and its tokenizer, the texts, the reference, the device."""

    model_name: str
    device: str
    model: torch.nn.Module
    tokenizer: object
    windows: data.TokenWindows
    reference: evaluate.Reference
    calibration: torch.Tensor
    small_calibration: torch.Tensor
    n_params: int
    linear_params: int
    other_bytes: int


def checkpoint_linear_bytes(folder: str | Path) -> int:
    """Bytes the decoder layers' quantized Linears take in a checkpoint (packed codes, scales, zero points,
    group indices), read from the safetensors headers without loading any tensor."""
    from safetensors import safe_open

    parts = ("weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx", "qweight", "scales", "qzeros", "g_idx")
    total = 0
    for file in Path(folder).glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            for key in f.keys():
                if ".layers." in key and key.rsplit(".", 1)[-1] in parts:
                    t = f.get_slice(key)
                    total += int(torch.tensor(t.get_shape()).prod()) * _ITEMSIZE[t.get_dtype()]
    return total


_ITEMSIZE = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def folder_bytes(path: str | Path) -> int:
    """Bytes of a file, or of every file under a folder."""
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------ row builders


@dataclass
class Built:
    """What a builder hands back: the model to measure (answers ``model(input_ids=...)``), the quantizer's
    seconds, bytes on disk (None: nothing is written), bytes in memory, the implementation with its
    version, and a note."""

    model: torch.nn.Module
    seconds: float
    disk_bytes: int | None
    memory_bytes: int
    implementation: str
    note: str


@dataclass(frozen=True)
class RowSpec:
    """One PyTorch row to measure: its ``method`` and ``precision``, the ``library`` that quantizes it and
    whether that is the course's own code ("from scratch") or a library's, and ``build(ctx) -> Built``,
    which raises :class:`~course_utils.backends.common.BackendUnavailableError` when its library cannot run
    here (the only error the table turns into a "not run" row)."""

    method: str
    precision: str
    library: str
    source: str
    build: Callable[[Context], Built]


def _float(ctx: Context) -> Built:
    disk = folder_bytes(models.model_dir(ctx.model_name))
    return Built(ctx.model, 0.0, disk, models.model_bytes(ctx.model), f"transformers {_version('transformers')}", "the reference")


def _ours(cfg) -> Callable[[Context], Built]:
    def build(ctx: Context) -> Built:
        from course_utils.quant import gptq_format, methods

        cal = ctx.calibration if cfg.needs_calibration else None
        m, report, _ = methods.quantized_copy(ctx.model, cfg, ctx.model_name, cal)
        description = {"model": ctx.model_name, "config": repr(cfg), "calibration": None if cal is None else methods.calibration_id(cal)}
        out = cache.entry("compare", f"{ctx.model_name.replace('/', '--')}-{cfg.method}", description,
                          code=(methods.METHODS[type(cfg)][0].__name__, gptq_format.__name__))
        if not (out / "config.json").is_file():
            gptq_format.save_gptq_checkpoint(m, ctx.tokenizer, out)
        return Built(m, report.seconds, folder_bytes(out), models.model_bytes(m), f"course_utils.quant.{cfg.method}",
                     "on disk: GPTQ checkpoint layout")
    return build


def _own_layers(cfg) -> Callable[[Context], Built]:
    def build(ctx: Context) -> Built:
        from course_utils.quant import methods

        m, report, _ = methods.quantized_copy(ctx.model, cfg, ctx.model_name)
        return Built(m, report.seconds, None, models.model_bytes(m), f"course_utils.quant.{cfg.method}",
                     "quantized when loaded: no file format")
    return build


def _bnb(bits: int) -> Callable[[Context], Built]:
    def build(ctx: Context) -> Built:
        from course_utils.backends import bnb
        from course_utils.backends.common import BackendUnavailableError

        problem = next((p for p in bnb.available().values() if p), None)
        if problem:
            raise BackendUnavailableError(problem)
        start = time.perf_counter()
        m, _ = bnb.load_quantized(bnb.BnbSetting(bits=bits), ctx.model_name, ctx.device)
        return Built(m, time.perf_counter() - start, None, bnb.model_bytes(m), f"bitsandbytes {bnb.version()}",
                     "quantized when loaded (time includes loading)")
    return build


def _gptqmodel(bits: int) -> Callable[[Context], Built]:
    def build(ctx: Context) -> Built:
        from course_utils.backends import gptqmodel as lib
        from course_utils.backends.common import BackendUnavailableError

        problem = lib.available()["gptqmodel"] or lib.available()["optimum"]
        if problem:
            raise BackendUnavailableError(problem)
        folder, seconds = lib.quantize(models.model_dir(ctx.model_name), bits=bits, group_size=GROUP, act_order=False,
                                       sym=True, damp=0.01, calibration=ctx.calibration)
        m, _ = lib.load_quantized(folder, device=ctx.device, backend="gptq_torch" if ctx.device == "cpu" else "auto")
        return Built(m, seconds, folder_bytes(folder), models.model_bytes(m), f"GPTQModel {lib.version()}",
                     "time includes loading and saving")
    return build


def _llmcompressor(bits: int) -> Callable[[Context], Built]:
    def build(ctx: Context) -> Built:
        from course_utils.backends import llmcompressor as lib
        from course_utils.backends.common import BackendUnavailableError

        problem = lib.available()["llmcompressor"]
        if problem:
            raise BackendUnavailableError(problem)
        folder, seconds = lib.awq_quantize(models.model_dir(ctx.model_name), bits=bits, group_size=GROUP, sym=True,
                                           calibration=ctx.small_calibration, duo_scaling=False)
        m, _ = lib.load_quantized(folder, device=ctx.device)
        return Built(m, seconds, folder_bytes(folder), ctx.other_bytes + checkpoint_linear_bytes(folder),
                     f"llm-compressor {lib.version()}",
                     "4 x 256 calibration tokens; time includes loading and saving; scored dequantized, "
                     "memory as if kept compressed")
    return build


def _version(dist: str) -> str:
    from importlib import metadata

    return metadata.version(dist)


def row_specs(library_bits: tuple[int, ...] = (4,)) -> list[RowSpec]:
    """Every PyTorch row (GPTQModel's and llm-compressor's at the ``library_bits`` only: each takes a minute
    or more to quantize on a CPU); the GGUF rows come from :func:`gguf_rows`."""
    from course_utils.quant import awq, gptq, llm_int8, nf4
    from course_utils.quant.linear import RTNConfig

    g, own = f"g{GROUP}", "from scratch"
    specs = [RowSpec("float", "fp32", "transformers", "library", _float)]
    specs += [RowSpec("RTN", "int8 per channel", "course_utils", own, _ours(RTNConfig(bits=8, group_size="channel")))]
    specs += [RowSpec("RTN", f"int{b} {g}", "course_utils", own, _ours(RTNConfig(bits=b, group_size=GROUP))) for b in (4, 3)]
    specs += [RowSpec("LLM.int8", "int8 + fp outliers", "course_utils", own, _own_layers(llm_int8.Int8Config())),
              RowSpec("LLM.int8", "int8 + fp outliers", "bitsandbytes", "library", _bnb(8)),
              RowSpec("NF4", "nf4 blocks of 64", "course_utils", own, _own_layers(nf4.NF4Config("nf4", 64))),
              RowSpec("NF4", "nf4 blocks of 64", "bitsandbytes", "library", _bnb(4))]
    for b in (4, 3):
        specs += [RowSpec("GPTQ", f"int{b} {g}", "course_utils", own, _ours(gptq.GPTQConfig(bits=b, group_size=GROUP)))]
        specs += [RowSpec("GPTQ", f"int{b} {g}", "GPTQModel", "library", _gptqmodel(b))] if b in library_bits else []
    for b in (4, 3):
        specs += [RowSpec("AWQ", f"int{b} {g}", "course_utils", own, _ours(awq.AWQConfig(bits=b, group_size=GROUP)))]
        specs += [RowSpec("AWQ", f"int{b} {g}", "llm-compressor", "library", _llmcompressor(b))] if b in library_bits else []
    return specs


# ------------------------------------------------------------------------------------ measuring


def context(model_name: str | None = None, device: str | None = None) -> Context:
    """Load the float model and prepare the texts and the reference (the lessons' settings)."""
    name, device = config.model_name(model_name), config.device(device)
    model, tok = models.load_model(name, device)
    windows = data.evaluation_windows(tok, max_windows=4)
    linear = [m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    linear_bytes = sum(w.numel() * w.element_size() for w in linear)
    return Context(name, device, model, tok, windows, evaluate.reference_log_probs(model, windows),
                   data.calibration_batches(tok, n_samples=8, seq_len=512),
                   data.calibration_batches(tok, n_samples=4, seq_len=256), models.count_parameters(model),
                   sum(w.numel() for w in linear), models.model_bytes(model) - linear_bytes)


Timer = Callable[[], tuple[float, float]]  # one timed generation: (prompt tokens/s, generation tokens/s)


def _timer(ctx: Context, m: torch.nn.Module) -> Timer:
    """One greedy generation of ``m`` after :data:`PROMPT`, the fastest way the course runs it: through
    :func:`decode.speed_timer` (the lean loop, or transformers for the libraries' layers).

    A short untimed probe first: a row slower than :data:`SLOW_TOKENS_PER_S` (a layer that rebuilds its
    float weight at every call, a library's CPU fallback) generates :data:`SLOW_NEW_TOKENS` per turn instead
    of :data:`NEW_TOKENS`. Its cost per token is fixed, so a few tokens measure it as well, in a fraction of
    the time."""
    generate = decode.speed_timer(m, ctx.tokenizer, PROMPT, NEW_TOKENS)
    slow = generate(3, 1).decode_tokens_per_s < SLOW_TOKENS_PER_S
    new_tokens, warmup = (SLOW_NEW_TOKENS, 1) if slow else (NEW_TOKENS, 4)

    def once() -> tuple[float, float]:
        speed = generate(new_tokens, warmup)
        return speed.prefill_tokens_per_s, speed.decode_tokens_per_s
    return once


def time_in_turns(timed: list[tuple[Row, Timer]], rounds: int = ROUNDS) -> None:
    """Time every row ``rounds`` times, taking turns (:func:`course_utils.bench.take_turns`), and set its
    ``prompt_tps`` and ``gen_tps`` to the medians and ``gen_tps_q1`` / ``gen_tps_q3`` to the quartiles."""
    with warnings.catch_warnings():  # a layer no kernel fits (3 bits) dequantizes: the row's note says so
        warnings.simplefilter("ignore", kernel_path.KernelFallbackWarning)
        values = bench.take_turns({str(k): timer for k, (_, timer) in enumerate(timed)}, rounds)
    for k, (row, _) in enumerate(timed):
        prompt, gen = zip(*values[str(k)])
        row.prompt_tps = bench.quartiles(list(prompt))[0]
        row.gen_tps, row.gen_tps_q1, row.gen_tps_q3 = bench.quartiles(list(gen))


def _score_torch(ctx: Context, row: Row, m: torch.nn.Module, memory_bytes: int) -> Timer:
    """Fill ``row``'s quality and sizes for ``m``; return its timer (``m`` stays alive inside it)."""
    c = evaluate.compare(m, ctx.reference, ctx.windows)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kernel_path.KernelFallbackWarning)
        timer = _timer(ctx, m)
    fallback = kernel_path.summary(m)
    if fallback["dequantize"]:
        row.note = "; ".join(filter(None, [row.note, f"no kernel: {next(iter(fallback['reasons']))}"]))
    row.memory_bytes, row.bits_per_weight = memory_bytes, memory.stored_bits_per_weight(memory_bytes, ctx.n_params)
    # the rest stays as in the float model
    row.linear_bits = memory.stored_bits_per_weight(memory_bytes - ctx.other_bytes, ctx.linear_params)
    row.ppl, row.ppl_delta_pct, row.kl_mean, row.top1 = c.ppl, c.ppl_delta_pct, c.kl_mean, c.top1
    return timer


def _torch_candidates(ctx: Context, only: list[str] | None, progress: Callable[[str], None] | None,
                      library_bits: tuple[int, ...]) -> list[tuple[Row, Timer | None]]:
    """Build and score every PyTorch row (or those whose method is in ``only``): each with its timer, ``None``
    for a row whose library cannot run here (it stays in the table with the reason; any other error is a bug
    and propagates)."""
    from transformers.utils import logging as hf_logging

    out, verbosity = [], hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # e.g. "loss_type=None ... unrecognized" when a library builds the model class
    try:
        for spec in row_specs(library_bits):
            if only and spec.method not in only:
                continue
            out.append(_torch_row(ctx, spec))
            if progress:
                progress(out[-1][0].label)
    finally:
        hf_logging.set_verbosity(verbosity)
    return out


def _torch_row(ctx: Context, spec: RowSpec) -> tuple[Row, Timer | None]:
    """Build and score one PyTorch row (a "not run" row, without timer, when its library cannot run here)."""
    from course_utils.backends.common import BackendUnavailableError

    row = Row(spec.method, spec.precision, spec.library, library=spec.library, source=spec.source)
    try:
        built = spec.build(ctx)
    except BackendUnavailableError as err:
        row.note = f"not run: {err}"
        return row, None
    row.implementation, row.note, row.quantize_s, row.disk_bytes = built.implementation, built.note, built.seconds, built.disk_bytes
    return row, _score_torch(ctx, row, built.model, built.memory_bytes)


def _timed(candidates: list[tuple[Row, Timer | None]], rounds: int) -> list[Row]:
    time_in_turns([(row, timer) for row, timer in candidates if timer is not None], rounds)
    gc.collect()
    return [row for row, _ in candidates]


def torch_rows(ctx: Context, only: list[str] | None = None, progress: Callable[[str], None] | None = None,
               library_bits: tuple[int, ...] = (4,), rounds: int = ROUNDS) -> list[Row]:
    """Measure every PyTorch row (or those whose method is in ``only``), timed in turns with each other."""
    return _timed(_torch_candidates(ctx, only, progress, library_bits), rounds)


def _gguf_candidates(ctx: Context, types: tuple[str, ...] = GGUF_TYPES) -> list[tuple[Row, Timer | None]]:
    """llama.cpp rows: the course model's F16 GGUF quantized to each type (cached files reused), scored on
    the same windows against the PyTorch reference, each with its timer."""
    from course_utils.backends import gguf_file, llamacpp

    implementation = "llama.cpp"
    problem = next((p for p in llamacpp.available().values() if p), None)
    if ctx.model_name != config.DEFAULT_MODEL:
        problem = "the GGUF rows use the default model's GGUF export (lesson 09); run them with --model default"
    if problem:
        return [(Row("GGUF", t, implementation, note=f"not run: {problem}", library="llama.cpp", source="library"), None)
                for t in types]
    implementation = f"llama.cpp (llama-cpp-python {_version('llama_cpp_python')})"
    src = gguf_file.export_f16_gguf()
    out = []
    for t in types:
        start = time.perf_counter()
        path = src if t == "F16" else llamacpp.quantize_gguf(src, type_name=t)
        seconds = time.perf_counter() - start
        reused = seconds < 0.1  # a cached file (or the F16 export): llama.cpp itself takes about a second here
        summary = gguf_file.gguf_summary(path)
        blocks = [t for t in gguf_file.anatomy(path).tensors if t.name.startswith("blk.") and len(t.shape) == 2]
        with llamacpp.LlamaCppLogits(path) as llm:
            c = evaluate.compare(llm, ctx.reference, ctx.windows)
        row = Row("GGUF", t, implementation, memory_bytes=summary.tensor_bytes, disk_bytes=folder_bytes(path),
                  bits_per_weight=memory.stored_bits_per_weight(summary.tensor_bytes, ctx.n_params),
                  linear_bits=memory.stored_bits_per_weight(sum(t.n_bytes for t in blocks), sum(t.n_elements for t in blocks)),
                  ppl=c.ppl, ppl_delta_pct=c.ppl_delta_pct, kl_mean=c.kl_mean, top1=c.top1,
                  quantize_s=None if reused else seconds, note="file reused from the cache" if reused else "",
                  library="llama.cpp", source="library")

        def once(path=path) -> tuple[float, float]:
            speed = llamacpp.decode_speed(path, PROMPT, n_tokens=NEW_TOKENS, repeats=1)  # loaded, one untimed run, one timed
            return speed.prompt_tokens_per_s, speed.gen_tokens_per_s
        out.append((row, once))
    return out


def gguf_rows(ctx: Context, types: tuple[str, ...] = GGUF_TYPES, rounds: int = ROUNDS) -> list[Row]:
    """The llama.cpp rows (:func:`_gguf_candidates`), timed in turns with each other."""
    return _timed(_gguf_candidates(ctx, types), rounds)


def run(model_name: str | None = None, device: str | None = None, only: list[str] | None = None,
        progress: Callable[[str], None] | None = print, library_bits: tuple[int, ...] = (4,),
        rounds: int = ROUNDS) -> list[Row]:
    """The whole table for this machine: PyTorch rows, then GGUF rows, all timed in turns together
    (``only``: method names to keep, e.g. ``["float", "RTN", "GGUF"]``; ``library_bits``: the bits at which
    GPTQModel and llm-compressor also quantize)."""
    ctx = context(model_name, device)
    candidates = _torch_candidates(ctx, only, progress, library_bits)
    if not only or "GGUF" in only:
        candidates += _gguf_candidates(ctx)
    if progress:
        progress(f"timing {sum(t is not None for _, t in candidates)} rows in {rounds} turns")
    return _timed(candidates, rounds)
