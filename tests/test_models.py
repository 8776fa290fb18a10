import pytest
import torch

from course_utils import models


@pytest.mark.slow
def test_default_model_is_the_shipped_smollm2(default_model):
    model, tok = default_model
    shape = models.model_shape(model)
    assert shape.n_parameters == 134_515_008  # tied embedding counted once
    # float32 parameters plus the rotary frequencies (and their original copy): head_dim / 2 float32 each
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    buffers = dict(model.named_buffers())
    assert set(buffers) == {"model.rotary_emb.inv_freq", "model.rotary_emb.original_inv_freq"}
    assert all(b.shape == (head_dim // 2,) and b.dtype == torch.float32 for b in buffers.values())
    assert shape.n_bytes == 4 * shape.n_parameters + 2 * 4 * (head_dim // 2)
    assert shape.n_layers == model.config.num_hidden_layers == 30 and shape.hidden_size == 576
    assert tok.chat_template


@pytest.mark.slow
def test_default_model_weights_sit_on_the_q4_1_grid(default_model):
    # A dequantized Q4_1 tensor has at most 16 distinct values in each block of 32 weights.
    model, _ = default_model
    w = model.model.layers[0].self_attn.q_proj.weight.detach().reshape(-1, 32)
    distinct = torch.tensor([row.unique().numel() for row in w[:2000]])
    assert distinct.max() <= 16


@pytest.mark.slow
def test_a_second_load_reads_the_converted_copy_not_the_gguf(default_model, monkeypatch):
    # the conversion (about 20 s) happens once; afterwards the GGUF is not even looked for
    monkeypatch.setattr(models, "default_gguf_path", lambda: pytest.fail("the GGUF was parsed again"))
    model, _ = models.load_model("default", "cpu")
    assert model.name_or_path == str(models.default_model_cache())
    assert torch.equal(model.model.layers[3].mlp.down_proj.weight, default_model[0].model.layers[3].mlp.down_proj.weight)


@pytest.mark.slow
def test_chat_is_deterministic(default_model):
    model, tok = default_model
    a = models.chat(model, tok, "Name a colour.", max_new_tokens=8)
    assert a and a == models.chat(model, tok, "Name a colour.", max_new_tokens=8)


@pytest.fixture()
def offline(monkeypatch):
    """The Hugging Face hub client in offline mode (it reads HF_HUB_OFFLINE once, at import: patch both)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_unknown_model_offline_gives_one_clear_message(offline):
    with pytest.raises(models.ModelNotAvailableError, match="COURSE_MODEL=default"):
        models.load_model("no-such-org/no-such-model-xyz", "cpu")


def test_parameter_and_byte_counts_on_a_tied_toy():
    emb = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    toy = torch.nn.ModuleDict({"emb": emb, "head": head})
    assert models.count_parameters(toy) == 40
    assert models.model_bytes(toy) == 160


@pytest.mark.slow  # converts the default model on a machine where it is not cached yet
def test_model_dir_is_a_local_folder_or_one_clear_message(offline):
    assert (models.model_dir("default") / "model.safetensors").is_file()
    with pytest.raises(models.ModelNotAvailableError, match="not in the local Hugging Face cache"):
        models.model_dir("no-such-org/no-such-model-xyz")
