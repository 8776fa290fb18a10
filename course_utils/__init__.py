"""Quantization, Measured: the shared package behind the course's notebooks.

One concept per module (the README lists them all): ``config`` (which model, device and cache),
``cache`` (cache keys that hold the code that made a result), ``formats`` (number formats), ``memory``
(bits per weight and memory), ``models``, ``data``, ``evaluate``, ``timing``, ``kernels`` and
``kernel_sweeps``, ``hardware``; ``quant`` (the from-scratch quantizers, one contract for all) and
``backends`` (adapters to the quantization libraries and llama.cpp); ``compare`` and ``compare_report``,
``anchors``, ``recommend``, ``refusals``, ``results``, ``widgets``, ``labs``; ``doctor`` and ``runner``
(the command line: ``python -m course_utils doctor | run | compare | labs``).
"""

__version__ = "0.1.0"
