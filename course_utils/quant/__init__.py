"""From-scratch quantizers, each a small module.

``rtn``: round-to-nearest quantize/dequantize (symmetric absmax or asymmetric zero-point; per tensor,
per output channel or per group; 2-8 bits; optional clipping search). ``packing``: codes of any width
from 1 to 8 bits packed into bytes and back. ``linear``: ``QuantLinear`` (packed codes, dequantized on
the fly) and ``quantize_model``. ``gptq``: GPTQ, column-by-column rounding with error feedback
weighted by the inputs' Hessian, layer by layer through a model (stored as ``QuantLinear`` too).
``awq``: AWQ, per-channel scales searched from activation magnitudes and folded into the previous norm or
Linear, then a clip search and round-to-nearest; also the salient-channel experiments. ``layerwise``:
the layer-by-layer plumbing GPTQ and AWQ share (a decoder layer's inputs, its Linear groups).
"""
