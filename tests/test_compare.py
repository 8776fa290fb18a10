"""course_utils.compare and compare_report: the table's rows, its outputs, and rows that cannot run."""

import pytest

from course_utils import compare, compare_report
from course_utils.backends.common import BackendUnavailableError
from course_utils.compare import Row, RowSpec


def _rows():
    return [
        Row("float", "fp32", "transformers", 538e6, 541e6, 32.0, 32.0, 11.73, 0.0, 0.0, 1.0, 214, 25.9, 0.0, "the reference"),
        Row("RTN", "int4 g64", "course_utils.quant.rtn", 170e6, 175e6, 10.1, 4.25, 18.3, 56.0, 0.53, 0.66, 91, 9.7, 0.5),
        Row("AWQ", "int4 g64", "course_utils.quant.awq", 170e6, 175e6, 10.1, 4.25, 14.1, 20.5, 0.20, 0.76, 90, 9.6, 40.0),
        Row("GGUF", "Q4_0", "llama.cpp", 88e6, 88e6, 5.35, 4.5, 15.0, 28.1, 0.30, 0.73, 800, 205.0, 0.9),
        Row("GPTQ", "int4 g64", "GPTQModel", note="not run: RuntimeError: gptqmodel is not installed"),
    ]


def test_markdown_has_a_line_per_row_and_blank_cells_for_what_was_not_measured():
    text = compare_report.to_markdown(_rows())
    lines = text.strip().splitlines()
    assert len(lines) == 2 + 5 and lines[0].count("|") == len(compare_report.COLUMNS) + 1
    assert "| GPTQ | int4 g64 | GPTQModel |  |  |" in text and "not run: RuntimeError" in text
    assert "| AWQ | int4 g64 | course_utils.quant.awq | 170.0 | 175.0 | 10.10 | 4.25 | 14.10 | +20.5 | 0.200 | 76.0 |" in text


def test_speeds_come_from_turns_with_their_quartiles():
    calls = []

    def timer(name, values):
        it = iter(values)
        return lambda: calls.append(name) or next(it)

    a, b = Row("float", "fp32", "t"), Row("RTN", "int4 g64", "c")
    compare.time_in_turns([(a, timer("a", [(100, 10), (120, 30), (110, 20)])), (b, timer("b", [(200, 40), (180, 60), (190, 50)]))], rounds=3)
    assert calls == ["a", "b"] * 3                       # one of each per round, in turn
    assert (a.prompt_tps, a.gen_tps) == (110, 20) and (b.prompt_tps, b.gen_tps) == (190, 50)   # medians
    assert a.gen_tps_q1 < a.gen_tps < a.gen_tps_q3 and b.gen_tps_q1 < b.gen_tps < b.gen_tps_q3
    assert "| 20.0 | " in compare_report.to_markdown([a]) and f"{a.gen_tps_q1:.1f}-{a.gen_tps_q3:.1f}" in compare_report.to_markdown([a])


def test_csv_round_trips_every_field(tmp_path):
    path = compare_report.to_csv(_rows(), tmp_path / "t.csv")
    back = compare_report.read_csv(path)
    assert back == _rows()


def test_pareto_front_keeps_rows_no_other_row_beats_on_both_axes():
    front = compare_report.pareto(_rows(), "linear_bits")
    assert [r.method for r in front] == ["AWQ", "float"]    # RTN and Q4_0 are beaten by AWQ at equal or fewer bits
    fast = compare_report.pareto(_rows(), "gen_tps", lower_x_is_better=False)
    assert [r.method for r in fast] == ["GGUF", "float"]   # float is faster than AWQ here and exact


def _png_size(path):
    """(width, height) from a PNG's header: the 8-byte signature, then the IHDR chunk (length, type, width, height)."""
    import struct

    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", f"{path.name} is not a PNG"
    return struct.unpack(">II", head[16:24])


def test_plots_and_files_are_written(tmp_path):
    files = compare_report.write(_rows(), tmp_path / "out")
    assert {p.name for p in files.values()} == {"compare.csv", "compare.md", "quality_vs_size.png", "quality_vs_speed.png"}
    assert all(p.parent == tmp_path / "out" for p in files.values())
    assert compare_report.read_csv(files["csv"]) == _rows()
    assert files["md"].read_text() == compare_report.to_markdown(_rows())
    # an 8 x 5 inch figure saved at 110 dots per inch: 880 x 550 pixels
    assert _png_size(files["size"]) == _png_size(files["speed"]) == (880, 550)


def test_plot_draws_every_measured_row_and_the_front(tmp_path):
    import matplotlib.pyplot as plt

    from dataclasses import replace

    sources = {"float": ("transformers", "library"), "AWQ": ("course_utils", "from scratch")}
    rows = [replace(r, library=sources[r.method][0], source=sources[r.method][1]) if r.method in sources else r for r in _rows()]
    fig = compare_report.plot(rows, "linear_bits", "bits")
    try:
        ax = fig.axes[0]
        # one scatter per method that has measured rows (GPTQ did not run); KL drawn at 1e-4 at least (float: 0)
        points = {ax.get_legend_handles_labels()[1][i]: [tuple(p) for p in c.get_offsets()] for i, c in enumerate(ax.collections)}
        assert points == {"float": [(32.0, 1e-4)], "RTN": [(4.25, 0.53)], "AWQ": [(4.25, 0.20)], "GGUF": [(4.5, 0.30)]}
        (front,) = ax.lines
        assert list(zip(front.get_xdata(), front.get_ydata())) == [(4.25, 0.20), (32.0, 1e-4)]
        # the front's rows labelled with the first word of the precision, and who computed the weights
        assert [t.get_text() for t in ax.texts] == ["AWQ int4 (own)", "float fp32 (transformers)"]
        assert ax.get_yscale() == "log" and ax.get_xlabel() == "bits"
    finally:
        plt.close(fig)


def test_a_row_that_cannot_run_stays_in_the_table_with_its_reason(monkeypatch):
    def unavailable(ctx):
        raise BackendUnavailableError("GPTQModel could not be imported (no module named gptqmodel)")

    monkeypatch.setattr(compare, "row_specs", lambda bits: [RowSpec("GPTQ", "int4 g64", "GPTQModel", "library", unavailable)])
    rows = compare.torch_rows(ctx=None, progress=None)
    assert len(rows) == 1 and not rows[0].measured
    assert (rows[0].implementation, rows[0].library, rows[0].source) == ("GPTQModel", "GPTQModel", "library")
    assert rows[0].note == "not run: GPTQModel could not be imported (no module named gptqmodel)"


def test_a_bug_in_the_course_code_is_not_hidden_as_a_row_that_did_not_run(monkeypatch):
    def broken(ctx):
        raise IndexError("a bug in a builder")

    monkeypatch.setattr(compare, "row_specs", lambda bits: [RowSpec("RTN", "int4 g64", "course_utils", "from scratch", broken)])
    with pytest.raises(IndexError, match="a bug in a builder"):
        compare.torch_rows(ctx=None, progress=None)


def test_the_command_line_writes_the_table(monkeypatch, tmp_path, capsys):
    from course_utils.__main__ import main

    monkeypatch.setattr(compare, "run", lambda model, device, only, library_bits: _rows())
    assert main(["compare", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "compare.csv").is_file() and "5 rows" in capsys.readouterr().out


def test_every_method_of_the_course_has_a_row():
    specs = compare.row_specs()
    assert {s.method for s in specs} == {"float", "RTN", "LLM.int8", "NF4", "GPTQ", "AWQ"}
    assert {(s.library, s.source) for s in specs if s.method == "GPTQ"} == {("course_utils", "from scratch"), ("GPTQModel", "library")}
    assert len(specs) == 14 and set(compare.GGUF_TYPES) >= {"Q8_0", "Q6_K", "Q4_K_M", "Q4_0", "Q2_K"}
    # the libraries at 3 bits too, on request
    both = compare.row_specs(library_bits=(4, 3))
    assert len(both) == 16 and {(s.precision, s.library) for s in both} - {(s.precision, s.library) for s in specs} == {
        ("int3 g64", "GPTQModel"), ("int3 g64", "llm-compressor")}


@pytest.mark.slow
def test_gguf_rows_for_another_model_say_why_they_are_not_run():
    class Ctx:
        model_name = "someone/model"

    rows = compare.gguf_rows(Ctx())
    assert rows and all("default model's GGUF export" in r.note for r in rows)
