"""Shared fixtures: every test gets a cache folder of its own; the default model is loaded once per session.

``COURSE_CACHE`` points at a fresh temporary folder for each test, so that no test reads what another (or
an earlier run) left behind, and nothing a test writes reaches the learner's cache. The one exception is
the converted default model (deterministic, and 20 s to convert): the session fixture ``default_model``
converts it in the real cache once, and each test's folder links to it.
"""

import os

import pytest

from course_utils import config

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
