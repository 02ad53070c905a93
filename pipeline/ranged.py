"""Ranged reads of one object: only the bytes that are used are fetched.

:class:`RangeReader` is a seekable read-only file over an object whose reads are HTTP range GETs (one
cached chunk; ``bytes_read`` counts what was fetched); :class:`NpyRows` reads a C-order ``.npy`` stored
inside such an object row by row. The token shards' caption features (``pipeline.shards``) and ADM
reference batches (``pipeline.sample.formats``) are read through them.
"""
from __future__ import annotations

import io
from typing import Any, Optional

import numpy as np


class RangeReader(io.RawIOBase):
    """A read-only seekable file over one object, fetched by ranged reads (``fs.cat_file(path, start,
    end)``: one HTTP range GET on S3) with one cached chunk; ``bytes_read`` counts what was fetched.

    Reads shorter than ``chunk`` fetch a whole chunk from their start (tar headers and small members
    come from one request); longer ones fetch exactly their range.
    """

    def __init__(self, fs: Any, path: str, size: Optional[int] = None, chunk: int = 64 * 1024):
        super().__init__()
        self.fs, self.path, self.chunk = fs, path, max(512, int(chunk))
        self.size = int(size) if size is not None else int(fs.size(path))
        self.pos, self.bytes_read = 0, 0
        self._buf, self._buf_start = b"", 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def _fetch(self, start: int, end: int) -> bytes:
        data = self.fs.cat_file(self.path, start=start, end=end) if end > start else b""
        self.bytes_read += len(data)
        return data

    def pread(self, start: int, n: int) -> bytes:
        """``n`` bytes at ``start`` (fewer at the end of the object); does not move the position."""
        end = min(self.size, start + max(0, n))
        if start >= end:
            return b""
        if self._buf_start <= start and end <= self._buf_start + len(self._buf):
            return self._buf[start - self._buf_start:end - self._buf_start]
        if end - start >= self.chunk:
            return self._fetch(start, end)
        self._buf, self._buf_start = self._fetch(start, min(self.size, start + self.chunk)), start
        return self._buf[:end - start]

    def read(self, n: int = -1) -> bytes:
        data = self.pread(self.pos, self.size - self.pos if n is None or n < 0 else n)
        self.pos += len(data)
        return data

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)


def read_npy_header(f: Any) -> tuple[tuple[int, ...], bool, np.dtype]:
    """-> (shape, fortran_order, dtype) of the ``.npy`` stream ``f``, left at the first data byte."""
    version = np.lib.format.read_magic(f)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read_header(f)


class NpyRows:
    """A C-order ``.npy`` tar member read row by row: ``m[i]`` fetches the bytes of ``array[i]`` only.

    ``shape``, ``ndim``, ``dtype`` and ``len`` as the array's; raises ``ValueError`` naming the
    member if its header is not a plain C-order ``.npy`` header.
    """

    def __init__(self, reader: RangeReader, offset: int, size: int, name: str = "?"):
        head = io.BytesIO(reader.pread(offset, min(size, 4096)))
        try:
            shape, fortran, dtype = read_npy_header(head)
        except ValueError as e:
            raise ValueError(f"{name}: not a .npy member ({e})") from None
        if fortran or dtype.hasobject:
            raise ValueError(f"{name}: expected a C-order numeric .npy member")
        self.reader, self.name = reader, name
        self.shape, self.dtype, self.ndim = tuple(shape), dtype, len(shape)
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * dtype.itemsize
        self.data_offset = offset + head.tell()
        if self.data_offset - offset + self.shape[0] * self.row_bytes != size:
            raise ValueError(f"{name}: .npy header says {self.shape} {dtype}, member holds {size} bytes")

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, i: int) -> np.ndarray:
        i = int(i)
        if not 0 <= i < self.shape[0]:
            raise IndexError(f"{self.name}: row {i} outside [0, {self.shape[0]})")
        data = self.reader.pread(self.data_offset + i * self.row_bytes, self.row_bytes)
        return np.frombuffer(data, dtype=self.dtype).reshape(self.shape[1:]).copy()
