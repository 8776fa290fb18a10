"""``python -m course_utils bench``: decode speed of every way the course runs the model, side by side.

One process, one prompt (64 tokens), 128 greedy new tokens, taking turns: each round times every row once,
so a busy moment of a shared machine slows all rows alike; a row's figure is the median of its rounds,
with the spread (first and third quartile) beside it. Rows:

- PyTorch through the course's low-overhead loop (:mod:`course_utils.decode`): the float model in fp32
  and bf16; the course's own int8 (RTN per channel) and int4 (RTN, GPTQ, AWQ; symmetric, groups of 32,
  the 16-level grid) on torch's weight-only kernels (engine ``pytorch``); the same int8 and RTN int4 layers
  dequantized at every call (engine ``pytorch-dequantize``, 32 new tokens: they are slow, and GPTQ and AWQ
  store the same layout, so they dequantize at the same speed);
- llama.cpp: its own F16, Q8_0 and Q4_0 files (made from the F16 export), and the course's RTN, GPTQ and
  AWQ models exported bit for bit to Q4_0 (:mod:`course_utils.backends.gguf_export`).

The quantized PyTorch rows keep the output projection (tied to the embedding: 49,152 x 576 in the default
model, a fifth of its float bytes) in int8 per row on the int8 kernel; llama.cpp's Q4_0 gives it Q8_0.
The ``head`` column says which. Each row's speed of light is the bandwidth measured in the same rounds
divided by the bytes one decode step reads at least (:meth:`decode.Decoder.bytes_per_token`: stored weights,
for a dequantizing layer also its float weight written and read back, and the KV cache at the mean context).
torch's int4 kernel keeps a bf16 scale and a bf16 zero per group, hence 5 bits per weight on the kernel rows
against 4.5 for the course's own layout. ``kl``: mean KL divergence to the float model on one evaluation
window (512 tokens), in nats per token, of exactly what is timed: the PyTorch rows through the same decoder
(dtype, kernels, head), the llama.cpp rows through llama.cpp (which also rounds activations to 8 bits for its
Q4_0 and Q8_0 dot products).
"""

from __future__ import annotations

import contextlib
import copy
import json
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from course_utils import config, data, decode, evaluate, models, timing
from course_utils.quant import kernel_path

PROMPT_TOKENS = 64
NEW_TOKENS = 128
DEQUANTIZE_NEW_TOKENS = 32
ROUNDS = 5
GROUP = 32  # llama.cpp's block: the course's int4 rows can be exported to Q4_0 exactly


@dataclass(frozen=True)
class BenchRow:
    """One measured way to decode. Speeds in tokens/s (median over rounds, quartiles beside), bytes per
    decode step, ``kl`` in nats per token (``None``: not measured)."""

    name: str
    method: str  # float, rtn, gptq, awq
    precision: str  # fp32, bf16, int8, int4, or a GGUF type such as Q4_0
    engine: str  # pytorch, pytorch-dequantize, llama.cpp
    quantized_by: str  # course, llama.cpp, or none
    head: str  # what the output projection is stored as
    bits_per_weight: float  # of the decoder layers' Linear weights, scales included
    bytes_per_token: int
    new_tokens: int
    tokens_per_s: float
    tokens_per_s_q1: float
    tokens_per_s_q3: float
    speed_of_light_tokens_per_s: float
    kl: float | None

    @property
    def share_of_light(self) -> float:
        return self.tokens_per_s / self.speed_of_light_tokens_per_s


@dataclass
class _Candidate:
    name: str
    method: str
    precision: str
    engine: str
    quantized_by: str
    head: str
    bits_per_weight: float
    bytes_per_token: int
    new_tokens: int
    measure: Callable[[], float]
    kl: float | None = None


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """Median, first and third quartile of ``values``."""
    result = timing.BenchmarkResult(tuple(values))
    return result.median_s, result.q1_s, result.q3_s


def take_turns(measures: dict[str, Callable[[], float]], rounds: int = ROUNDS,
               after_round: Callable[[int], None] | None = None) -> dict[str, list[float]]:
    """Call every measurement once per round, in turn, ``rounds`` times: name -> the ``rounds`` values.

    Each measurement returns a figure (tokens/s, GB/s); taking turns spreads a shared machine's busy moments
    over all of them instead of penalising whichever ran during one."""
    values: dict[str, list[float]] = {name: [] for name in measures}
    for r in range(rounds):
        for name, measure in measures.items():
            values[name].append(measure())
        if after_round is not None:
            after_round(r)
    return values


def speeds_in_turns(models_by_name: dict[str, torch.nn.Module], tokenizer, prompt: str, new_tokens: int = 32,
                    rounds: int = 3) -> dict[str, tuple[float, float, float]]:
    """Decode tokens/s of each model (the fastest way the course runs it, :func:`decode.fastest_decoder`),
    taking turns: name -> (median, first quartile, third quartile) over ``rounds``."""
    measures = {}
    for name, m in models_by_name.items():
        timer = decode.speed_timer(m, tokenizer, prompt, new_tokens)
        measures[name] = lambda t=timer: t(new_tokens).decode_tokens_per_s
    return {name: quartiles(values) for name, values in take_turns(measures, rounds).items()}


def _pytorch(name: str, method: str, precision: str, model: torch.nn.Module, prompt: torch.Tensor,
             dtype: torch.dtype, head: str, engine: str, new_tokens: int, windows, reference) -> _Candidate:
    """A PyTorch row through :class:`decode.Decoder`, its KL scored on the very same decoder."""
    window = windows.input_ids.shape[1]
    decoder = decode.Decoder(model, dtype=dtype, max_tokens=max(window, prompt.shape[0] + new_tokens + 8), head=head)
    kl = evaluate.compare(decode.DecoderLogits(decoder), reference, windows).kl_mean
    context = prompt.shape[0] + new_tokens // 2  # the mean number of earlier tokens whose keys and values a step reads
    return _Candidate(name, method, precision, engine, "none" if method == "float" else "course", decoder.head_label,
                      decoder.linear_bits_per_weight(), decoder.bytes_per_token(context), new_tokens,
                      lambda: decoder.speed(prompt, new_tokens, warmup_tokens=2).decode_tokens_per_s, kl)


def _llamacpp(name: str, method: str, path: Path, prompt_text: str, quantized_by: str, new_tokens: int) -> _Candidate:
    from course_utils.backends import gguf_file, llamacpp
    from course_utils.quant import gguf_blocks

    summary = gguf_file.gguf_summary(path)
    layer_type = max((t for t in summary.tensor_types if t != "F32"), key=summary.tensor_types.get)
    bits = 16.0 if layer_type == "F16" else gguf_blocks.block_format(layer_type).bits_per_weight
    head = next(t.tensor_type.name for t in gguf_file.read(path).tensors if t.name == "token_embd.weight")
    return _Candidate(name, method, layer_type, "llama.cpp", quantized_by, head, bits, summary.bytes_per_token,
                      new_tokens, lambda: llamacpp.decode_speed(path, prompt_text, new_tokens, repeats=1).gen_tokens_per_s)


def _kl_gguf(path: Path, reference, windows) -> float:
    from course_utils.backends import llamacpp

    with llamacpp.LlamaCppLogits(path) as m:
        return evaluate.compare(m, reference, windows).kl_mean


def _own_models(model: torch.nn.Module, model_name: str, tokenizer, only: set[str] | None,
                progress: Callable[[str], None]) -> dict[str, torch.nn.Module]:
    """The course's quantized copies of ``model``: int8 per channel, and int4 g32 (16-level grid) by RTN,
    GPTQ and AWQ (cached: :func:`course_utils.quant.methods.quantized_copy`)."""
    from course_utils.quant import awq, gptq, methods
    from course_utils.quant.linear import RTNConfig

    calibration = data.calibration_batches(tokenizer, n_samples=8, seq_len=512)
    configs = {"rtn int8": (RTNConfig(8, "channel"), None),
               "rtn int4": (RTNConfig(4, GROUP, full_grid=True), None),
               "gptq int4": (gptq.GPTQConfig(4, GROUP, full_grid=True), calibration),
               "awq int4": (awq.AWQConfig(4, GROUP, full_grid=True), calibration)}
    out = {}
    for key, (cfg, cal) in configs.items():
        if only is not None and key not in only:
            continue
        start = time.perf_counter()
        out[key], _, cached = methods.quantized_copy(model, cfg, model_name, cal)
        progress(f"{cfg.label()}: {'cached' if cached else f'quantized in {time.perf_counter() - start:.0f} s'}")
    return out


ROW_KEYS = ("float fp32", "float bf16", "rtn int8", "rtn int4", "gptq int4", "awq int4", "rtn int8 dequantize",
            "rtn int4 dequantize", "llama.cpp F16", "llama.cpp Q8_0", "llama.cpp Q4_0", "rtn int4 GGUF",
            "gptq int4 GGUF", "awq int4 GGUF")


def run(model_name: str | None = None, rounds: int = ROUNDS, new_tokens: int = NEW_TOKENS,
        only: list[str] | None = None, progress: Callable[[str], None] = print) -> list[BenchRow]:
    """Build every row of :data:`ROW_KEYS` (or those in ``only``), time them in ``rounds`` turns, and return
    the rows. The default model only for the GGUF rows (their metadata comes from its GGUF)."""
    from course_utils.backends import gguf_export, gguf_file, llamacpp

    name = config.model_name(model_name)
    keys = [k for k in ROW_KEYS if only is None or k in only]
    unknown = sorted(set(only or ()) - set(ROW_KEYS))
    if unknown:
        raise ValueError(f"unknown bench rows {unknown}; choose from {list(ROW_KEYS)}")
    model, tokenizer = models.load_model(name, "cpu")
    text_ids = tokenizer(data.evaluation_text(), return_tensors="pt").input_ids[0]
    prompt = text_ids[:PROMPT_TOKENS]
    prompt_text = tokenizer.decode(prompt)
    windows = data.evaluation_windows(tokenizer, max_windows=1)
    reference = evaluate.reference_log_probs(model, windows)
    needed = {k.replace(" dequantize", "").replace(" GGUF", "") for k in keys}
    own = _own_models(model, name, tokenizer, needed, progress)
    short = DEQUANTIZE_NEW_TOKENS if new_tokens >= DEQUANTIZE_NEW_TOKENS else new_tokens
    candidates: list[_Candidate] = []
    gguf_dir = config.cache_dir() / "bench"
    gguf_dir.mkdir(parents=True, exist_ok=True)
    f16 = None
    for key in keys:
        method = key.split()[0] if not key.startswith("llama.cpp") else "float" if key.endswith("F16") else "rtn"
        if key in ("float fp32", "float bf16"):
            dtype = torch.float32 if key.endswith("fp32") else torch.bfloat16
            c = _pytorch(key, "float", key.split()[1], model, prompt, dtype, "float", "pytorch", new_tokens, windows, reference)
        elif key.endswith("dequantize"):
            m = copy.deepcopy(own[key.replace(" dequantize", "")])
            kernel_path.set_engine(m, "dequantize")
            c = _pytorch(key, method, key.split()[1], m, prompt, torch.float32, "int8", "pytorch-dequantize", short,
                         windows, reference)
        elif key.startswith("llama.cpp"):
            f16 = f16 or gguf_file.export_f16_gguf()
            kind = key.split()[1]
            path = f16 if kind == "F16" else llamacpp.quantize_gguf(f16, type_name=kind)
            c = _llamacpp(key, method, path, prompt_text, "none" if kind == "F16" else "llama.cpp", new_tokens)
            c.kl = _kl_gguf(path, reference, windows)
        elif key.endswith("GGUF"):
            f16 = f16 or gguf_file.export_f16_gguf()
            path = gguf_export.export_gguf(own[key.replace(" GGUF", "")], gguf_dir / f"{key.replace(' ', '-')}.gguf", f16)
            c = _llamacpp(key, method, path, prompt_text, "course", new_tokens)
            c.kl = _kl_gguf(path, reference, windows)
        else:
            c = _pytorch(key, method, key.split()[1], own[key], prompt, torch.bfloat16, "int8", "pytorch", new_tokens,
                         windows, reference)
        candidates.append(c)
        progress(f"ready: {key}")
    measures = {"bandwidth": lambda: timing.measure_bandwidth(repeat=5).gbps, **{c.name: c.measure for c in candidates}}
    speeds = take_turns(measures, rounds, lambda r: progress(f"round {r + 1}/{rounds} done"))
    bandwidth = statistics.median(speeds["bandwidth"])
    rows = []
    for c in candidates:
        median, q1, q3 = quartiles(speeds[c.name])
        rows.append(BenchRow(c.name, c.method, c.precision, c.engine, c.quantized_by, c.head, round(c.bits_per_weight, 3),
                             c.bytes_per_token, c.new_tokens, median, q1, q3,
                             timing.speed_of_light_tokens_per_s(c.bytes_per_token, bandwidth), c.kl))
    return rows


@contextlib.contextmanager
def quiet():
    """Hide the kernel fallback warnings (the table says which kernel each row runs) and library progress bars."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kernel_path.KernelFallbackWarning)
        yield


def to_markdown(rows: list[BenchRow]) -> str:
    """The rows as a Markdown table, fastest engines' figures with their spread."""
    lines = ["| row | engine | quantized by | bits/wt | head | MB/token | tokens/s (IQR) | speed of light | share | KL |",
             "|---|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        kl = "" if r.kl is None else f"{r.kl:.4f}"
        lines.append(f"| {r.name} | {r.engine} | {r.quantized_by} | {r.bits_per_weight:.2f} | {r.head} | "
                     f"{r.bytes_per_token / 1e6:.0f} | {r.tokens_per_s:.1f} ({r.tokens_per_s_q1:.1f}-{r.tokens_per_s_q3:.1f}) | "
                     f"{r.speed_of_light_tokens_per_s:.0f} | {r.share_of_light:.0%} | {kl} |")
    return "\n".join(lines)


def write(rows: list[BenchRow], folder: str | Path) -> Path:
    """``<folder>/bench.json``: a list of the rows as objects (keys of :class:`BenchRow`); returns its path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "bench.json"
    path.write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")
    return path


def read(path: str | Path) -> list[BenchRow]:
    """Rows written by :func:`write`."""
    return [BenchRow(**row) for row in json.loads(Path(path).read_text())]
