"""Execute the lessons headlessly into ``build/`` and write a results summary (``python -m course_utils run``).

Each notebook has a code cell tagged ``parameters`` that reads ``$COURSE_MODEL`` and ``$COURSE_DEVICE``.
The runner sets both, inserts a cell tagged ``injected-parameters`` after it (so the executed copy
shows which model and device it ran on), executes the notebook with its own kernel, and collects the
figures lessons hand to :func:`course_utils.results.record` into ``build/summary.md``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from course_utils import config, results


@dataclass
class LessonRun:
    """Outcome of one executed notebook: its name, wall time in seconds, and the error if it failed."""

    name: str
    seconds: float
    error: str | None = None


def lesson_paths(folder: Path, only: list[str] | None = None) -> list[Path]:
    """Numbered notebooks in ``folder``; ``only`` keeps those whose name starts with one of the prefixes."""
    paths = sorted(folder.glob("[0-9][0-9]_*.ipynb"))
    if only:
        paths = [p for p in paths if any(p.name.startswith(o) for o in only)]
    return paths


def inject_parameters(nb, model: str, device: str) -> None:
    """Insert an ``injected-parameters`` cell after the cell tagged ``parameters`` (or first)."""
    import nbformat

    index = next((i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])), -1)
    cell = nbformat.v4.new_code_cell(f"# Injected by `python -m course_utils run`\nMODEL = {model!r}\nDEVICE = {device!r}")
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(index + 1, cell)


def execute(path: Path, out: Path, model: str, device: str, timeout: int = 900) -> LessonRun:
    """Run one notebook top to bottom and save the executed copy to ``out`` (even when a cell fails)."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(path, as_version=4)
    inject_parameters(nb, model, device)
    start = time.perf_counter()
    error = None
    try:
        NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    except CellExecutionError as err:
        error = str(err).strip().splitlines()[-1] if str(err).strip() else "cell failed"
    seconds = time.perf_counter() - start
    out.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, out)
    return LessonRun(path.stem, seconds, error)


def plan_device(model: str, requested: str | None) -> tuple[str, list[str]]:
    """The device a run will use, and what the run must tell the user before it starts.

    ``requested`` ("cpu", "cuda", "cuda:1", "auto" or None for ``$COURSE_DEVICE``): a CUDA device without a
    CUDA GPU falls back to the CPU, with a message saying why. On a GPU, the model's size is estimated from
    its config (:func:`course_utils.models.parameters_from_config`) and compared with the memory of all
    visible GPUs before anything is loaded: if its 16-bit weights (times ``hardware.GPU_HEADROOM``) do not fit,
    ``ValueError`` says how much it needs, how much there is, and which precision would fit.
    """
    import torch

    from course_utils import hardware, memory, models

    messages = []
    choice = (requested or os.environ.get("COURSE_DEVICE", "").strip() or "auto").lower()
    if choice.startswith("cuda") and not torch.cuda.is_available():
        messages.append(f"--device {choice}: torch sees no CUDA GPU (no GPU, no driver, or a CPU build of torch); "
                        "running every lesson on the CPU instead")
        choice = "cpu"
    device = config.device(choice)
    if device.startswith("cuda"):
        try:
            n_params = models.parameters_from_config(model)
        except models.ModelNotAvailableError as err:
            messages.append(f"could not check that {model} fits on the GPU before loading it: {err}")
            return device, messages
        total = sum(g.memory_gib for g in hardware.gpus()) * 2**30
        need = memory.memory_estimate(n_params, "bf16") * hardware.GPU_HEADROOM
        if need > total:
            fits = [f for f in ("int8", "int4") if memory.memory_estimate(n_params, f, None if f == "int8" else 128) * hardware.GPU_HEADROOM <= total]
            hint = (f"stored in {fits[0].upper()} it would fit: a pre-quantized checkpoint of it, or a smaller model"
                    if fits else "even at 4 bits it would not: choose a smaller model or more GPUs")
            raise ValueError(
                f"{model} has {memory.params_label(n_params)} parameters: about {need / 1e9:.0f} GB in 16-bit with "
                f"working room ({hardware.GPU_HEADROOM}x the weights), more than the {total / 1e9:.0f} GB of the "
                f"{len(hardware.gpus())} visible GPU(s); {hint}"
            )
        messages.append(f"{model}: {memory.params_label(n_params)} parameters, about {need / 1e9:.1f} GB in 16-bit "
                        f"with working room, on {total / 1e9:.0f} GB of GPU memory")
    return device, messages


def summary_markdown(runs: list[LessonRun], records: list[dict], model: str, device: str) -> str:
    """The results report: one row per lesson (time, status), then each lesson's recorded figures."""
    lines = [
        "# Quantization, Measured: results on this machine",
        "",
        f"Model: `{model}` ({config.DEFAULT_MODEL_LABEL if model == config.DEFAULT_MODEL else 'Hugging Face'}); device: `{device}`.",
        "",
        "| lesson | time (s) | status |",
        "|---|---:|---|",
    ]
    lines += [f"| {r.name} | {r.seconds:.1f} | {'ok' if r.error is None else 'FAILED: ' + r.error} |" for r in runs]
    lines += ["", "## Measured figures", "", "| lesson | figure | value | unit |", "|---|---|---:|---|"]
    for rec in records:
        value = rec["value"]
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        lines.append(f"| {rec['lesson']} | {rec['name']} | {shown} | {rec['unit']} |")
    return "\n".join(lines) + "\n"


def run_course(
    model: str | None = None, device: str | None = None, out_dir: Path | None = None, only: list[str] | None = None
) -> list[LessonRun]:
    """Execute every lesson (or those in ``only``) into ``out_dir/lessons`` and write ``out_dir/summary.md``."""
    model = config.model_name(model)
    device, messages = plan_device(model, device)
    for line in messages:
        print(line, flush=True)
    root = config.repo_root()
    out_dir = Path(out_dir or root / "build")
    results_file = out_dir / "results.jsonl"
    out_dir.mkdir(parents=True, exist_ok=True)
    results_file.unlink(missing_ok=True)
    runs = []
    with config.restored_environ("COURSE_MODEL", "COURSE_DEVICE", "COURSE_RESULTS"):  # the kernels inherit them
        os.environ.update(COURSE_MODEL=model, COURSE_DEVICE=device, COURSE_RESULTS=str(results_file))
        for path in lesson_paths(root / "lessons", only):
            run = execute(path, out_dir / "lessons" / path.name, model, device)
            print(f"{run.name}: {run.seconds:.1f} s {'ok' if run.error is None else 'FAILED: ' + run.error}", flush=True)
            runs.append(run)
    (out_dir / "summary.md").write_text(summary_markdown(runs, results.load(results_file), model, device))
    return runs
