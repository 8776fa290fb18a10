"""Shared fixtures: the default model is loaded once per test session (from the cache after the first time)."""

import pytest


@pytest.fixture(scope="session")
def default_model():
    """(model, tokenizer) of the offline default model on the CPU."""
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
