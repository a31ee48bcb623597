"""A bundle payload's chunks, read, hashed and checked on all usable cores at once (hashlib releases the GIL).

Format 2 signs the SHA-256 of each `CHUNK` bytes of the payload (`bundle.py`); chunks are independent,
so verify and apply check them in parallel, and apply writes a chunk only once it has checked out."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..cores import usable_cores

CHUNK = 16 << 20  # payload bytes per signed digest (64 digests per GiB)
MAX_THREADS = 8  # past this, memory bandwidth, not hashing, is the limit


def chunk_count(size: int, chunk: int) -> int:
    return -(-size // chunk)


def describe_payload(fmt: str, read_at: Callable[[int, memoryview], None], size: int, chunk: int = CHUNK) -> dict[str, Any]:
    """The manifest's `payload` field for `size` bytes that `read_at(offset, buffer)` fills: each
    chunk's SHA-256, the chunks hashed on all usable cores at once."""
    digests = [""] * chunk_count(size, chunk)

    def record(i: int, view: memoryview) -> bool:
        digests[i] = hashlib.sha256(view).hexdigest()
        return True

    each_chunk(read_at, size, chunk, record)
    return {"format": fmt, "size": size, "chunk_size": chunk, "chunks": digests}


def each_chunk(
    read_at: Callable[[int, memoryview], None],
    size: int,
    chunk: int,
    check: Callable[[int, memoryview], bool],
    then: Callable[[int, memoryview], Any] | None = None,
    threads: int | None = None,
) -> int | None:
    """Read chunk i of `size` bytes into a worker's own buffer (`read_at(offset, buffer)` fills it), then
    `check(i, chunk)` and, when it holds, `then(offset, chunk)`; `threads` workers (default: the usable
    cores) take every `threads`-th chunk, so that together they move through the file in order. Returns
    the first chunk whose check failed (the others stop), or None."""
    n = chunk_count(size, chunk)
    workers = max(1, min(threads or min(usable_cores(), MAX_THREADS), n))
    stop, failed = threading.Event(), []

    def work(first: int) -> None:
        view = memoryview(bytearray(min(chunk, size)))
        for i in range(first, n, workers):
            if stop.is_set():
                return
            lo = i * chunk
            part = view[: min(chunk, size - lo)]
            read_at(lo, part)
            if not check(i, part):
                failed.append(i)
                stop.set()
                return
            if then is not None:
                then(lo, part)

    if workers == 1:
        work(0)
    else:
        with ThreadPoolExecutor(workers, thread_name_prefix="codemoat-bundle") as pool:
            futures = [pool.submit(work, w) for w in range(workers)]
            try:
                for f in futures:
                    f.result()
            finally:
                stop.set()
    return min(failed, default=None)


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n
