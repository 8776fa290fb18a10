"""Every method of the course on this machine and model, measured alike: ``python -m course_utils compare``.

One row per method and precision: the float model; round-to-nearest at 8, 4 and 3 bits; LLM.int8 and NF4
(the course's own layers and bitsandbytes); GPTQ and AWQ at 4 and 3 bits (from scratch and through
GPTQModel and llm-compressor); and llama.cpp's GGUF types. Every row is judged on the same evaluation
windows against the same float reference (perplexity, KL, top-1 agreement), timed with the same prompt, and
sized in memory and on disk. A row that cannot run here stays in the table with the reason.

Nothing is copied from the lessons: each row calls the module the lesson taught (``quant.methods`` for RTN,
GPTQ and AWQ, cached by configuration; ``quant.llm_int8`` and ``quant.nf4``; the adapters in ``backends``).
Quantized models come from those caches when a lesson already made them, so after lessons 06-09 a run
mostly measures. The settings are the lessons' own: groups of 64, 8 calibration samples of 512 tokens
(4 x 256 for llm-compressor, as in lesson 08), 4 evaluation windows of 512 tokens.

:func:`run` returns the rows; :func:`write` saves ``compare.csv``, ``compare.md`` and two plots (quality
against size, quality against generation speed) into a folder (``build/compare`` from the command line).
"""

from __future__ import annotations

import copy
import csv
import gc
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from course_utils import config, data, evaluate, models, timing

PROMPT = "Explain in one paragraph why a smaller model file can generate text faster."
NEW_TOKENS = 16
GROUP = 64
GGUF_TYPES = ("F16", "Q8_0", "Q6_K", "Q4_K_M", "Q4_0", "Q2_K")  # F16: llama.cpp's own baseline for speed


@dataclass
class Row:
    """One measured (or skipped) configuration. Sizes in bytes; ``bits_per_weight`` = memory bytes x 8 /
    the float model's parameter count (embedding and norms included, as they stay in memory too);
    ``linear_bits``: bits per weight of the decoder layers' Linear weights alone, scales included (what
    the quantization method decides; the embedding is stored differently by each runtime);
    speeds in tokens/s (prompt: one batched pass over :data:`PROMPT`; generation: :data:`NEW_TOKENS`
    greedy steps); ``quantize_s``: the quantizer's run time when it ran (loading included for the
    libraries, read from their cache when reused). ``note``: why a row was skipped, or what to know."""

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
# Each returns (a model answering model(input_ids=...), quantize seconds, disk bytes, implementation, note).


def _float(ctx: Context):
    disk = folder_bytes(models.model_dir(ctx.model_name))
    return ctx.model, 0.0, disk, f"transformers {_version('transformers')}", "the reference"


def _ours(method: str, cfg) -> Callable:
    def build(ctx: Context):
        from course_utils.quant import gptq_format, methods

        cal = ctx.calibration if method != "rtn" else None
        m, extra, _ = methods.quantized_copy(ctx.model, method, cfg, ctx.model_name, cal)
        out = config.cache_dir() / "compare" / f"{ctx.model_name.replace('/', '--')}-{method}-{cfg.bits}-{cfg.group_size}"
        if not (out / "config.json").is_file():
            gptq_format.save_gptq_checkpoint(m, ctx.tokenizer, out)
        return m, extra["seconds"], folder_bytes(out), f"course_utils.quant.{method}", "on disk: GPTQ checkpoint layout"
    return build


def _own_layers(kind: str) -> Callable:
    def build(ctx: Context):
        from course_utils.quant import llm_int8, nf4

        m = copy.deepcopy(ctx.model)
        start = time.perf_counter()
        if kind == "int8":
            llm_int8.quantize_model_int8(m)
        else:
            nf4.quantize_model_4bit(m, "nf4", 64)
        module = "llm_int8" if kind == "int8" else "nf4"
        return m, time.perf_counter() - start, None, f"course_utils.quant.{module}", "quantized when loaded: no file format"
    return build


def _bnb(bits: int) -> Callable:
    def build(ctx: Context):
        from course_utils.backends import bnb

        if bnb.available()["bitsandbytes"]:
            raise RuntimeError("bitsandbytes is not installed")
        start = time.perf_counter()
        m, _ = bnb.load_quantized(bnb.BnbSetting(bits=bits), ctx.model_name, ctx.device)
        return (m, time.perf_counter() - start, None, f"bitsandbytes {bnb.version()}",
                "quantized when loaded (time includes loading)")
    return build


def _gptqmodel(bits: int) -> Callable:
    def build(ctx: Context):
        from course_utils.backends import gptqmodel as lib

        problem = lib.available()["gptqmodel"] or lib.available()["optimum"]
        if problem:
            raise RuntimeError(problem)
        logging.getLogger("torch._dynamo").setLevel(logging.ERROR)  # its torch layer recompiles per shape, noisily
        folder, seconds = lib.quantize(models.model_dir(ctx.model_name), bits=bits, group_size=GROUP, act_order=False,
                                       sym=True, damp=0.01, calibration=ctx.calibration)
        m, _ = lib.load_quantized(folder, device=ctx.device, backend="gptq_torch" if ctx.device == "cpu" else "auto")
        return m, seconds, folder_bytes(folder), f"GPTQModel {lib.version()}", "time includes loading and saving"
    return build


def _llmcompressor(bits: int) -> Callable:
    def build(ctx: Context):
        from course_utils.backends import llmcompressor as lib

        problem = lib.available()["llmcompressor"]
        if problem:
            raise RuntimeError(problem)
        folder, seconds = lib.awq_quantize(models.model_dir(ctx.model_name), bits=bits, group_size=GROUP, sym=True,
                                           calibration=ctx.small_calibration, duo_scaling=False)
        m, _ = lib.load_quantized(folder, device=ctx.device)
        m.compressed_bytes = ctx.other_bytes + checkpoint_linear_bytes(folder)
        return (m, seconds, folder_bytes(folder), f"llm-compressor {lib.version()}",
                "4 x 256 calibration tokens; time includes loading and saving; scored dequantized, "
                "memory as if kept compressed")
    return build


# builder factory -> the implementation a skipped row names
LIBRARIES = {"_bnb": "bitsandbytes", "_gptqmodel": "GPTQModel", "_llmcompressor": "llm-compressor"}


def _version(dist: str) -> str:
    from importlib import metadata

    return metadata.version(dist)


def row_specs() -> list[tuple[str, str, Callable]]:
    """(method, precision, builder) for every PyTorch row; the GGUF rows come from :func:`gguf_rows`."""
    from course_utils.quant import awq, gptq
    from course_utils.quant.linear import RTNConfig

    g = f"g{GROUP}"
    specs = [("float", "fp32", _float)]
    specs += [("RTN", "int8 per channel", _ours("rtn", RTNConfig(bits=8, group_size="channel")))]
    specs += [("RTN", f"int{b} {g}", _ours("rtn", RTNConfig(bits=b, group_size=GROUP))) for b in (4, 3)]
    specs += [("LLM.int8", "int8 + fp outliers", _own_layers("int8")), ("LLM.int8", "int8 + fp outliers", _bnb(8)),
              ("NF4", "nf4 blocks of 64", _own_layers("nf4")), ("NF4", "nf4 blocks of 64", _bnb(4))]
    for b in (4, 3):
        specs += [("GPTQ", f"int{b} {g}", _ours("gptq", gptq.GPTQConfig(bits=b, group_size=GROUP))),
                  ("GPTQ", f"int{b} {g}", _gptqmodel(b))]
    for b in (4, 3):
        specs += [("AWQ", f"int{b} {g}", _ours("awq", awq.AWQConfig(bits=b, group_size=GROUP))),
                  ("AWQ", f"int{b} {g}", _llmcompressor(b))]
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


def _measure_torch(ctx: Context, row: Row, m: torch.nn.Module, memory_bytes: int) -> None:
    c = evaluate.compare(m, ctx.reference, ctx.windows)
    speed = timing.decode_tokens_per_second(m, ctx.tokenizer, PROMPT, new_tokens=NEW_TOKENS)
    row.memory_bytes, row.bits_per_weight = memory_bytes, memory_bytes * 8 / ctx.n_params
    row.linear_bits = (memory_bytes - ctx.other_bytes) * 8 / ctx.linear_params  # the rest stays as in the float model
    row.ppl, row.ppl_delta_pct, row.kl_mean, row.top1 = c.ppl, c.ppl_delta_pct, c.kl_mean, c.top1
    row.prompt_tps, row.gen_tps = speed.prefill_tokens_per_s, speed.decode_tokens_per_s


def torch_rows(ctx: Context, only: list[str] | None = None, progress: Callable[[str], None] | None = None) -> list[Row]:
    """Measure every PyTorch row (or those whose method is in ``only``)."""
    from course_utils.backends import bnb

    rows = []
    for method, precision, build in row_specs():
        if only and method not in only:
            continue
        row = Row(method, precision, "")
        try:
            m, seconds, disk, implementation, note = build(ctx)
        except Exception as err:  # noqa: BLE001 - a row that cannot run is reported, and the table goes on
            row.implementation = LIBRARIES.get(build.__qualname__.split(".")[0], "")
            row.note = f"not run: {type(err).__name__}: {err}"
        else:
            row.implementation, row.note, row.quantize_s, row.disk_bytes = implementation, note, seconds, disk
            size = (bnb.model_bytes(m) if implementation.startswith("bitsandbytes")
                    else getattr(m, "compressed_bytes", None) or models.model_bytes(m))
            _measure_torch(ctx, row, m, size)
            if m is not ctx.model:
                del m
            gc.collect()
        rows.append(row)
        if progress:
            progress(row.label)
    return rows


def gguf_rows(ctx: Context, types: tuple[str, ...] = GGUF_TYPES) -> list[Row]:
    """llama.cpp rows: the course model's F16 GGUF quantized to each type (cached files reused), scored on
    the same windows against the PyTorch reference, and timed together (all files take turns)."""
    from course_utils.backends import gguf_file, llamacpp

    implementation = "llama.cpp"
    problem = next((p for p in llamacpp.available().values() if p), None)
    if ctx.model_name != config.DEFAULT_MODEL:
        problem = "the GGUF rows use the default model's GGUF export (lesson 09); run them with --model default"
    if problem:
        return [Row("GGUF", t, implementation, note=f"not run: {problem}") for t in types]
    implementation = f"llama.cpp (llama-cpp-python {_version('llama_cpp_python')})"
    src = gguf_file.export_f16_gguf()
    rows, paths = [], []
    for t in types:
        start = time.perf_counter()
        path = src if t == "F16" else llamacpp.quantize_gguf(src, type_name=t)
        seconds = time.perf_counter() - start
        reused = seconds < 0.1  # a cached file (or the F16 export): llama.cpp itself takes about a second here
        summary = gguf_file.gguf_summary(path)
        blocks = [t for t in gguf_file.anatomy(path).tensors if t.name.startswith("blk.") and len(t.shape) == 2]
        with llamacpp.LlamaCppLogits(path) as llm:
            c = evaluate.compare(llm, ctx.reference, ctx.windows)
        rows.append(Row("GGUF", t, implementation, memory_bytes=summary.tensor_bytes, disk_bytes=folder_bytes(path),
                        bits_per_weight=summary.tensor_bytes * 8 / ctx.n_params,
                        linear_bits=8 * sum(t.n_bytes for t in blocks) / sum(t.n_elements for t in blocks),
                        ppl=c.ppl, ppl_delta_pct=c.ppl_delta_pct,
                        kl_mean=c.kl_mean, top1=c.top1, quantize_s=None if reused else seconds,
                        note="file reused from the cache" if reused else ""))
        paths.append(path)
    speeds = llamacpp.decode_speeds(paths, PROMPT, n_tokens=NEW_TOKENS, repeats=2)
    for row, path in zip(rows, paths):
        row.prompt_tps, row.gen_tps = speeds[path].prompt_tokens_per_s, speeds[path].gen_tokens_per_s
    return rows


def run(model_name: str | None = None, device: str | None = None, only: list[str] | None = None,
        progress: Callable[[str], None] | None = print) -> list[Row]:
    """The whole table for this machine: PyTorch rows, then GGUF rows (``only``: method names to keep,
    e.g. ``["float", "RTN", "GGUF"]``)."""
    ctx = context(model_name, device)
    rows = torch_rows(ctx, only, progress)
    if not only or "GGUF" in only:
        rows += gguf_rows(ctx)
    return rows


# ------------------------------------------------------------------------------------ output

COLUMNS = ("method", "precision", "implementation", "memory MB", "disk MB", "bits/weight", "Linear bits", "ppl", "delta %",
           "KL", "top-1 %", "prompt tok/s", "gen tok/s", "quantize s", "note")


def _cells(row: Row) -> list[str]:
    def f(value, fmt):
        return "" if value is None else format(value, fmt)
    return [row.method, row.precision, row.implementation, f(row.memory_bytes and row.memory_bytes / 1e6, ".1f"),
            f(row.disk_bytes and row.disk_bytes / 1e6, ".1f"), f(row.bits_per_weight, ".2f"), f(row.linear_bits, ".2f"),
            f(row.ppl, ".2f"),
            f(row.ppl_delta_pct, "+.1f"), f(row.kl_mean, ".3f"), f(row.top1 and 100 * row.top1, ".1f"),
            f(row.prompt_tps, ".0f"), f(row.gen_tps, ".1f"), f(row.quantize_s, ".1f"), row.note]


def to_markdown(rows: list[Row]) -> str:
    """The table as GitHub markdown."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in _cells(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[Row], path: str | Path) -> Path:
    """Every field of every row, unformatted, one line per row."""
    path = Path(path)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[f.name for f in fields(Row)])
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    return path


def read_csv(path: str | Path) -> list[Row]:
    """Rows written by :func:`to_csv`."""
    numeric = {f.name for f in fields(Row)} - {"method", "precision", "implementation", "note"}
    with Path(path).open() as fh:
        return [Row(**{k: (float(v) if v else None) if k in numeric else v for k, v in line.items()})
                for line in csv.DictReader(fh)]


def pareto(rows: list[Row], x: str, lower_x_is_better: bool = True) -> list[Row]:
    """The measured rows no other row beats on both ``x`` (a Row field) and KL: the best quality for the cost."""
    measured = [r for r in rows if r.measured and getattr(r, x) is not None]
    sign = 1 if lower_x_is_better else -1
    front = []
    for r in measured:
        beaten = any(sign * getattr(o, x) <= sign * getattr(r, x) and o.kl_mean <= r.kl_mean
                     and (sign * getattr(o, x) < sign * getattr(r, x) or o.kl_mean < r.kl_mean) for o in measured)
        if not beaten:
            front.append(r)
    return sorted(front, key=lambda r: sign * getattr(r, x))


def plot(rows: list[Row], x: str, xlabel: str, path: str | Path | None = None, lower_x_is_better: bool = True, log_x: bool = False):
    """KL against ``x`` for every measured row (one colour and marker per method), the Pareto front as a grey
    line with its rows labelled; saved to ``path`` if given."""
    import matplotlib.pyplot as plt

    methods = ["float", "RTN", "LLM.int8", "NF4", "GPTQ", "AWQ", "GGUF"]
    style = {m: (plt.get_cmap("tab10")(i), marker) for i, (m, marker) in enumerate(zip(methods, "*osD^vP"))}
    measured = [r for r in rows if r.measured and getattr(r, x) is not None and r.kl_mean is not None]
    fig, ax = plt.subplots(figsize=(8, 5))
    for method in methods:
        mine = [r for r in measured if r.method == method]
        if mine:
            colour, marker = style[method]
            ax.scatter([getattr(r, x) for r in mine], [max(r.kl_mean, 1e-4) for r in mine], color=colour,
                       marker=marker, s=50, label=method)
    front = pareto(rows, x, lower_x_is_better)
    ax.plot([getattr(r, x) for r in front], [max(r.kl_mean, 1e-4) for r in front], color="grey", lw=1, zorder=0)
    for r in front:
        who = r.implementation.split()[0].replace("course_utils.quant.", "own ")
        ax.annotate(f"{r.method} {r.precision.split()[0]} ({who})", (getattr(r, x), max(r.kl_mean, 1e-4)),
                    fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_yscale("log")
    if log_x:
        from matplotlib.ticker import ScalarFormatter

        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.set_xlabel(xlabel)
    ax.set_ylabel("mean KL to the float model (nats, log scale; float drawn at 1e-4)")
    ax.set_title("every measured row; the grey line and the labels: the Pareto front", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def write(rows: list[Row], out_dir: str | Path) -> dict[str, Path]:
    """``compare.csv``, ``compare.md``, ``quality_vs_size.png`` and ``quality_vs_speed.png`` in ``out_dir``."""
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"csv": to_csv(rows, out / "compare.csv"), "md": out / "compare.md",
             "size": out / "quality_vs_size.png", "speed": out / "quality_vs_speed.png"}
    files["md"].write_text(to_markdown(rows))
    for key, (x, label, lower, log_x) in {"size": ("linear_bits", "bits per weight of the Linear layers (log scale)", True, True),
                                         "speed": ("gen_tps", "generation tokens/s", False, True)}.items():
        plt.close(plot(rows, x, label, files[key], lower, log_x))
    return files
