"""From-scratch quantizers, each a small module, all following one contract.

``contract``: what every quantizer shares (``QuantizedLayer``, ``Report``, ``replace_linears``,
``check_finite``). Methods, each with a config dataclass and ``quantize_model(model, config, calibration)``:
``linear`` (``QuantLinear``, packed codes dequantized on the fly, and RTN for a model), ``llm_int8``,
``nf4`` (NF4/FP4 and double quantization), ``microscaling`` (MXFP4 and NVFP4), ``w8a8`` (weights and
activations in int8 or FP8; its parts ``act_quant`` and ``smoothquant``), ``gptq``, ``awq``; ``methods`` dispatches on the config and
caches the slow ones (``store``: safetensors keyed on the code that made them). Their parts: ``rtn``
(round-to-nearest of one tensor), ``packing`` (codes of 1-8 bits into bytes), ``activations`` (input
statistics of Linear layers), ``layerwise`` (the layer-by-layer loop GPTQ and AWQ share), ``awq_layout``
(where AWQ's scales go in a Llama layer), ``salient`` (the AWQ paper's salient-channel experiments),
``kernel_path`` (which matmul a quantized layer runs: a real int4/int8 kernel on its codes, or dequantize).
Formats: ``gptq_layout`` and ``gptq_format`` (GPTQ checkpoints), ``compressed_format`` (compressed-tensors'
"pack-quantized" checkpoints), ``checkpoint_folder`` (the folder around either), ``gguf_blocks`` (llama.cpp's
blocks).
"""
