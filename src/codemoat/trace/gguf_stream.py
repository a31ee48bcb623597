"""A GGUF file read tensor by tensor: the header parsed once, tensor bytes read with `pread`.

Format (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md): magic "GGUF", version u32,
tensor count u64, key/value count u64, the key/values, one info per tensor (name, n_dims, ne[],
type u32, offset u64 from the data section), then the data section at the next multiple of
`general.alignment` (32 by default). Only scalar metadata is kept (arrays such as a 262k-token
vocabulary are skipped over, not decoded), so opening a large model costs milliseconds, and the
tensor bytes are read on demand into private buffers (no mapping of the whole file: memory stays
at the rows being worked on, whatever the model's size).

Shapes are numpy order, the reverse of GGUF's `ne`: a linear layer is (n_out, n_in).
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CodemoatError

#: scalar value types: struct format (GGUFValueType ids)
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    name: str
    kind: str  # type name: "F16", "Q4_K", …
    type_id: int
    shape: tuple[int, ...]  # numpy order
    offset: int  # absolute, in the file
    nbytes: int
    block: int  # values per quantisation block (1 for float types)
    block_bytes: int

    @property
    def rows(self) -> int:
        return int(np.prod(self.shape[:-1])) if len(self.shape) > 1 else 1

    @property
    def cols(self) -> int:
        return self.shape[-1]

    @property
    def row_bytes(self) -> int:
        return self.cols // self.block * self.block_bytes

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))


class GGUFFile:
    """The header of a GGUF file, and its tensors' bytes on demand."""

    def __init__(self, path: str | os.PathLike[str], name: str | None = None):
        self.path = Path(path)
        self.name = name or str(path)
        from ..paths import open_regular

        self._fd = open_regular(self.path, "GGUF file")[0]  # a FIFO or device is refused, not waited on
        try:
            self.file_size = os.fstat(self._fd).st_size
            self._parse()
        except (struct.error, UnicodeDecodeError, ValueError, IndexError, KeyError, OverflowError, MemoryError, RecursionError):
            self.close()
            raise CodemoatError(f"{self.name}: truncated or not a valid GGUF file") from None
        except BaseException:
            self.close()
            raise

    # -- header -------------------------------------------------------------
    def _parse(self) -> None:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        buf = _Reader(self._fd, self.file_size)
        if buf.take(4) != b"GGUF":
            raise ValueError("magic")
        version, n_tensors, n_kv = buf.unpack("<IQQ")
        if version < 2 or n_tensors > MAX_COUNT or n_kv > MAX_COUNT:
            raise ValueError("header counts")
        self.metadata: dict = {}
        for _ in range(n_kv):
            key = buf.string()
            (vtype,) = buf.unpack("<I")
            value = buf.value(vtype)
            if value is not _SKIPPED:
                self.metadata[key] = value
        align = self.metadata.get("general.alignment", 32)
        if type(align) is not int or not 0 < align <= 1 << 30:  # 0 was a ZeroDivisionError, < 0 data inside the header
            raise ValueError("alignment")
        infos = []
        for _ in range(n_tensors):
            name = buf.string()
            (n_dims,) = buf.unpack("<I")
            if n_dims > 8:
                raise ValueError("dims")
            ne = buf.unpack(f"<{n_dims}Q")
            type_id, offset = buf.unpack("<IQ")
            infos.append((name, ne, type_id, offset))
        data_start = -(-buf.pos // align) * align
        self.header_size = data_start
        self.tensors: list[TensorInfo] = []
        for name, ne, type_id, offset in infos:
            kind = GGMLQuantizationType(type_id)
            block, block_bytes = GGML_QUANT_SIZES[kind]
            n = math.prod(ne)  # Python ints: np.prod wrapped (2^32 x 2^32 values was 0 bytes, then read whole)
            if ne and ne[0] % block:
                raise ValueError("row size")
            nbytes = n // block * block_bytes
            if data_start + offset + nbytes > self.file_size:
                raise ValueError("tensor past the end")
            self.tensors.append(
                TensorInfo(
                    name, kind.name, type_id, tuple(int(d) for d in reversed(ne)), data_start + offset, nbytes, block, block_bytes
                )
            )
        self.by_name = {t.name: t for t in self.tensors}

    # -- data ---------------------------------------------------------------
    def read(self, offset: int, size: int) -> np.ndarray:
        """`size` bytes at `offset` as a fresh uint8 array (a private buffer, not a mapping)."""
        out = np.empty(size, np.uint8)
        view = memoryview(out)
        got = 0
        while got < size:
            n = os.preadv(self._fd, [view[got:]], offset + got)
            if n <= 0:
                raise CodemoatError(f"{self.name}: truncated or not a valid GGUF file")
            got += n
        return out

    def raw_rows(self, t: TensorInfo, row0: int, row1: int) -> np.ndarray:
        """Rows row0..row1-1 of `t` as stored: uint8 of shape (rows, row_bytes)."""
        rb = t.row_bytes
        return self.read(t.offset + row0 * rb, (row1 - row0) * rb).reshape(row1 - row0, rb)

    def rows(self, t: TensorInfo, row0: int, row1: int) -> np.ndarray:
        """Rows row0..row1-1 of `t` (flattened to 2-D) as float32 (rows, cols)."""
        from .quant import to_float

        return to_float(self.raw_rows(t, row0, row1), t.kind, t.cols)

    def matrix(self, t: TensorInfo) -> np.ndarray:
        """All of `t` as float32, numpy shape."""
        return self.rows(t, 0, t.rows).reshape(t.shape)

    def row_blocks(self, t: TensorInfo, max_bytes: int = 32 << 20) -> Iterator[tuple[int, int]]:
        """(row0, row1) ranges covering `t`, each at most `max_bytes` as float32 (at least one row)."""
        step = max(1, max_bytes // (4 * t.cols))
        for r0 in range(0, t.rows, step):
            yield r0, min(t.rows, r0 + step)

    def close(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_SKIPPED = object()

#: the most tensors or key/values a header may claim: about 400 bytes of memory each once parsed
#: (2^24 was ~7 GB from a 560 MB file); the largest models hold a few thousand tensors
MAX_COUNT = 1 << 18

#: the longest key, string value or tensor name kept (a chat template is tens of kB; a string that
#: claims more would be read whole into memory)
MAX_STRING = 16 << 20


class _Reader:
    """Sequential reads of the header through a growing window of `pread`s."""

    def __init__(self, fd: int, size: int):
        self.fd, self.size, self.pos = fd, size, 0
        self.buf, self.base = b"", 0

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > self.size or n < 0:
            raise ValueError("past the end")
        if end > self.base + len(self.buf):
            self.buf = os.pread(self.fd, max(n, 1 << 20), self.pos)
            self.base = self.pos
        out = self.buf[self.pos - self.base : end - self.base]
        self.pos = end
        return out

    def skip(self, n: int) -> None:
        """Past `n` bytes without reading them (a skipped array or string costs no memory, whatever it claims)."""
        if n < 0 or self.pos + n > self.size:
            raise ValueError("past the end")
        self.pos += n

    def unpack(self, fmt: str) -> tuple:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))

    def string(self) -> str:
        (n,) = self.unpack("<Q")
        if n > MAX_STRING:
            raise ValueError("string length")
        return self.take(n).decode("utf-8")

    def value(self, vtype: int):
        if vtype in _SCALAR:
            return self.unpack("<" + _SCALAR[vtype])[0]
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, n = self.unpack("<IQ")
            if etype in _SCALAR:
                self.skip(n * struct.calcsize(_SCALAR[etype]))
            elif etype == _STRING:
                for _ in range(n):
                    (k,) = self.unpack("<Q")
                    self.skip(k)
            else:
                for _ in range(n):
                    self.value(etype)
            return _SKIPPED
        raise ValueError(f"value type {vtype}")
