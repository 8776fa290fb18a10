"""Quantization, Measured: the shared package behind the course's notebooks.

One concept per module:
``config`` (which model, device and cache), ``formats`` (number formats and memory arithmetic),
``models`` (load and cache models), ``data`` (offline texts and token windows),
``evaluate`` (perplexity, KL divergence, top-1 agreement), ``timing`` (benchmarks, bandwidth,
speed of light), ``kernels`` (weight-only GEMV kernels: pack a weight, call its kernel),
``kernel_sweeps`` (time those kernels over formats and batch sizes), ``hardware`` (device detection
and peak bandwidths), ``backends`` (adapters to the quantization libraries and llama.cpp), ``doctor``
and ``runner`` (the command line: ``python -m course_utils doctor|run``).
"""

__version__ = "0.1.0"
