"""GGUF files through the ``gguf`` package: anatomy, summary, F16 export, rewriting, tensor names.

A GGUF file is, in order (all little-endian):

1. a header: the magic ``b"GGUF"``, the format version (uint32), the number of tensors and the number
   of metadata key/value pairs (uint64 each);
2. the metadata: typed key/value pairs (``general.architecture``, ``llama.block_count``, the whole
   tokenizer vocabulary, ...);
3. the tensor infos: per tensor its name, shape (fastest-varying dimension first), type (F32, F16,
   Q4_1, ...) and offset from the start of the data section;
4. padding up to ``general.alignment`` (32 bytes unless the metadata says otherwise), then the data
   section: every tensor's bytes, each starting at an aligned offset.

Because the tensor data is aligned and stored as the kernels want it, llama.cpp can memory-map the
file and compute from it without copying. Nothing here runs llama.cpp (see ``backends.llamacpp``);
files written here go to ``<cache>/gguf``, named after their source and type.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from course_utils import cache, config, memory
from course_utils.backends.common import import_library, import_status

INSTALL_HINT = "install the course's requirements (`make setup`, or `pip install -r requirements.txt`)"


def _import_gguf():
    """The ``gguf`` package (with ``gguf.quants``), or ``BackendUnavailableError`` saying how to install it."""
    return import_library("gguf", "gguf.quants", why=lambda err: (
        f"the Python package 'gguf' is needed to read and write GGUF files but could not be "
        f"imported ({err}); {INSTALL_HINT}, or `pip install gguf==0.19.0`"))


def available() -> dict[str, str | None]:
    """Whether the ``gguf`` package can be used: ``{"gguf": None}`` when importable, else the reason."""
    return import_status({"gguf": _import_gguf})


class GGUFFormatError(ValueError):
    """A file that is not a readable GGUF (truncated, corrupt or another format); names the file."""


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table. ``shape`` is numpy order (rows first); ``offset`` is absolute."""

    name: str
    type_name: str
    shape: tuple[int, ...]
    offset: int
    n_bytes: int

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape))

    @property
    def bits_per_weight(self) -> float:
        return memory.stored_bits_per_weight(self.n_bytes, self.n_elements)


@dataclass(frozen=True)
class GGUFAnatomy:
    """What :func:`anatomy` reads from a GGUF file."""

    path: Path
    file_bytes: int
    magic: bytes
    version: int
    n_tensors: int
    n_kv: int
    alignment: int
    data_offset: int
    metadata: dict[str, object] = field(repr=False)
    tensors: tuple[TensorInfo, ...] = field(repr=False)

    def tensor(self, name: str) -> TensorInfo:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(f"{self.path.name} has no tensor {name!r}")


def read(path: str | Path):
    """A ``gguf.GGUFReader`` for ``path``; a missing, truncated or corrupt file raises a clear error."""
    gguf = _import_gguf()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGUFFormatError(f"{path} is not a GGUF file: it starts with {magic!r}, not b'GGUF'")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, OSError, EOFError, KeyError) as err:
        raise GGUFFormatError(f"{path} is not a readable GGUF file (truncated or corrupt?): {err}") from None
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > path.stat().st_size:
        raise GGUFFormatError(f"{path} is truncated: its tensors need {end:,} bytes, the file has {path.stat().st_size:,}")
    return reader


def _short(value: object) -> object:
    """Metadata value for display: long arrays become a note of their length."""
    if isinstance(value, list) and len(value) > 8:
        return f"<array of {len(value)} {type(value[0]).__name__}>"
    return value


def anatomy(path: str | Path) -> GGUFAnatomy:
    """Header, metadata (long arrays summarised), alignment, data offset and tensor table of a GGUF."""
    gguf = _import_gguf()
    reader = read(path)
    path = Path(path)
    header = {name: reader.get_field(name).contents() for name in ("GGUF.version", "GGUF.tensor_count", "GGUF.kv_count")}
    metadata = {f.name: _short(f.contents()) for f in reader.fields.values() if not f.name.startswith("GGUF.")}
    tensors = tuple(TensorInfo(t.name, t.tensor_type.name, tuple(int(d) for d in reversed(t.shape)),
                               int(t.data_offset), int(t.n_bytes)) for t in reader.tensors)
    align = reader.get_field(gguf.Keys.General.ALIGNMENT)
    return GGUFAnatomy(
        path=path,
        file_bytes=path.stat().st_size,
        magic=bytes(reader.data[:4]),
        version=int(header["GGUF.version"]),
        n_tensors=int(header["GGUF.tensor_count"]),
        n_kv=int(header["GGUF.kv_count"]),
        alignment=int(align.contents()) if align is not None else 32,
        data_offset=int(reader.data_offset),
        metadata=metadata,
        tensors=tensors,
    )


def _float_values(tensor) -> np.ndarray:
    """A ``gguf.ReaderTensor`` dequantized to float32, numpy shape (GGUF lists the fastest dimension first)."""
    values = _import_gguf().quants.dequantize(tensor.data, tensor.tensor_type)
    return values.reshape([int(d) for d in reversed(tensor.shape)]).astype(np.float32)


def tensor_bytes(path: str | Path, name: str) -> tuple[str, np.ndarray]:
    """The raw bytes of one tensor, shape (rows, bytes per row), and its type name."""
    for t in read(path).tensors:
        if t.name == name:
            return t.tensor_type.name, np.array(t.data).reshape(-1, t.data.shape[-1]).view(np.uint8)
    raise KeyError(f"{path} has no tensor {name!r}")


def float_tensor(path: str | Path, name: str) -> np.ndarray:
    """One tensor dequantized to float32, numpy shape (rows, columns)."""
    for t in read(path).tensors:
        if t.name == name:
            return _float_values(t)
    raise KeyError(f"{path} has no tensor {name!r}")


TensorFn = Callable[[str, np.ndarray], tuple[np.ndarray, object]]
"""``(name, float32 values) -> (array to store, gguf.GGMLQuantizationType or None)``: ``None`` stores the
array as it is (its numpy dtype decides: float32 -> F32, float16 -> F16); a type means the array holds
that type's raw bytes, shape (rows, bytes per row)."""


def rewrite(src: str | Path, dst: str | Path, convert: TensorFn, file_type: int | None = None) -> Path:
    """Write ``dst`` with ``src``'s metadata and every tensor dequantized and passed through ``convert``.

    ``file_type`` sets ``general.file_type`` (llama.cpp's ``LLAMA_FTYPE_*`` number) when given. The file
    is written under a temporary name and renamed when complete, so a crash never leaves a partial GGUF.
    """
    gguf = _import_gguf()
    reader = read(src)
    dst = Path(dst)
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    partial = dst.with_name(dst.name + ".partial")
    writer = gguf.GGUFWriter(partial, arch=arch)
    for fld in reader.fields.values():
        if fld.name == gguf.Keys.General.ARCHITECTURE or fld.name.startswith("GGUF."):
            continue  # the writer adds these itself
        value_type = fld.types[0]
        sub_type = fld.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        value = fld.contents()
        if fld.name == gguf.Keys.General.FILE_TYPE and file_type is not None:
            value = int(file_type)
        writer.add_key_value(fld.name, value, value_type, sub_type=sub_type)
    for tensor in reader.tensors:
        array, raw_type = convert(tensor.name, _float_values(tensor))
        if raw_type is None:
            writer.add_tensor(tensor.name, array)
        else:
            writer.add_tensor(tensor.name, array, raw_shape=array.shape, raw_dtype=raw_type)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    partial.replace(dst)
    return dst


# ----------------------------------------------------------------------------------------- summary


@dataclass(frozen=True)
class GGUFSummary:
    """What a GGUF holds: tensors per type, parameters, tensor bytes, and bytes read per token.

    ``bytes_per_token``: bytes a decode step must stream: all tensors, except that the token
    embedding counts as one row when a separate ``output.weight`` exists (a lookup reads one row;
    with tied embeddings the same matrix is also the output projection and is read in full).
    """

    path: Path
    tensor_types: dict[str, int]
    n_parameters: int
    tensor_bytes: int
    bytes_per_token: int
    metadata: dict[str, object] = field(default_factory=dict)

    @property
    def bits_per_weight(self) -> float:
        return memory.stored_bits_per_weight(self.tensor_bytes, self.n_parameters)


def gguf_summary(path: str | Path) -> GGUFSummary:
    """Read a GGUF's tensor table (no tensor data is loaded) and summarise it.

    Parsing the metadata (a vocabulary of tens of thousands of strings) takes a second or more,
    so results are cached per file path, size and modification time.
    """
    path = Path(path)
    stat = path.stat()
    return _gguf_summary(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _gguf_summary(path: str, _size: int, _mtime_ns: int) -> GGUFSummary:
    gguf = _import_gguf()
    reader = gguf.GGUFReader(path)
    names = {t.name for t in reader.tensors}
    types: Counter[str] = Counter()
    n_params = n_bytes = per_token = 0
    for tensor in reader.tensors:
        types[tensor.tensor_type.name] += 1
        n_params += int(tensor.n_elements)
        n_bytes += int(tensor.n_bytes)
        if tensor.name == "token_embd.weight" and "output.weight" in names:
            rows = int(tensor.shape[-1])
            per_token += int(tensor.n_bytes) // max(rows, 1)
        else:
            per_token += int(tensor.n_bytes)
    fields = {key: reader.get_field(key) for key in ("general.architecture", "general.name", "general.file_type")}
    metadata = {key: fld.contents() for key, fld in fields.items() if fld is not None}
    return GGUFSummary(Path(path), dict(sorted(types.items())), n_params, n_bytes, per_token, metadata)


# ------------------------------------------------------------------------------------ float export


def gguf_cache_dir() -> Path:
    """Folder for the GGUF files the course writes: ``<cache>/gguf``."""
    path = config.cache_dir() / "gguf"
    path.mkdir(parents=True, exist_ok=True)
    return path


_TYPE_SUFFIX = re.compile(r"^(F16|F32|BF16|Q\d\w*|IQ\d\w*|TQ\d\w*|MXFP4\w*)$", re.IGNORECASE)


def _base_stem(path: Path) -> str:
    """``SmolLM2-135M-Instruct.Q4_1.gguf`` -> ``SmolLM2-135M-Instruct`` (drops a type suffix)."""
    stem = path.name[: -len(".gguf")] if path.name.endswith(".gguf") else path.stem
    head, _, tail = stem.rpartition(".")
    return head if head and _TYPE_SUFFIX.match(tail) else stem


def _gguf_version() -> str:
    from importlib import metadata

    return metadata.version("gguf")


def _key_file(dst: Path) -> Path:
    return dst.with_name(dst.name + ".key")


def _is_fresh(dst: Path, src: Path, key: str) -> bool:
    """``dst`` exists, is not empty, is newer than ``src`` and was made with cache key ``key`` (written
    beside it by :func:`_made`): a cached file to reuse."""
    return (dst.is_file() and dst.stat().st_size > 0 and dst.stat().st_mtime >= src.stat().st_mtime
            and _key_file(dst).is_file() and _key_file(dst).read_text() == key)


def _made(dst: Path, key: str) -> Path:
    """Record beside ``dst`` the cache key it was made with (:func:`course_utils.cache.key`); returns ``dst``."""
    _key_file(dst).write_text(key)
    return dst


def export_f16_gguf(src: str | Path | None = None, dst: str | Path | None = None, overwrite: bool = False) -> Path:
    """Write a float GGUF: every tensor of ``src`` dequantized; 2-D as F16, 1-D as F32.

    ``src`` defaults to the course's model (``course_utils.models.default_gguf_path()``);
    ``dst`` defaults to ``<cache>/gguf/<name>.F16.gguf`` and is reused when newer than ``src``.
    All metadata key/values are copied; ``general.file_type`` is set to 1 (mostly F16).
    Note: a value dequantized from Q4_1 or Q8_0 is rounded once more to the nearest F16.
    llama.cpp's quantizer starts from such a float file.
    """
    gguf = _import_gguf()
    if src is None:
        from course_utils.models import default_gguf_path

        src = default_gguf_path()
    src = Path(src)
    dst = Path(dst) if dst is not None else gguf_cache_dir() / f"{_base_stem(src)}.F16.gguf"
    key = cache.key({"export": "F16", "src": src.name}, code=(__name__,), libraries={"gguf": _gguf_version()})
    if _is_fresh(dst, src, key) and not overwrite:
        return dst

    def to_float(name: str, values: np.ndarray):
        return values.astype(np.float16 if values.ndim >= 2 else np.float32), None

    return _made(rewrite(src, dst, to_float, file_type=int(gguf.LlamaFileType.MOSTLY_F16)), key)


# ------------------------------------------------------------------------------------ tensor names


@functools.lru_cache(maxsize=8)
def _tensor_name_map(arch: str, n_blocks: int):
    gguf = _import_gguf()
    archs = {name: key for key, name in gguf.MODEL_ARCH_NAMES.items()}
    if arch not in archs:
        raise ValueError(f"arch must be an architecture name gguf knows (llama, qwen2, gemma3, ...), got {arch!r}")
    return gguf.get_tensor_name_map(archs[arch], n_blocks)


def gguf_tensor_name(hf_name: str, arch: str = "llama") -> str:
    """llama.cpp's tensor name for a weight inside a transformers decoder layer, from gguf-py's own tensor
    name map for ``arch`` (``general.architecture``): ``model.layers.3.mlp.up_proj`` -> ``blk.3.ffn_up.weight``.

    ``ValueError`` for a name outside the decoder layers (``lm_head``) or one the map does not know.
    """
    blocks = [int(part) for part in hf_name.split(".") if part.isdigit()]
    if blocks:
        mapping = _tensor_name_map(arch, 64 * (max(blocks) // 64 + 1))
        name = mapping.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is not None and name.startswith("blk."):
            return name if name.endswith((".weight", ".bias")) else f"{name}.weight"
    raise ValueError(f"hf_name {hf_name!r} is not a weight inside a decoder layer that gguf's {arch} tensor map knows "
                     f"(e.g. 'model.layers.3.mlp.up_proj')")
