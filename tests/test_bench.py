"""The bench: turns, rows, table and JSON; one small real run on the default model."""

import json

import pytest

from course_utils import bench


def _row(**changes):
    fields = dict(name="rtn int4", method="rtn", precision="int4", engine="pytorch", quantized_by="course", head="int8",
                  bits_per_weight=4.5, bytes_per_token=90_000_000, new_tokens=128, tokens_per_s=50.0, tokens_per_s_q1=48.0,
                  tokens_per_s_q3=52.0, speed_of_light_tokens_per_s=200.0, kl=0.05)
    return bench.BenchRow(**{**fields, **changes})


def test_take_turns_calls_each_measure_once_per_round_in_order():
    calls = []
    measures = {name: (lambda name=name: calls.append(name) or len(calls)) for name in ("a", "b")}
    values = bench.take_turns(measures, rounds=3)
    assert calls == ["a", "b"] * 3
    assert values == {"a": [1, 3, 5], "b": [2, 4, 6]}


def test_rows_round_trip_through_json_with_the_documented_keys(tmp_path):
    rows = [_row(), _row(name="float fp32", method="float", precision="fp32", quantized_by="none", kl=None)]
    path = bench.write(rows, tmp_path)
    assert path.name == "bench.json"
    stored = json.loads(path.read_text())
    for key in ("name", "method", "precision", "engine", "quantized_by", "bits_per_weight", "tokens_per_s",
                "speed_of_light_tokens_per_s", "kl"):
        assert key in stored[0]
    assert bench.read(path) == rows
    assert rows[0].share_of_light == pytest.approx(0.25)


def test_the_table_shows_speed_spread_share_and_kl():
    table = bench.to_markdown([_row(), _row(name="float fp32", kl=None)])
    assert "| rtn int4 | pytorch | course | 4.50 | int8 | 90 | 50.0 (48.0-52.0) | 200 | 25% | 0.0500 |" in table
    assert table.splitlines()[-1].endswith("| 25% |  |")


def test_unknown_rows_are_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="choose from"):
        bench.run(only=["float fp64"])


@pytest.mark.slow
def test_a_small_run_measures_float_own_int4_and_its_export():
    pytest.importorskip("llama_cpp")
    rows = bench.run(rounds=2, new_tokens=8, only=["float fp32", "rtn int4", "rtn int4 GGUF"], progress=lambda _: None)
    by_name = {r.name: r for r in rows}
    assert set(by_name) == {"float fp32", "rtn int4", "rtn int4 GGUF"}
    assert by_name["rtn int4"].precision == "int4" and by_name["rtn int4"].head == "int8"
    # torch's int4 kernel keeps a bf16 scale and a bf16 zero per group of 32: 4 + 32 / 32 bits
    assert by_name["rtn int4"].bits_per_weight == pytest.approx(5.0)
    assert by_name["rtn int4 GGUF"].precision == "Q4_0" and by_name["rtn int4 GGUF"].head == "Q8_0"
    assert by_name["float fp32"].kl == 0.0 and 0 < by_name["rtn int4"].kl < 1
    # the exported file holds the same weights: its KL to the float model is close to the PyTorch row's
    assert by_name["rtn int4 GGUF"].kl == pytest.approx(by_name["rtn int4"].kl, rel=0.25)
    assert all(r.tokens_per_s > 0 and r.tokens_per_s_q1 <= r.tokens_per_s <= r.tokens_per_s_q3 for r in rows)


def test_speeds_in_turns_times_each_model_through_the_lean_loop(tiny_llama):
    class Tok:
        def __call__(self, text, return_tensors=None):
            import types
            import torch
            return types.SimpleNamespace(input_ids=torch.arange(6)[None])

    speeds = bench.speeds_in_turns({"a": tiny_llama(), "b": tiny_llama(seed=1)}, Tok(), "six tokens", new_tokens=3, rounds=2)
    assert set(speeds) == {"a", "b"}
    assert all(q1 <= median <= q3 and median > 0 for median, q1, q3 in speeds.values())
