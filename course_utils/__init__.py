"""Quantization, Measured: the shared package behind the course's notebooks.

One concept per module:
``config`` (which model, device and cache), ``formats`` (number formats and memory arithmetic),
``models`` (load and cache models), ``data`` (offline texts and token windows),
``evaluate`` (perplexity, KL divergence, top-1 agreement), ``timing`` (benchmarks, bandwidth,
speed of light), ``hardware`` (device detection and peak bandwidths), ``doctor`` and ``runner``
(the command line: ``python -m course_utils doctor|run``).
"""

__version__ = "0.1.0"
