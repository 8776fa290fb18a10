"""The course's quantized layers written as GGUF blocks: exactly their weights, refused where no type holds them."""

import numpy as np
import pytest
import torch
from torch import nn

from course_utils.backends import gguf_export
from course_utils.quant import gguf_blocks, linear

gguf = pytest.importorskip("gguf")


def _layer(bits=4, group_size=32, symmetric=True, full_grid=False, seed=0):
    torch.manual_seed(seed)
    return linear.QuantLinear.from_linear(nn.Linear(64, 32), linear.RTNConfig(bits, group_size, symmetric, full_grid=full_grid))


@pytest.mark.parametrize("bits,group,symmetric,expected", [(4, 32, True, "Q4_0"), (8, 32, True, "Q8_0")])
def test_groups_of_32_with_one_scale_are_q4_0_and_q8_0(bits, group, symmetric, expected):
    assert gguf_export.gguf_type(_layer(bits, group, symmetric)) == expected


@pytest.mark.parametrize("bits,group,symmetric,match", [
    (4, 64, True, "groups of 64"), (4, 32, False, "zero point"), (3, 32, True, "no 3-bit block"),
])
def test_grids_no_type_holds_are_refused_with_what_fits(bits, group, symmetric, match):
    with pytest.raises(ValueError, match=match) as err:
        gguf_export.gguf_type(_layer(bits, group, symmetric))
    assert "group_size=32, symmetric=True" in str(err.value)


@pytest.mark.parametrize("fmt,low,high", [("Q4_0", -8, 7), ("Q8_0", -128, 127)])
def test_blocks_from_codes_decode_to_scale_times_code_bit_for_bit(fmt, low, high):
    gen = np.random.default_rng(0)
    codes = gen.integers(low, high + 1, size=(6, 96))
    d = gen.standard_normal((6, 3)).astype(np.float16).astype(np.float32)
    raw = gguf_blocks.from_codes(codes, d, fmt)
    back = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[fmt])
    np.testing.assert_array_equal(back, codes * np.repeat(d, 32, axis=1))
    with pytest.raises(ValueError, match="holds codes"):
        gguf_blocks.from_codes(codes + (high - low + 1), d, fmt)
    with pytest.raises(ValueError, match="float16"):
        gguf_blocks.from_codes(codes, d + np.float32(1e-5), fmt)


def test_a_model_with_biases_is_refused_before_anything_is_read(tiny_llama, tmp_path):
    model = tiny_llama(bias=True)
    linear.quantize_model(model, linear.RTNConfig(4, 32))
    with pytest.raises(ValueError, match="biases"):
        gguf_export.export_gguf(model, tmp_path / "x.gguf", metadata_from=tmp_path / "missing.gguf")


def test_llama_rows_interleave_the_two_halves_of_each_head():
    assert gguf_export.llama_rows(8, 2).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


@pytest.mark.slow
def test_an_own_int4_model_exports_to_exactly_its_weights_and_llama_cpp_runs_it(default_model, tmp_path):
    pytest.importorskip("llama_cpp")
    from course_utils import data, evaluate
    from course_utils.backends import gguf_file, llamacpp
    import copy

    model, tokenizer = default_model
    f16 = gguf_file.export_f16_gguf(dst=tmp_path / "model.F16.gguf")
    # the row order: the F16 file (converted by llama.cpp's tools) holds the float q and k rows in llama order
    for name, heads in (("q_proj", 9), ("k_proj", 3)):
        w = getattr(model.model.layers[3].self_attn, name).weight.detach()
        stored = torch.from_numpy(gguf_file.float_tensor(f16, f"blk.3.attn_{name[0]}.weight"))
        assert (stored - w[gguf_export.llama_rows(w.shape[0], heads)]).abs().max() <= 2**-11 * w.abs().max()

    own = copy.deepcopy(model)
    linear.quantize_model(own, linear.RTNConfig(4, 32, full_grid=True))
    path = gguf_export.export_gguf(own, tmp_path / "own.Q4_0.gguf", metadata_from=f16)
    theirs = llamacpp.quantize_gguf(f16, tmp_path / "model.Q4_0.gguf", "Q4_0")
    assert path.stat().st_size == theirs.stat().st_size  # same types tensor by tensor: Q4_0, Q8_0 embedding, F32
    assert gguf_file.gguf_summary(path).tensor_types == gguf_file.gguf_summary(theirs).tensor_types
    checked = 0
    for tensor in gguf_file.read(path).tensors:
        if tensor.tensor_type != gguf.GGMLQuantizationType.Q4_0:
            continue
        expected = gguf_export.course_weight(own, tensor.name).numpy()
        np.testing.assert_array_equal(gguf.quants.dequantize(tensor.data, tensor.tensor_type), expected, err_msg=tensor.name)
        checked += 1
    assert checked == 7 * own.config.num_hidden_layers

    # llama.cpp on the file scores like the course's model with the same (Q8_0) embedding: llama.cpp rounds
    # each activation row to 8 bits before a Q4_0 dot product, which moves perplexity by well under 1 %
    embedding = torch.from_numpy(gguf_blocks.dequantize(gguf_blocks.quantize(
        own.model.embed_tokens.weight.detach().numpy(), "Q8_0"), "Q8_0"))
    with torch.no_grad():
        own.model.embed_tokens.weight.copy_(embedding)
    windows = data.evaluation_windows(tokenizer, max_windows=1)
    ours = evaluate.perplexity(own, windows).value
    with llamacpp.LlamaCppLogits(path) as exported:
        assert evaluate.perplexity(exported, windows).value == pytest.approx(ours, rel=0.01)
