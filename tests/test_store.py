"""Saving and restoring quantized layers (safetensors, no pickle), and the cache keyed by what made them."""

import copy

import pytest
import torch
from safetensors import safe_open
from torch import nn

from course_utils.quant import gptq, store
from course_utils.quant.contract import Report
from course_utils.quant.linear import QuantLinear, RTNConfig, RTNReport, quantize_model

pytestmark = pytest.mark.usefixtures("one_cpu_thread")  # tiny models: see conftest


def _tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 64, bias=False))


def test_save_and_load_reproduce_the_outputs(tmp_path):
    model = _tiny()
    fresh = copy.deepcopy(model)
    quantize_model(model, RTNConfig(bits=4, group_size=32))
    path = store.save(model, tmp_path / "q.safetensors", {"note": "x"})
    assert store.load(fresh, path) == {"note": "x"}
    assert isinstance(fresh[0], QuantLinear) and isinstance(fresh[2], QuantLinear)
    x = torch.randn(5, 64)
    assert torch.equal(fresh(x), model(x))


def test_the_file_is_plain_safetensors_with_a_json_document(tmp_path):
    model = _tiny()
    quantize_model(model, RTNConfig(bits=4, group_size=32))
    path = store.save(model, tmp_path / "q.safetensors")
    with safe_open(str(path), "pt") as f:  # readable by any safetensors reader: tensors only
        keys = set(f.keys())
    # no norms here, and a QuantLinear keeps its bias as a buffer: no one-dimensional parameters are left
    assert keys == {"layers.0.packed", "layers.0.scales", "layers.0.bias", "layers.2.packed", "layers.2.scales"}
    document, _ = store.read(path)
    assert document["layers"]["0"] == {"shape": [32, 64], "bits": 4, "group_size": 32, "symmetric": True, "dtype": "float32"}
    (tmp_path / "foreign.safetensors").write_bytes(b"")
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ValueError, match="not written by course_utils.quant.store"):
        store.read(tmp_path / "foreign.safetensors")


def test_mismatched_model_is_refused(tmp_path):
    model = _tiny()
    quantize_model(model, RTNConfig(bits=4, group_size=32))
    path = store.save(model, tmp_path / "q.safetensors")
    with pytest.raises(ValueError, match="not in this model"):
        store.load(nn.Sequential(nn.Linear(64, 32)), path)
    other = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(32, 64))
    with pytest.raises(ValueError, match="layer 0"):
        store.load(other, path)
    with pytest.raises(ValueError, match="no QuantLinear"):
        store.save(_tiny(), tmp_path / "none.safetensors")


def _cached(model, description, calls, code=("course_utils.quant.linear",)):
    def quantize(m):
        calls.append(1)
        return quantize_model(m, RTNConfig(bits=4, group_size=32))
    return store.cached_quantize(model, description, quantize, code,
                                 restore=lambda fields: RTNReport.from_dict(fields, RTNConfig))


def test_cache_runs_once_per_description():
    calls = []
    a, b, c = _tiny(), _tiny(), _tiny()
    report, cached = _cached(a, {"bits": 4}, calls)
    assert not cached and len(calls) == 1 and report.n_layers == 2
    report2, cached = _cached(b, {"bits": 4}, calls)
    assert cached and len(calls) == 1 and report2 == report  # the same report, read back: config, seconds, bytes
    x = torch.randn(3, 64)
    assert torch.equal(a(x), b(x))
    _cached(c, {"bits": 3}, calls)
    assert len(calls) == 2


def test_a_change_to_the_quantizer_source_is_a_cache_miss(monkeypatch):
    """Edit the RTN code (as a fix would) and the old weights must not come back."""
    from course_utils import cache

    calls = []
    _cached(_tiny(), {"bits": 4}, calls)
    _cached(_tiny(), {"bits": 4}, calls)
    assert len(calls) == 1
    real = cache._sources

    def edited(name):  # the same modules, rtn.py's source one comment longer
        return tuple((m, digest + ("-edited" if m == "course_utils.quant.rtn" else "")) for m, digest in real(name))

    monkeypatch.setattr(cache, "_sources", edited)
    _cached(_tiny(), {"bits": 4}, calls)
    assert len(calls) == 2, "a quantizer whose source changed must run again"


def test_a_subclass_report_comes_back_with_its_own_fields():
    calls = []

    def quantize(m):
        calls.append(1)
        base = quantize_model(m, RTNConfig(bits=4, group_size=32))
        return gptq.GPTQReport(gptq.GPTQConfig(group_size=32), base.n_layers, 100, 0.5, base.bytes_before,
                               base.bytes_after, ("note",), {"a": 1.0}, {"a": 0.01})

    restore = lambda fields: gptq.GPTQReport.from_dict(fields, gptq.GPTQConfig)  # noqa: E731
    first, _ = store.cached_quantize(_tiny(), {"k": 1}, quantize, ("course_utils.quant.gptq",), restore)
    again, cached = store.cached_quantize(_tiny(), {"k": 1}, quantize, ("course_utils.quant.gptq",), restore)
    assert cached and len(calls) == 1 and again == first
    assert isinstance(again, Report) and again.losses == {"a": 1.0} and again.config == gptq.GPTQConfig(group_size=32)
    assert again.notes == ("note",)
