"""Thin adapters to the real quantization libraries, one module per library.

Each adapter imports its library only when a function is called and, when the library (or the
hardware it needs) is missing, raises an error that says what is missing and how to install it,
instead of failing with a bare stack trace. ``available()`` in each module answers the question
without raising.

- ``llamacpp``: ``gguf`` (read and write GGUF files) and ``llama-cpp-python`` (quantize GGUF
  files, run them and time prompt processing and generation).
- ``bnb``: bitsandbytes' layers and transformers' ``BitsAndBytesConfig``.
- ``gptqmodel``: GPTQ quantization with GPTQModel (cached per setting) and loading GPTQ checkpoints
  through transformers.
- ``autogptq``: AutoGPTQ is end-of-life and not installed; why it is skipped and its API in GPTQModel's names.
- ``llmcompressor``: AWQ with llm-compressor (cached per setting; runs on a CPU with one narrow patch) and
  loading its compressed-tensors checkpoints through transformers.
- ``autoawq``: AutoAWQ is deprecated and not installed; why it is skipped and its API in llm-compressor's names.
- ``common``: what the adapters share (calibration rows, the settings-keyed checkpoint cache, import probes).
"""
