"""Thin adapters to the real quantization libraries, one module per library.

Each adapter imports its library only when a function is called and, when the library (or the
hardware it needs) is missing, raises an error that says what is missing and how to install it,
instead of failing with a bare stack trace. ``available()`` in each module answers the question
without raising, the same way everywhere: a dict of library name -> ``None`` when it can be used,
else the reason it cannot. What a library changes in the process (environment variables, loggers,
progress bars) is put back when the adapter's call ends.

- ``gguf_file``: the ``gguf`` package, no llama.cpp: a GGUF file's anatomy and summary, clear errors for
  broken files, rewriting a file's tensors (F16 export, your own quantizer), and llama.cpp's tensor names
  for transformers' (gguf's own name map).
- ``llamacpp``: running llama.cpp through ``llama-cpp-python``: quantize GGUF files (with an importance
  matrix if given), time prompt processing and generation, score their logits. Imports ``gguf_file``.
- ``gguf_ladder``: the type ladder: one float GGUF quantized to several types, each scored and timed.
- ``bnb``: bitsandbytes' layers and transformers' ``BitsAndBytesConfig``.
- ``gptqmodel``: GPTQ quantization with GPTQModel (cached per setting) and loading GPTQ checkpoints
  through transformers.
- ``autogptq``: AutoGPTQ is end-of-life and not installed; why it is skipped and its API in GPTQModel's names.
- ``llmcompressor``: AWQ with llm-compressor (cached per setting; runs on a CPU with one narrow patch) and
  loading its compressed-tensors checkpoints through transformers.
- ``autoawq``: AutoAWQ is deprecated and not installed; why it is skipped and its API in llm-compressor's names.
- ``common``: what the adapters share (calibration rows, the settings-keyed checkpoint cache, import probes,
  restoring environment variables and progress bars).
"""
