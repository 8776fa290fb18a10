"""Saving and restoring quantized layers, and the configuration-keyed cache."""

import copy

import pytest
import torch
from torch import nn

from course_utils.quant import store
from course_utils.quant.linear import QuantLinear, RTNConfig, quantize_model


def _tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 64, bias=False))


def test_save_and_load_reproduce_the_outputs(tmp_path):
    model = _tiny()
    fresh = copy.deepcopy(model)
    quantize_model(model, RTNConfig(bits=4, group_size=32))
    path = store.save(model, tmp_path / "q.pt", {"note": "x"})
    assert store.load(fresh, path) == {"note": "x"}
    assert isinstance(fresh[0], QuantLinear) and isinstance(fresh[2], QuantLinear)
    x = torch.randn(5, 64)
    assert torch.equal(fresh(x), model(x))


def test_mismatched_model_is_refused(tmp_path):
    model = _tiny()
    quantize_model(model, RTNConfig(bits=4, group_size=32))
    path = store.save(model, tmp_path / "q.pt")
    with pytest.raises(ValueError, match="not in this model"):
        store.load(nn.Sequential(nn.Linear(64, 32)), path)
    other = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(32, 64))
    with pytest.raises(ValueError, match="layer 0"):
        store.load(other, path)
    with pytest.raises(ValueError, match="no QuantLinear"):
        store.save(_tiny(), tmp_path / "none.pt")


def test_cache_runs_once_per_description(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path))
    calls = []

    def quantize(m):
        calls.append(1)
        return quantize_model(m, RTNConfig(bits=4, group_size=32))

    a, b, c = _tiny(), _tiny(), _tiny()
    extra, cached = store.cached_quantize(a, {"bits": 4}, quantize)
    assert not cached and extra["seconds"] >= 0 and len(calls) == 1
    extra2, cached = store.cached_quantize(b, {"bits": 4}, quantize)
    assert cached and len(calls) == 1 and extra2["seconds"] == extra["seconds"]
    x = torch.randn(3, 64)
    assert torch.equal(a(x), b(x))
    store.cached_quantize(c, {"bits": 3}, quantize)
    assert len(calls) == 2


def test_a_dataclass_report_is_kept_as_its_fields(tmp_path, monkeypatch):
    from course_utils.quant import gptq

    monkeypatch.setenv("COURSE_CACHE", str(tmp_path))
    calls = []

    def quantize(m):
        calls.append(1)
        quantize_model(m, RTNConfig(bits=4, group_size=32))
        return gptq.GPTQReport(gptq.GPTQConfig(), 2, 100, 0.5, {"a": 1.0}, {"a": 0.01}, ("note",))

    store.cached_quantize(_tiny(), {"k": 1}, quantize)
    extra, cached = store.cached_quantize(_tiny(), {"k": 1}, quantize)
    assert cached and len(calls) == 1
    assert extra["report"]["losses"] == {"a": 1.0} and extra["report"]["config"]["bits"] == 4
