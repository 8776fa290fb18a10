"""Shared fixtures: every test gets a cache folder of its own; the default model is loaded once per session;
a tiny Llama (built in milliseconds) for the quantizers' model-level tests.

``COURSE_CACHE`` points at a fresh temporary folder for each test, so that no test reads what another (or
an earlier run) left behind, and nothing a test writes reaches the learner's cache. The one exception is
the converted default model (deterministic, and 20 s to convert): the session fixture ``default_model``
converts it in the real cache once, and each test's folder links to it.
"""

import os

import pytest
import torch

from course_utils import config, hardware

REAL_CACHE = config.cache_dir()  # before any test moves COURSE_CACHE


@pytest.fixture(autouse=True)
def course_cache(tmp_path, monkeypatch):
    """A fresh, empty ``COURSE_CACHE`` for this test (with a link to the converted default model, if any)."""
    from course_utils import models

    folder = tmp_path / "course-cache"
    folder.mkdir()
    monkeypatch.setenv("COURSE_CACHE", str(folder))
    converted = REAL_CACHE / models.default_model_cache().name
    if (converted / "model.safetensors").is_file():
        os.symlink(converted, folder / converted.name)
    return folder


@pytest.fixture(scope="session")
def default_model():
    """(model, tokenizer) of the offline default model on the CPU (converted into the real cache once)."""
    from course_utils.models import load_model

    return load_model("default", "cpu")


@pytest.fixture(scope="module")
def default_on_cuda():
    """(model on CUDA, tokenizer, 2 evaluation windows, float perplexity) of the offline default model;
    skipped when the default model file is missing."""
    from course_utils import data, evaluate, models

    try:
        models.default_gguf_path()
    except models.ModelNotAvailableError as err:
        pytest.skip(str(err))
    model, tok = models.load_model("default", "cuda")
    windows = data.evaluation_windows(tok, max_windows=2)
    return model, tok, windows, evaluate.perplexity(model, windows).value


@pytest.fixture
def tiny_llama():
    """A factory: ``tiny_llama(seed=0, heads=4, kv_heads=2, bias=False, tied=False)`` builds a 2-layer
    ``LlamaForCausalLM`` (vocabulary 256, width 64, MLP 128, ``heads`` attention heads sharing ``kv_heads``
    key/value heads, ``bias`` on q/k/v/o, ``tied`` input and output embeddings), in eval mode, seeded.

    Its RMSNorm weights are drawn from U(0.5, 1.5) instead of the initial ones: with all-ones norms a
    scale folded into a norm (AWQ) or a norm forgotten in a layer's inputs (GPTQ's Hessians) would go
    unnoticed. The same seed gives the same float model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def make(seed=0, heads=4, kv_heads=2, bias=False, tied=False):
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128,
            attention_bias=bias, tie_word_embeddings=tied,
        )
        model = LlamaForCausalLM(config).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.uniform_(0.5, 1.5)
        return model

    return make


@pytest.fixture
def tiny_calibration():
    """Calibration token ids for the tiny Llama: 8 rows of 32 tokens (256 tokens, AWQ's minimum), seeded."""
    return torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def logits_of(tiny_calibration):
    """``logits_of(model, ids=tiny_calibration)``: the model's logits, without gradients."""

    def logits(model, ids=None):
        with torch.no_grad():
            return model(input_ids=tiny_calibration if ids is None else ids).logits

    return logits


@pytest.fixture
def one_cpu_thread(request):
    """PyTorch on one CPU thread for the test (``pytestmark = pytest.mark.usefixtures("one_cpu_thread")``),
    except tests marked slow, whose default-model products do use every core.

    The tiny models' tests are thousands of small tensor operations; with several threads their
    synchronisation costs far more than the arithmetic as soon as another program shares the cores (10
    to 50 times more on a busy 2-core machine: the reason ``gptq`` quantizes on one thread too)."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    with hardware.one_cpu_thread():
        yield
