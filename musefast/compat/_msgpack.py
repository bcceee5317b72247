"""A small, safe reader of the msgpack that flax's checkpoints are made of (no msgpack or flax needed).

``flax.serialization.to_bytes`` / ``msgpack_serialize`` (and ``flax.training.checkpoints`` in its
msgpack format) write a msgpack map of maps whose leaves are numbers, strings, and numpy arrays
stored as msgpack *extension* values (flax ``serialization.py``):

* ext 1, ndarray: the payload is itself msgpack, ``[shape, dtype name, row-major bytes]``;
* ext 3, numpy scalar: the same payload, of a 0-d array;
* ext 2, complex: the payload is msgpack ``[real, imag]``;
* leaves over 1 GiB are split into ``{"__msgpack_chunked_array__": True, "shape": {"0": ..},
  "chunks": {"0": array, ..}}`` maps, joined back here.

:func:`loads` decodes the whole msgpack format except timestamps and other extension types,
and never executes anything: arrays are built with ``numpy.frombuffer`` from a whitelist of
plain dtypes (bool, ints, floats, complex; bfloat16 is widened to float32, exactly). Malformed
input — truncated data, trailing bytes, reserved bytes, unknown extension types or dtypes, an
array whose byte count does not match its shape, nesting deeper than ``max_depth``, keys that
are not strings, duplicate keys — raises :class:`MsgpackError`.
"""
from __future__ import annotations

import math
import os
import struct
from typing import Any

import numpy as np

__all__ = ["MsgpackError", "loads", "load"]

_EXT_NDARRAY, _EXT_COMPLEX, _EXT_NPSCALAR = 1, 2, 3
_CHUNKED = "__msgpack_chunked_array__"
# dtype names flax writes (numpy's ``dtype.name``), as little-endian numpy dtypes
_DTYPES = {name: np.dtype(name).newbyteorder("<") for name in (
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64", "complex64", "complex128")}

# msgpack first bytes of nil/false/true, of the fixed-size numbers, and the length fields of
# the 8/16/32-bit variants of bin, str and ext
_CONSTANTS = {0xC0: None, 0xC2: False, 0xC3: True}
_NUMBERS = {0xCA: ">f", 0xCB: ">d", 0xCC: ">B", 0xCD: ">H", 0xCE: ">I", 0xCF: ">Q",
            0xD0: ">b", 0xD1: ">h", 0xD2: ">i", 0xD3: ">q"}
_LENGTHS = (">B", ">H", ">I")


class MsgpackError(ValueError):
    """The data is not (supported) msgpack as flax writes it."""


class _Reader:
    def __init__(self, data, max_depth: int):
        self.buf = memoryview(data).cast("B")
        self.pos = 0
        self.max_depth = max_depth

    def take(self, n: int) -> memoryview:
        if n > len(self.buf) - self.pos:
            raise MsgpackError(f"truncated data: {n} bytes wanted at offset {self.pos}, "
                               f"{len(self.buf) - self.pos} left")
        out = self.buf[self.pos: self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def value(self, depth: int = 0, raw: bool = False) -> Any:
        if depth > self.max_depth:
            raise MsgpackError(f"nesting deeper than max_depth={self.max_depth}")
        offset = self.pos
        b = self.unpack(">B")
        if b <= 0x7F:
            return b
        if b >= 0xE0:
            return b - 0x100
        if 0x80 <= b <= 0x8F:
            return self.map(b & 0x0F, depth, raw)
        if 0x90 <= b <= 0x9F:
            return self.array(b & 0x0F, depth, raw)
        if 0xA0 <= b <= 0xBF:
            return self.string(b & 0x1F, raw)
        if b in _CONSTANTS:
            return _CONSTANTS[b]
        if b in _NUMBERS:
            return self.unpack(_NUMBERS[b])
        if 0xC4 <= b <= 0xC6:  # bin 8/16/32
            return bytes(self.take(self.unpack(_LENGTHS[b - 0xC4])))
        if 0xD9 <= b <= 0xDB:  # str 8/16/32
            return self.string(self.unpack(_LENGTHS[b - 0xD9]), raw)
        if b in (0xDC, 0xDD):  # array 16/32
            return self.array(self.unpack(">H" if b == 0xDC else ">I"), depth, raw)
        if b in (0xDE, 0xDF):  # map 16/32
            return self.map(self.unpack(">H" if b == 0xDE else ">I"), depth, raw)
        if 0xD4 <= b <= 0xD8:  # fixext 1/2/4/8/16
            return self.ext(self.unpack(">b"), 1 << (b - 0xD4), depth)
        if 0xC7 <= b <= 0xC9:  # ext 8/16/32
            n = self.unpack(_LENGTHS[b - 0xC7])
            return self.ext(self.unpack(">b"), n, depth)
        raise MsgpackError(f"reserved msgpack byte 0x{b:02x} at offset {offset}")

    def string(self, n: int, raw: bool):
        data = bytes(self.take(n))
        if raw:
            return data
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise MsgpackError(f"invalid UTF-8 in a string at offset {self.pos - n}") from e

    def array(self, n: int, depth: int, raw: bool) -> list:
        if n > len(self.buf) - self.pos:  # every element takes at least one byte
            raise MsgpackError(f"truncated data: an array of {n} elements at offset {self.pos}")
        return [self.value(depth + 1, raw) for _ in range(n)]

    def map(self, n: int, depth: int, raw: bool) -> dict:
        if 2 * n > len(self.buf) - self.pos:
            raise MsgpackError(f"truncated data: a map of {n} entries at offset {self.pos}")
        out = {}
        for _ in range(n):
            offset = self.pos
            key = self.value(depth + 1, raw)
            if not isinstance(key, (str, bytes)):
                raise MsgpackError(f"map key at offset {offset} is a {type(key).__name__}, not a string")
            if key in out:
                raise MsgpackError(f"duplicate map key {key!r} at offset {offset}")
            out[key] = self.value(depth + 1, raw)
        return _unchunk(out) if out.get(_CHUNKED) is True else out

    def ext(self, code: int, n: int, depth: int):
        offset = self.pos
        payload = self.take(n)
        if code in (_EXT_NDARRAY, _EXT_NPSCALAR):
            array = _ndarray(payload, depth, self.max_depth, offset)
            return array if code == _EXT_NDARRAY else array[()]
        if code == _EXT_COMPLEX:
            parts = _nested(payload, depth, self.max_depth, raw=False)
            if (not isinstance(parts, list) or len(parts) != 2
                    or not all(isinstance(p, (int, float)) and not isinstance(p, bool) for p in parts)):
                raise MsgpackError(f"complex value at offset {offset} is not [real, imag]")
            return complex(parts[0], parts[1])
        raise MsgpackError(f"unsupported msgpack extension type {code} at offset {offset}")


def _nested(payload: memoryview, depth: int, max_depth: int, raw: bool):
    """One msgpack value filling ``payload`` exactly (an extension's contents)."""
    reader = _Reader(payload, max_depth - depth)
    value = reader.value(0, raw)
    if reader.pos != len(payload):
        raise MsgpackError(f"{len(payload) - reader.pos} stray bytes inside an extension value")
    return value


def _ndarray(payload: memoryview, depth: int, max_depth: int, offset: int) -> np.ndarray:
    # flax packs (shape, dtype name, bytes) and reads it back with raw=True: names may be bytes
    parts = _nested(payload, depth, max_depth, raw=True)
    if not isinstance(parts, list) or len(parts) != 3:
        raise MsgpackError(f"array at offset {offset}: expected [shape, dtype, data], got {type(parts).__name__}")
    shape, name, data = parts
    if (not isinstance(shape, list)
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise MsgpackError(f"array at offset {offset}: bad shape {shape!r}")
    name = name.decode("ascii", "replace") if isinstance(name, bytes) else name
    if not isinstance(data, bytes):
        raise MsgpackError(f"array at offset {offset}: data is a {type(data).__name__}, not bytes")
    if name == "bfloat16":  # no numpy dtype: widen to float32 (exact: bf16 is float32's top half)
        dtype, itemsize = np.dtype("<u2"), 2
    elif name in _DTYPES:
        dtype = _DTYPES[name]
        itemsize = dtype.itemsize
    else:
        raise MsgpackError(f"array at offset {offset}: unsupported dtype {name!r}")
    count = math.prod(shape)
    if count * itemsize != len(data):
        raise MsgpackError(f"array at offset {offset}: {len(data)} bytes for shape {tuple(shape)} of {name}")
    array = np.frombuffer(bytearray(data), dtype=dtype, count=count).reshape(shape)
    if name == "bfloat16":
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(array.dtype.newbyteorder("="), copy=False)


def _unchunk(node: dict) -> np.ndarray:
    """A flax chunked-array map -> the array it stands for."""
    def tuple_of(d, what):
        if not isinstance(d, dict) or set(d) != {str(i) for i in range(len(d))}:
            raise MsgpackError(f"chunked array: {what} is not a {{'0': .., '1': ..}} map")
        return [d[str(i)] for i in range(len(d))]

    if set(node) != {_CHUNKED, "shape", "chunks"}:
        raise MsgpackError(f"chunked array with keys {sorted(node)}")
    shape = tuple_of(node["shape"], "shape")
    chunks = tuple_of(node["chunks"], "chunks")
    if not all(isinstance(c, np.ndarray) and c.ndim == 1 for c in chunks) or not chunks:
        raise MsgpackError("chunked array: chunks must be 1-d arrays")
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise MsgpackError(f"chunked array: bad shape {shape!r}")
    flat = np.concatenate(chunks)
    if flat.size != math.prod(shape):
        raise MsgpackError(f"chunked array: {flat.size} elements for shape {tuple(shape)}")
    return flat.reshape(shape)


def loads(data: bytes | bytearray | memoryview, *, max_depth: int = 64) -> Any:
    """Decode one msgpack value that fills ``data`` exactly (flax's arrays -> numpy arrays)."""
    reader = _Reader(data, max_depth)
    value = reader.value()
    if reader.pos != len(reader.buf):
        raise MsgpackError(f"{len(reader.buf) - reader.pos} trailing bytes after the msgpack value")
    return value


def load(path: str | os.PathLike, *, max_depth: int = 64) -> Any:
    """:func:`loads` of a file's contents."""
    with open(path, "rb") as f:
        return loads(f.read(), max_depth=max_depth)
