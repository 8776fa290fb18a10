"""A model quantized by the course, written as a GGUF that llama.cpp runs, holding exactly its weights.

llama.cpp's Q4_0 block is 32 weights of one row, a float16 scale ``d`` and 4-bit codes: weight
``d * (q - 8)``. That is the course's symmetric int4 quantizer with groups of 32 and float16 scales
(codes -7..7, or -8..7 with ``full_grid=True``). Q8_0 is the same with int8 codes. So a layer quantized
by the course's RTN, GPTQ or AWQ on such a grid can be written as Q4_0 or Q8_0 blocks that decode to
the very weights the course computed (no second rounding), and llama.cpp runs them at its own speed. The
weights are exact; the outputs are not quite PyTorch's, since llama.cpp's Q4_0 and Q8_0 dot products round
each block of 32 activations to 8 bits first. Other grids have no exact GGUF type and are refused with the
types that would fit (:func:`gguf_type`): groups of 64 do not fit 32-weight blocks; Q4_1's minimum is a
float16, which the course's integer zero point times its scale is not in general (the rounding would be
small, under 1 % of a step, but the file would no longer hold the course's weights exactly).

The file takes its metadata (architecture, tokenizer) from a GGUF of the same model (by default the
course's F16 export) and every tensor from the model itself: the quantized layers as blocks; norms, which
AWQ may have rescaled, as F32; the token embedding (tied to the output in small models) as Q8_0 rounded
by llama.cpp's own rule (:mod:`course_utils.quant.gguf_blocks`). That is what llama.cpp's Q4_0 gives this
model's tied embedding (it asks for Q6_K, which falls back to Q8_0 because 576 is not a multiple of 256), so
the two files are comparable; for a width that is a multiple of 256 llama.cpp's file would hold Q6_K there.
For the ``llama`` architecture the query and key rows are put in llama.cpp's order (its rotary embedding
pairs dimensions ``2i, 2i+1`` where transformers pairs ``i, i + d/2``); architectures whose GGUF keeps
transformers' pairing (qwen2: NEOX rope) keep the rows as they are. Models with Linear biases are refused
(their bias tensors are not written here).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from course_utils.backends import gguf_file
from course_utils.quant import gguf_blocks

OUTSIDE_LAYERS = {"token_embd.weight": "model.embed_tokens", "output_norm.weight": "model.norm",
                  "output.weight": "lm_head"}


def gguf_type(layer: nn.Module) -> str:
    """The GGUF type that holds ``layer``'s codes and scales exactly (``"Q4_0"`` or ``"Q8_0"``).

    ``ValueError`` naming what would fit for any other layout (bits, groups, zero points)."""
    label = f"int{layer.bits} g{layer.group_size} {'sym' if layer.symmetric else 'asym'}"
    if layer.symmetric and layer.group_size == 32 and layer.bits in (4, 8):
        return "Q4_0" if layer.bits == 4 else "Q8_0"
    if not layer.symmetric:
        why = ("Q4_1 and Q5_1 store the block minimum as float16, and the course's integer zero point times its "
               "scale needs more bits than float16 has, so the weights would move")
    elif layer.group_size != 32:
        why = f"llama.cpp's 4- and 8-bit blocks hold 32 weights with one scale; this layer has groups of {layer.group_size}"
    else:
        why = f"llama.cpp has no {layer.bits}-bit block of 32 with one scale per block (Q4_0 is 4-bit, Q8_0 8-bit)"
    raise ValueError(f"no GGUF type holds {label} exactly: {why}. Quantize with bits 4 or 8, group_size=32, "
                     f"symmetric=True (Q4_0, Q8_0; full_grid=True uses Q4_0's 16th level)")


def llama_rows(out_features: int, heads: int) -> torch.Tensor:
    """Row order (out_features,) that takes a transformers q or k projection to llama.cpp's: within each
    head, rows ``0, d/2, 1, d/2 + 1, ...`` (``heads``: attention heads for q, key/value heads for k)."""
    half = out_features // heads // 2
    return torch.arange(out_features).view(heads, 2, half).transpose(1, 2).reshape(-1)


ROTATED_ARCHS = ("llama",)  # GGUF architectures whose converter reorders the q and k rows (normal, not NEOX, rope)


def _row_order(hf_name: str, out_features: int, config, arch: str = "llama") -> torch.Tensor | None:
    if arch not in ROTATED_ARCHS:
        return None
    if hf_name.endswith("self_attn.q_proj"):
        return llama_rows(out_features, config.num_attention_heads)
    if hf_name.endswith("self_attn.k_proj"):
        return llama_rows(out_features, getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    return None


def _gguf_names(model: nn.Module, arch: str) -> dict[str, str]:
    """GGUF tensor name -> the transformers module holding it, for every module with a weight."""
    names = {}
    for name, module in model.named_modules():
        if getattr(module, "weight", None) is None and not hasattr(module, "codes"):
            continue
        gguf_name = next((g for g, hf in OUTSIDE_LAYERS.items() if hf == name), None)
        if gguf_name is None and ".layers." in name:
            gguf_name = gguf_file.gguf_tensor_name(name, arch)
        if gguf_name is not None:
            names[gguf_name] = name
    return names


def _tensor(module: nn.Module, hf_name: str, config, arch: str) -> tuple[np.ndarray, object]:
    """What to store for one GGUF tensor: (array, gguf type or None for a plain float array)."""
    gguf = gguf_file._import_gguf()
    if hasattr(module, "codes"):
        fmt = gguf_type(module)
        codes, scales = module.codes(), module.scales.float()
        rows = _row_order(hf_name, codes.shape[0], config, arch)
        if rows is not None:
            codes, scales = codes[rows], scales[rows]
        raw = gguf_blocks.from_codes(codes.numpy(), scales.numpy(), fmt)
        return raw, gguf.GGMLQuantizationType[fmt]
    weight = module.weight.detach().float().cpu()
    if weight.ndim == 1:
        return weight.numpy(), None
    rows = _row_order(hf_name, weight.shape[0], config, arch)
    values = (weight if rows is None else weight[rows]).numpy()
    return gguf_blocks.quantize(values, "Q8_0", hf_name), gguf.GGMLQuantizationType.Q8_0


def course_weight(model: nn.Module, gguf_name: str, arch: str = "llama") -> torch.Tensor:
    """The float32 weight (rows, columns) the course's layer behind GGUF tensor ``gguf_name`` computes with, in
    the file's row order: what an exported file must decode to, bit for bit, for a quantized layer."""
    hf_name = _gguf_names(model, arch)[gguf_name]
    module = dict(model.named_modules())[hf_name]
    weight = module.dequantized_weight() if hasattr(module, "codes") else module.weight.detach().float()
    rows = _row_order(hf_name, weight.shape[0], model.config, arch)
    return weight if rows is None else weight[rows]


def export_gguf(model: nn.Module, dst: str | Path, metadata_from: str | Path | None = None) -> Path:
    """Write ``model`` (a Llama-family transformers model, quantized in place by the course) to ``dst``.

    Quantized layers become Q4_0 or Q8_0 blocks holding their codes and scales exactly (:func:`gguf_type`
    refuses other layouts); other 2-D weights (the token embedding) become Q8_0, 1-D ones F32.
    ``metadata_from``: a GGUF of the same model (default: the course model's F16 export); its tensor list
    must match the model's. Returns ``dst``.
    """
    with_bias = [n for n, m in model.named_modules() if getattr(m, "bias", None) is not None and ".layers." in n]
    if with_bias:
        raise ValueError(f"the model's Linear layers have biases ({with_bias[0]}, ...): this exporter writes weights "
                         f"only; export such a model with llama.cpp's converter")
    gguf = gguf_file._import_gguf()
    src = Path(metadata_from) if metadata_from is not None else gguf_file.export_f16_gguf()
    reader = gguf_file.read(src)
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    names = _gguf_names(model, arch)
    modules = dict(model.named_modules())

    missing = [t.name for t in reader.tensors if t.name not in names]
    if missing:
        raise ValueError(f"{src.name} has tensors the model lacks ({missing[:3]}...): not the same model")
    types = {gguf_type(modules[names[t.name]]) for t in reader.tensors if hasattr(modules[names[t.name]], "codes")}
    file_type = {frozenset({"Q4_0"}): gguf.LlamaFileType.MOSTLY_Q4_0,
                 frozenset({"Q8_0"}): gguf.LlamaFileType.MOSTLY_Q8_0}.get(frozenset(types))

    def convert(name: str, _values: np.ndarray):
        return _tensor(modules[names[name]], names[name], model.config, arch)

    with torch.no_grad():
        return gguf_file.rewrite(src, Path(dst), convert, file_type=None if file_type is None else int(file_type))
