"""The GPTQ checkpoint layout: packing round trips, known bit patterns, zero-point conventions, the writer."""

import json

import pytest
import torch

from course_utils.quant import gptq_format as gf
from course_utils.quant import gptq_layout as gl
from course_utils.quant import rtn
from course_utils.quant.linear import QuantLinear, RTNConfig, quantize_model

pytestmark = pytest.mark.usefixtures("one_cpu_thread")  # tiny models: see conftest


@pytest.mark.parametrize("bits", gl.SUPPORTED_BITS)
@pytest.mark.parametrize("n", [32, 40, 64, 576])
def test_codes_to_words_to_codes_is_exact(bits, n):
    gen = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 2**bits, (n, 24), generator=gen)
    packed = gl.pack_along_first_dim(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (gl.packed_words(n, bits), 24)
    assert torch.equal(gl.unpack_along_first_dim(packed, bits, n).long(), codes)


def test_four_bit_codes_fill_a_word_low_nibble_first():
    codes = torch.arange(8).view(8, 1)  # one column, codes 0..7 along the input dimension
    assert int(gl.pack_along_first_dim(codes, 4)[0, 0]) == 0x76543210
    top = torch.full((8, 1), 15)  # all bits set: the int32 reads -1
    assert int(gl.pack_along_first_dim(top, 4)[0, 0]) == -1


def test_three_bit_code_ten_straddles_two_words():
    codes = torch.zeros(32, 1, dtype=torch.long)
    codes[10] = 0b111  # stream bits 30, 31 (word 0) and 32 (word 1)
    packed = gl.pack_along_first_dim(codes, 3)
    assert packed.shape == (3, 1)
    assert int(packed[0, 0]) & 0xFFFFFFFF == 0b11 << 30 and int(packed[1, 0]) == 1 and int(packed[2, 0]) == 0


def test_out_of_range_codes_and_unsupported_widths_are_refused():
    with pytest.raises(ValueError, match="0..15"):
        gl.pack_along_first_dim(torch.tensor([[16]]), 4)
    with pytest.raises(ValueError, match="bit-plane"):
        gl.pack_along_first_dim(torch.zeros(32, 1, dtype=torch.long), 5)


@pytest.mark.parametrize("bits", gl.SUPPORTED_BITS)
@pytest.mark.parametrize("fmt", gl.CHECKPOINT_FORMATS)
def test_zero_points_round_trip_including_zero(bits, fmt):
    gen = torch.Generator().manual_seed(bits)
    zeros = torch.randint(0, 2**bits, (5, 64), generator=gen)
    zeros[0] = 0  # asymmetric zero point 0: "gptq" (v1) stores z - 1, which borrows from the next field
    zeros[1] = 2**bits - 1
    packed = gl.pack_zeros(zeros, bits, fmt)
    assert packed.shape == (5, gl.packed_words(64, bits)) and packed.dtype == torch.int32
    assert torch.equal(gl.unpack_zeros(packed, bits, 64, fmt).long(), zeros)


def test_symmetric_zero_point_is_stored_minus_one_in_the_classic_format():
    zeros = torch.full((1, 8), 8)
    assert int(gl.pack_zeros(zeros, 4, "gptq")[0, 0]) == 0x77777777
    assert int(gl.pack_zeros(zeros, 4, "gptq_v2")[0, 0]) & 0xFFFFFFFF == 0x88888888


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quantlinear_to_gptq_and_back_keeps_codes_scales_and_weight(symmetric, bits):
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 96, bias=True)
    layer = QuantLinear.from_linear(linear, RTNConfig(bits=bits, group_size=32, symmetric=symmetric))
    t = gl.pack_layer(layer)
    assert t.qweight.shape == (128 * bits // 32, 96) and t.qzeros.shape == (4, 96 * bits // 32)
    assert t.scales.shape == (4, 96) and t.scales.dtype == torch.float16
    assert torch.equal(t.g_idx, torch.arange(128, dtype=torch.int32) // 32)
    back = t.to_quantized_tensor()
    assert back.symmetric == symmetric and back.group_size == 32
    assert torch.equal(back.codes, layer.codes())
    assert torch.equal(back.scales, layer.scales.float())
    if not symmetric:
        assert torch.equal(back.zeros, layer.zeros.to(torch.int16))
    assert torch.equal(t.dequantize(), layer.dequantized_weight())
    assert torch.equal(t.bias, linear.bias.detach().half())


def test_symmetric_codes_are_shifted_by_half_the_range():
    layer = QuantLinear(rtn.QuantizedTensor(torch.tensor([[-7, 0, 7, 1]], dtype=torch.int16).repeat(32, 8),
                                            torch.ones(32, 1), None, 4, 32, True), None)
    t = gl.pack_layer(layer)
    assert t.codes()[0, :4].tolist() == [1, 8, 15, 9]
    assert bool((t.zeros() == 8).all())


def test_a_custom_g_idx_must_fit_the_groups():
    layer = QuantLinear.from_linear(torch.nn.Linear(64, 32, bias=False), RTNConfig(4, 32, True))
    perm = torch.arange(64).flip(0) // 32
    assert torch.equal(gl.pack_layer(layer, g_idx=perm).g_idx, perm.int())
    with pytest.raises(ValueError, match="group indices"):
        gl.pack_layer(layer, g_idx=torch.full((64,), 2))


EXPECTED_KEYS = {"bits", "group_size", "desc_act", "sym", "lm_head", "quant_method", "checkpoint_format", "pack_dtype", "meta"}


def test_writer_lays_out_a_gptq_checkpoint(tmp_path, tiny_llama):
    model = tiny_llama(tied=True)
    quantize_model(model, RTNConfig(bits=4, group_size=32, symmetric=True))
    out = gf.save_gptq_checkpoint(model, None, tmp_path / "ckpt")
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert EXPECTED_KEYS <= qc.keys()
    assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"], qc["checkpoint_format"]) == ("gptq", 4, 32, True, False, "gptq")
    assert json.loads((out / gf.QUANTIZE_CONFIG_FILE).read_text()) == qc
    ck = gf.read_gptq_checkpoint(out)
    assert len(ck.layers) == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert "lm_head.weight" not in ck.other and "model.embed_tokens.weight" in ck.other  # tied: written once
    assert not any(k.endswith("packed") or k.endswith(".zeros") for k in ck.other)
    for name, layer in ck.layers.items():
        own = dict(model.named_modules())[name]
        assert torch.equal(layer.to_quantized_tensor().codes, own.codes())
        assert layer.qweight.dtype == torch.int32 and layer.g_idx.dtype == torch.int32


def test_a_checkpoint_loads_back_into_the_course_quantlinear_with_identical_logits(tmp_path, tiny_llama):
    model = tiny_llama(tied=True)
    quantize_model(model, RTNConfig(bits=4, group_size=32, symmetric=False))
    out = gf.save_gptq_checkpoint(model, None, tmp_path / "ckpt")
    fresh = tiny_llama(tied=True)  # same seed: same float tensors outside the quantized layers (norms included)
    assert gf.load_into_model(fresh, out) == 14
    ids = torch.arange(40).view(2, 20)
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids).logits, fresh(input_ids=ids).logits)
    with pytest.raises(ValueError, match="no nn.Linear"):
        gf.load_into_model(fresh, out)  # its layers are QuantLinear now


def test_per_channel_layers_of_different_widths_are_written_as_group_size_minus_one(tmp_path, tiny_llama):
    model = tiny_llama(tied=True)
    quantize_model(model, RTNConfig(bits=8, group_size="channel", symmetric=True))  # rows of 64 and of 128
    out = gf.save_gptq_checkpoint(model, None, tmp_path / "ckpt")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["group_size"] == -1
    fresh = tiny_llama(tied=True)
    assert gf.load_into_model(fresh, out) == 14
    ids = torch.arange(40).view(2, 20)
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids).logits, fresh(input_ids=ids).logits)


def test_writer_refuses_mixed_settings_and_models_without_quantlinear(tmp_path, tiny_llama):
    model = tiny_llama(tied=True)
    with pytest.raises(ValueError, match="no QuantLinear"):
        gf.save_gptq_checkpoint(model, None, tmp_path / "a")
    quantize_model(model, RTNConfig(4, 32, True), only=["model.layers.0.mlp.up_proj"])
    quantize_model(model, RTNConfig(8, 32, True), only=["model.layers.1.mlp.up_proj"])
    with pytest.raises(ValueError, match="share bits"):
        gf.save_gptq_checkpoint(model, None, tmp_path / "b")


def _gptqmodel_reason():
    from course_utils.backends import gptqmodel

    missing = {k: v for k, v in gptqmodel.available().items() if v}
    return "; ".join(missing.values()) if missing else None


def test_packing_matches_gptqmodel_own_packer():
    reason = _gptqmodel_reason()
    if reason:
        pytest.skip(f"GPTQModel is not importable here: {reason}")
    from gptqmodel.utils.model_dequant import pack_cols

    gen = torch.Generator().manual_seed(1)
    for bits in gl.SUPPORTED_BITS:
        values = torch.randint(0, 2**bits, (7, 64), generator=gen, dtype=torch.int32)
        assert torch.equal(gl.pack_along_first_dim(values.T, bits).T.contiguous(), pack_cols(values, bits, pack_dtype=torch.int32))


@pytest.mark.parametrize("symmetric", [True, False])
def test_exported_model_reloads_in_transformers_with_the_same_logits(tmp_path, symmetric, tiny_llama):
    reason = _gptqmodel_reason()
    if reason:
        pytest.skip(f"transformers needs GPTQModel and optimum to load GPTQ checkpoints: {reason}")
    from course_utils.backends import gptqmodel

    model = tiny_llama(tied=True)
    if not symmetric:  # groups whose zero point is 0 (all weights >= 0) and 15 (all <= 0): the v1 edge cases
        with torch.no_grad():
            w = model.model.layers[0].mlp.up_proj.weight
            w[:8, :32] = w[:8, :32].abs()
            w[8:16, :32] = -w[8:16, :32].abs()
    quantize_model(model, RTNConfig(bits=4, group_size=32, symmetric=symmetric))
    if not symmetric:
        zeros = model.model.layers[0].mlp.up_proj.zeros
        assert bool((zeros[:8, 0] == 0).all()) and bool((zeros[8:16, 0] == 15).all())
    out = gf.save_gptq_checkpoint(model, None, tmp_path / "ckpt")
    reloaded = gptqmodel.load_quantized(out, "cpu", backend="gptq_torch")[0]
    assert sum(gptqmodel.kernels(reloaded).values()) == 14
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a, b = model(input_ids=ids).logits, reloaded(input_ids=ids).logits
    # the checkpoint holds the bias in float16 (2**-11 relative) and GPTQModel dequantizes in its own order:
    # the logits (about 1 in size) move by about 2e-4; 2e-3 allows for that, a zero point off by one does not
    assert torch.allclose(a, b, atol=2e-3, rtol=1e-3), float((a - b).abs().max())
