"""The llm-compressor adapter and the AutoAWQ report (no quantization of the course model here: minutes on a CPU)."""

import json

import pytest
import torch

from course_utils.backends import autoawq, common
from course_utils.backends import llmcompressor as lc


def needs_llmcompressor():
    if lc.available()["llmcompressor"]:
        pytest.skip("llm-compressor is not installed")


def test_available_names_both_libraries_and_explains_what_is_missing():
    status = lc.available()
    assert set(status) == {"llmcompressor", "compressed_tensors"}
    for reason in status.values():
        assert reason is None or ("--no-deps" in reason and "make setup" in reason)


def test_a_missing_library_raises_with_the_install_hint(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_compressed_tensors(name, *args, **kwargs):
        if name.startswith("compressed_tensors"):
            raise ImportError("No module named 'compressed_tensors'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_compressed_tensors)
    with pytest.raises(common.BackendUnavailableError, match="compressed-tensors.*make setup"):
        lc._import_compressed_tensors()
    assert "No module named 'compressed_tensors'" in lc.available()["compressed_tensors"]


def test_pin_memory_is_bypassed_only_inside_the_block_and_only_without_an_accelerator():
    needs_llmcompressor()
    from llmcompressor.pipelines.cache import IntermediatesCache, IntermediateValue

    original = IntermediatesCache.__dict__["pin_memory"]
    cache = IntermediatesCache([{"hidden": IntermediateValue(torch.ones(2, 3), torch.device("cpu"))}], None)
    accelerator = torch.accelerator.is_available()
    if not accelerator:  # the failure the bypass exists for
        with pytest.raises(RuntimeError, match="accelerator"):
            cache.pin_memory(0)
    with lc.cpu_pin_memory_bypass() as bypassed:
        assert bypassed is not accelerator
        cache.pin_memory(0)  # no error: nothing pinned without an accelerator
        assert not cache.batch_intermediates[0]["hidden"].value.is_pinned() or accelerator
    assert IntermediatesCache.__dict__["pin_memory"] is original
    with pytest.raises(ZeroDivisionError), lc.cpu_pin_memory_bypass():
        1 / 0
    assert IntermediatesCache.__dict__["pin_memory"] is original  # put back after an error too


def test_calibration_becomes_a_dataset_of_token_rows_or_texts():
    needs_llmcompressor()
    rows, _ = common.calibration_rows(torch.arange(12).view(3, 4))
    dataset, seq_len = lc._dataset(rows, 512)
    assert seq_len == 4 and dataset.column_names == ["input_ids", "attention_mask"]
    assert dataset[1]["input_ids"] == [4, 5, 6, 7] and dataset[1]["attention_mask"] == [1, 1, 1, 1]
    texts, seq_len = lc._dataset(["one text", "another"], 256)
    assert seq_len == 256 and texts["text"] == ["one text", "another"]


def test_settings_name_the_cache_folder_and_a_matching_record_is_reused(tmp_path, monkeypatch):
    src = tmp_path / "float"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "model.safetensors").write_bytes(b"0")
    cal = torch.arange(64).view(4, 16)
    _, fp = common.calibration_rows(cal)
    record = lc.settings_record(src, 4, 64, True, 20, False, fp)
    assert lc.settings_record(src, 4, 64, False, 20, False, fp) != record
    assert lc.settings_record(src, 4, 64, True, 20, True, fp) != record
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path / "cache"))
    out = lc.default_out_dir(record)
    assert out.name.startswith("llmcompressor-int4-g64-sym-") and out.parent.name == "awq"
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}")
    (out / lc.CACHE_RECORD).write_text(json.dumps({"settings": record, "seconds": 321.0}))
    # a matching record: nothing runs (it would need llm-compressor and minutes)
    monkeypatch.setattr(lc, "_import", lambda: pytest.fail("the cached checkpoint should have been reused"))
    assert lc.awq_quantize(src, out, 4, 64, True, cal) == (out, 321.0)
    assert lc.cached_record(out)["seconds"] == 321.0
    # n_samples takes the first rows, and changes the fingerprint (so the record no longer matches)
    _, fp2 = common.calibration_rows(cal[:2])
    (out / lc.CACHE_RECORD).write_text(json.dumps({"settings": lc.settings_record(src, 4, 64, True, 20, False, fp2), "seconds": 5.0}))
    assert lc.awq_quantize(src, out, 4, 64, True, cal, n_samples=2) == (out, 5.0)
    with pytest.raises(ValueError, match="n_samples"):
        lc.awq_quantize(src, out, 4, 64, True, cal, n_samples=9)
    with pytest.raises(ValueError, match="calibration"):
        lc.awq_quantize(src, out)


def test_load_quantized_refuses_a_folder_without_config(tmp_path):
    if lc.available()["compressed_tensors"]:
        pytest.skip("compressed-tensors is not installed")
    with pytest.raises(FileNotFoundError, match="config.json"):
        lc.load_quantized(tmp_path, "cpu")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="not a compressed-tensors checkpoint"):
        lc.quantization_settings(tmp_path)


@pytest.mark.slow
def test_awq_on_a_tiny_llama_saves_and_reloads_through_transformers(tmp_path, monkeypatch):
    """Seconds, not minutes: a 2-layer Llama of width 64 with the course's tokenizer."""
    needs_llmcompressor()
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from course_utils import models

    tokenizer_dir = models.default_model_dir()  # from the real cache, before it is moved
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    float_model = LlamaForCausalLM(config).eval()
    src = tmp_path / "float"
    float_model.save_pretrained(src)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(src)
    cal = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    out, seconds = lc.awq_quantize(src, None, 4, 32, True, cal, n_grid=4)
    assert out.parent.name == "awq"
    record = lc.cached_record(out)
    assert record["seconds"] == round(seconds, 2)  # the run time reported is recorded, to the hundredth, with the copy
    assert record["n_samples"] == 8 and record["pin_memory_bypassed"] is not torch.accelerator.is_available()
    assert (out / "quantize.log").is_file()
    assert lc.quantization_settings(out) == {"format": "pack-quantized", "bits": 4, "group_size": 32, "symmetric": True,
                                            "strategy": "group", "ignore": ["lm_head"]}
    model, tokenizer = lc.load_quantized(out, "cpu")
    text = "The capital of France is"
    assert tokenizer(text).input_ids == AutoTokenizer.from_pretrained(src)(text).input_ids  # the course's tokenizer, saved along
    q = model.model.layers[0].mlp.down_proj
    assert type(q) is torch.nn.Linear
    # every group of 32 weights of a row holds at most 16 distinct values: a 4-bit grid
    groups = q.weight.detach().view(-1, 32)
    assert max(len(g.unique()) for g in groups) <= 16
    assert not torch.equal(q.weight, float_model.model.layers[0].mlp.down_proj.weight)
    with torch.no_grad():
        ref, got = float_model(input_ids=cal).logits, model(input_ids=cal).logits
    # 4-bit groups of 32: an error of about 1 % of the logits' variance (see test_gptq); 10 % means broken
    assert torch.isfinite(got).all() and 0 < (got - ref).pow(2).mean() < 0.1 * ref.var()
    assert lc.awq_quantize(src, None, 4, 32, True, cal, n_grid=4) == (out, record["seconds"])  # cached


def test_autoawq_skip_reason_is_one_clear_sentence_naming_the_successor():
    reason = autoawq.skip_reason()
    assert isinstance(reason, str) and "\n" not in reason and "Traceback" not in reason
    assert "autoawq" in reason and "llm-compressor" in reason and "deprecated" in reason and "CPU" in reason
    assert ("not installed" in reason) or ("fails" in reason) or autoawq.available()["awq"] is None


def test_autoawq_names_map_onto_llmcompressor():
    renames = autoawq.API_RENAMES
    assert autoawq.SUCCESSOR == "llm-compressor"
    joined = " ".join(renames)
    for old in ("AutoAWQForCausalLM.from_pretrained", "w_bit", "q_group_size", "zero_point", "model.quantize",
                "save_quantized", "from_quantized"):
        assert old in joined
    values = " ".join(renames.values())
    for new in ("oneshot", "AWQModifier", "QuantizationModifier", "save_compressed=True", "AutoModelForCausalLM"):
        assert new in values


def test_loading_puts_transformers_progress_bars_back_as_they_were():
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    try:
        for state in (True, False):
            (hf_logging.enable_progress_bar if state else hf_logging.disable_progress_bar)()
            with common.hf_progress_bars_off():
                assert not hf_logging.is_progress_bar_enabled()
            assert hf_logging.is_progress_bar_enabled() is state
    finally:
        (hf_logging.enable_progress_bar if was_on else hf_logging.disable_progress_bar)()


def _tiny_folder(folder, outlier: bool = True):
    """A 2-layer Llama of width 64 saved with a one-word tokenizer (the calibration rows are token ids
    already; llm-compressor only asks that a tokenizer exist), and its calibration rows."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
        if outlier:
            model.model.layers[0].input_layernorm.weight[5] = 40.0
    model.save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"[UNK]": 0}, unk_token="[UNK]"))).save_pretrained(folder)
    return model, torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))


def test_smoothquant_factors_equal_llm_compressors_with_its_range_statistic(tmp_path):
    """llm-compressor smooths with the activation's range (max - min) and twice max|W|; the course's
    ``statistic="range"`` reproduces it: bit for bit where both calibrate on the same inputs (the first
    layer's q/k/v), to float rounding after it (llm-compressor calibrates each group on the outputs of the
    layers it has already smoothed, the course on the float model in one pass)."""
    needs_llmcompressor()
    import copy

    from course_utils.quant import smoothquant

    model, cal = _tiny_folder(tmp_path)
    theirs, seconds = lc.scheme_model(tmp_path, "W8A8", smoothing_strength=0.5, calibration=cal)
    ours = copy.deepcopy(model)
    smoothquant.smooth_model(ours, cal, alpha=0.5, statistic="range")
    mine, lib = dict(ours.named_parameters()), dict(theirs.named_parameters())
    for name in ("model.layers.0.input_layernorm.weight", "model.layers.0.self_attn.q_proj.weight"):
        assert torch.equal(mine[name], lib[name]), name
    for name, p in mine.items():
        assert torch.allclose(p, lib[name], rtol=1e-5, atol=1e-7), name
    paper = copy.deepcopy(model)
    smoothquant.smooth_model(paper, cal, alpha=0.5, statistic="absmax")
    assert not torch.allclose(paper.model.layers[0].input_layernorm.weight, lib["model.layers.0.input_layernorm.weight"])


def test_w8a8_and_fp8_weight_grids_against_llm_compressor(tmp_path):
    """Same per-channel weight codes in FP8 (scale amax / 448 both); in int8 llm-compressor's symmetric
    scale is amax / 127.5 (its grid runs -128..127), the course's amax / 127 (codes -127..127)."""
    needs_llmcompressor()
    from course_utils.quant import w8a8

    model, _ = _tiny_folder(tmp_path, outlier=False)
    float_down = model.model.layers[1].mlp.down_proj
    int8, _ = lc.scheme_model(tmp_path, "W8A8")
    lib = int8.model.layers[1].mlp.down_proj
    assert torch.allclose(lib.weight_scale.reshape(-1), float_down.weight.abs().amax(1) / 127.5)
    assert torch.allclose(w8a8.W8A8Linear(float_down, "int8").weight_scale, float_down.weight.abs().amax(1) / 127)
    fp8, _ = lc.scheme_model(tmp_path, "FP8_DYNAMIC")
    lib = fp8.model.layers[1].mlp.down_proj
    own = w8a8.W8A8Linear(float_down, "fp8")
    assert torch.equal(lib.weight_scale.reshape(-1), own.weight_scale)
    codes = (lib.weight / lib.weight_scale).clamp(-448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(codes.float(), own.qweight.float())


def test_nvfp4_weights_equal_llm_compressors(tmp_path):
    needs_llmcompressor()
    from course_utils.quant import microscaling

    model, _ = _tiny_folder(tmp_path, outlier=False)
    theirs, _ = lc.scheme_model(tmp_path, "NVFP4A16")
    for i in (0, 1):
        w = model.model.layers[i].self_attn.o_proj.weight.detach()
        lib = theirs.model.layers[i].self_attn.o_proj
        own = microscaling.quantize(w, "nvfp4")
        assert torch.equal(own.tensor_scale, lib.weight_global_scale.reshape(1))
        assert torch.equal(own.scales.float(), lib.weight_scale.float())


def test_scheme_names_and_calibration_are_checked(tmp_path):
    with pytest.raises(ValueError, match="scheme must be one of"):
        lc.scheme_model(tmp_path, "W4A4")
    with pytest.raises(ValueError, match="needs calibration"):
        lc.scheme_model(tmp_path, "W8A8", smoothing_strength=0.5)
