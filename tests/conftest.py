"""Shared fixtures: the default model is loaded once per test session (from the cache after the first time)."""

import pytest


@pytest.fixture(scope="session")
def default_model():
    """(model, tokenizer) of the offline default model on the CPU."""
    from course_utils.models import load_model

    return load_model("default", "cpu")
