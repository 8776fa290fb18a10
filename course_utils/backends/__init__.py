"""Thin adapters to the real quantization libraries, one module per library.

Each adapter imports its library only when a function is called and, when the library (or the
hardware it needs) is missing, raises an error that says what is missing and how to install it,
instead of failing with a bare stack trace. ``available()`` in each module answers the question
without raising.

- ``llamacpp``: ``llama-cpp-python`` (quantize GGUF files, with an importance matrix if given, run
  them, score their logits, time prompt processing and generation).
- ``gguf_file``: the ``gguf`` package: a GGUF file's anatomy, clear errors for broken files, and
  rewriting a file's tensors (F16 export, your own quantizer).
- ``bnb``: bitsandbytes' layers and transformers' ``BitsAndBytesConfig``.
- ``gptqmodel``: GPTQ quantization with GPTQModel (cached per setting) and loading GPTQ checkpoints
  through transformers.
- ``autogptq``: AutoGPTQ is end-of-life and not installed; why it is skipped and its API in GPTQModel's names.
"""

from collections.abc import Callable


class BackendUnavailableError(ImportError):
    """A library an adapter needs is missing or broken; the message says what to install and how."""


def import_status(importers: dict[str, Callable[[], object]]) -> dict[str, str | None]:
    """Try each importer: name -> None when it works, else the reason it raised (BackendUnavailableError)."""
    status: dict[str, str | None] = {}
    for name, importer in importers.items():
        try:
            importer()
            status[name] = None
        except BackendUnavailableError as err:
            status[name] = str(err)
    return status
