"""The outputs of ``python -m course_utils compare``: the table as markdown and CSV, the Pareto front, the plots.

:mod:`course_utils.compare` measures the rows (:class:`~course_utils.compare.Row`); this module only
presents them: :func:`to_markdown`, :func:`to_csv` / :func:`read_csv` (every field, unformatted),
:func:`pareto` (the rows no other row beats on both cost and KL), :func:`plot` and :func:`write` (all of
them into one folder).
"""

from __future__ import annotations

import csv
from dataclasses import asdict, fields
from pathlib import Path

from course_utils.compare import Row

COLUMNS = ("method", "precision", "implementation", "memory MB", "disk MB", "bits/weight", "Linear bits", "ppl", "delta %",
           "KL", "top-1 %", "prompt tok/s", "gen tok/s", "gen IQR", "quantize s", "note")


def _cells(row: Row) -> list[str]:
    def f(value, fmt):
        return "" if value is None else format(value, fmt)
    return [row.method, row.precision, row.implementation, f(row.memory_bytes and row.memory_bytes / 1e6, ".1f"),
            f(row.disk_bytes and row.disk_bytes / 1e6, ".1f"), f(row.bits_per_weight, ".2f"), f(row.linear_bits, ".2f"),
            f(row.ppl, ".2f"),
            f(row.ppl_delta_pct, "+.1f"), f(row.kl_mean, ".3f"), f(row.top1 and 100 * row.top1, ".1f"),
            f(row.prompt_tps, ".0f"), f(row.gen_tps, ".1f"),
            "" if row.gen_tps_q1 is None else f"{row.gen_tps_q1:.1f}-{row.gen_tps_q3:.1f}", f(row.quantize_s, ".1f"), row.note]


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
    numeric = {f.name for f in fields(Row) if "float" in str(f.type) or "int" in str(f.type)}
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
        who = "own" if r.source == "from scratch" else r.library
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
