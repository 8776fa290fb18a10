import time

import pytest
import torch

from course_utils import models


def test_default_model_is_the_shipped_smollm2(default_model):
    model, tok = default_model
    shape = models.model_shape(model)
    assert shape.n_parameters == 134_515_008  # tied embedding counted once
    assert 0 <= shape.n_bytes - 4 * shape.n_parameters < 1024  # float32, plus small rotary buffers
    assert shape.n_layers == model.config.num_hidden_layers
    assert tok.chat_template


def test_default_model_weights_sit_on_the_q4_1_grid(default_model):
    # A dequantized Q4_1 tensor has at most 16 distinct values in each block of 32 weights.
    model, _ = default_model
    w = model.model.layers[0].self_attn.q_proj.weight.detach().reshape(-1, 32)
    distinct = torch.tensor([row.unique().numel() for row in w[:2000]])
    assert distinct.max() <= 16


def test_cached_load_is_fast(default_model):
    start = time.perf_counter()
    models.load_model("default", "cpu")
    assert time.perf_counter() - start < 10  # budget 3 s on a quiet machine; generous for CI noise


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


def test_model_dir_is_a_local_folder_or_one_clear_message(offline):
    assert (models.model_dir("default") / "model.safetensors").is_file()
    with pytest.raises(models.ModelNotAvailableError, match="not in the local Hugging Face cache"):
        models.model_dir("no-such-org/no-such-model-xyz")
