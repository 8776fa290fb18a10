"""The GGUF file format through the ``gguf`` package: read a file's anatomy, rewrite its tensors.

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
file and compute from it without copying.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from course_utils.backends.llamacpp import _import_gguf


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
        return 8 * self.n_bytes / self.n_elements


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
    tensors = tuple(
        TensorInfo(
            t.name, t.tensor_type.name, tuple(int(d) for d in reversed(t.shape)), int(t.data_offset), int(t.n_bytes)
        )
        for t in reader.tensors
    )
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


def tensor_bytes(path: str | Path, name: str) -> tuple[str, np.ndarray]:
    """The raw bytes of one tensor, shape (rows, bytes per row), and its type name."""
    for t in read(path).tensors:
        if t.name == name:
            return t.tensor_type.name, np.array(t.data).reshape(-1, t.data.shape[-1]).view(np.uint8)
    raise KeyError(f"{path} has no tensor {name!r}")


def float_tensor(path: str | Path, name: str) -> np.ndarray:
    """One tensor dequantized to float32, numpy shape (rows, columns)."""
    gguf = _import_gguf()
    for t in read(path).tensors:
        if t.name == name:
            values = gguf.quants.dequantize(t.data, t.tensor_type)
            return values.reshape([int(d) for d in reversed(t.shape)]).astype(np.float32)
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
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        # GGUF shapes list the fastest dimension first; numpy's row-major shape is the reverse.
        values = values.reshape([int(d) for d in reversed(tensor.shape)]).astype(np.float32)
        array, raw_type = convert(tensor.name, values)
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
