"""The compressed-tensors ("pack-quantized") export: read back by compressed-tensors itself, every weight is
the course's own, bit for bit."""

import json

import pytest
import torch

from course_utils.quant import compressed_format as cf
from course_utils.quant import gptq
from course_utils.quant.gptq_layout import quant_linear_names
from course_utils.quant.linear import RTNConfig, quantize_model


def _reader_reason() -> str | None:
    from course_utils.backends import llmcompressor

    return llmcompressor.available()["compressed_tensors"]


def _reload(folder):
    reason = _reader_reason()
    if reason:
        pytest.skip(f"reading compressed-tensors checkpoints needs compressed_tensors: {reason}")
    from course_utils.backends import llmcompressor

    return llmcompressor.load_quantized(folder, "cpu", dequantize=True)[0]


@pytest.mark.parametrize("config", [
    RTNConfig(bits=4, group_size=32),
    RTNConfig(bits=4, group_size=32, full_grid=True),
    RTNConfig(bits=4, group_size=32, symmetric=False),
    RTNConfig(bits=8, group_size="channel"),
    RTNConfig(bits=4, group_size="channel", symmetric=False),
], ids=["int4 g32 sym", "int4 g32 full grid", "int4 g32 asym", "int8 per channel", "int4 per channel asym"])
def test_compressed_tensors_reads_back_exactly_the_course_weights(tmp_path, tiny_llama, logits_of, config):
    model = tiny_llama(tied=True, bias=True)
    if not config.symmetric:  # zero points at both ends of the grid (all weights >= 0, all <= 0)
        with torch.no_grad():
            w = model.model.layers[0].mlp.up_proj.weight
            w[:8, :32] = w[:8, :32].abs()
            w[8:16, :32] = -w[8:16, :32].abs()
    quantize_model(model, config)
    out = cf.save_compressed_checkpoint(model, None, tmp_path / "ckpt")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["ignore"] == ["lm_head"]
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = {k.rpartition(".")[2]: f.get_tensor(k) for k in f.keys() if k.startswith("model.layers.0.mlp.up_proj.")}
    expected = {"weight_packed", "weight_scale", "weight_shape"} | (set() if config.symmetric else {"weight_zero_point"})
    assert set(keys) == expected
    assert keys["weight_packed"].dtype == torch.int32 and keys["weight_packed"].shape == (128, 64 * config.bits // 32)
    assert keys["weight_shape"].dtype == torch.int64 and keys["weight_shape"].tolist() == [128, 64]
    assert keys["weight_scale"].dtype == torch.float32
    reloaded = _reload(out)
    ours = quant_linear_names(model)
    theirs = dict(reloaded.named_modules())
    assert len(ours) == 14
    for name, layer in ours.items():
        assert torch.equal(theirs[name].weight.float(), layer.dequantized_weight().float()), name
    assert torch.allclose(logits_of(model), logits_of(reloaded), atol=1e-5, rtol=1e-5)


def test_a_gptq_act_order_result_exports_like_any_other(tmp_path, tiny_llama, tiny_calibration):
    # the course's act-order uses static groups (a column's group is column // group_size), so QuantLinear
    # holds contiguous groups and the checkpoint needs no g_idx; GPTQ's own scales (not RTN's) go through
    model = tiny_llama(tied=True)
    gptq.quantize_model(model, gptq.GPTQConfig(bits=4, group_size=32, act_order=True), tiny_calibration, progress=False)
    out = cf.save_compressed_checkpoint(model, None, tmp_path / "ckpt")
    reloaded = dict(_reload(out).named_modules())
    for name, layer in quant_linear_names(model).items():
        assert torch.equal(reloaded[name].weight.float(), layer.dequantized_weight().float()), name


def test_refusals(tmp_path, tiny_llama):
    model = tiny_llama()
    with pytest.raises(ValueError, match="no QuantLinear"):
        cf.save_compressed_checkpoint(model, None, tmp_path / "a")
    quantize_model(model, RTNConfig(bits=4, group_size=32))
    layer = model.model.layers[0].mlp.down_proj
    with pytest.raises(ValueError, match="bfloat16"):
        cf.pack_layer(layer, torch.bfloat16)
    three = tiny_llama()
    quantize_model(three, RTNConfig(bits=3, group_size=32))
    with pytest.raises(ValueError, match="4, 8"):
        cf.save_compressed_checkpoint(three, None, tmp_path / "c")
    other = tiny_llama()
    quantize_model(other, RTNConfig(bits=8, group_size=32))
    model.model.layers[1].mlp.down_proj = other.model.layers[1].mlp.down_proj
    with pytest.raises(ValueError, match="share bits"):
        cf.save_compressed_checkpoint(model, None, tmp_path / "b")
