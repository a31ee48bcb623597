"""Decrypt a sealed GGUF while llama.cpp reads it, instead of before (`vault.overlap_load`).

Without this, a sealed start decrypts every chunk into a fresh memfd and only then lets llama.cpp
map it. Here a background thread decrypts the container's chunks in the order llama.cpp will read
them while llama.cpp loads with `use_mmap=False`, which reads each tensor with fseek + fread and
calls its progress callback before each one. The callback (`FillingBuffer.gate`) blocks until the
chunks the next tensors need are authenticated and written; a chunk whose tag fails makes it return
false, which aborts the load. Each chunk is decrypted into a scratch buffer and copied into the memfd
only after its tag checked (`SealedFile.decrypt_chunks`), so llama.cpp never reads unauthenticated
plaintext, and the memfd is sealed once complete, before the engine is handed out.

That is `vault.overlap_load = "read"`. With "map", llama.cpp maps the memfd as usual and only its
header parsing, vocabulary and mapping overlap the decryption: its first progress callback, before it
touches any weight (repacking copies weights after it), waits for the whole file.

In "read", llama.cpp reads tensors in its own order (creation order), not the file's. The plan assumes the
tensors outside the blocks (`token_embd`, `output_norm`, ...) come first, then block 0, 1, 2, ...,
each block's tensors in any order, and reads llama.cpp's position in the plan from the progress value
(bytes loaded so far). Nothing trusts that plan: at every callback the offset of llama.cpp's file
descriptor (/proc/self/fdinfo) bounds what it has read since the previous callback, and when any of
those bytes were not decrypted by then the load is aborted and redone after a full decryption. The
same happens for a GGUF llama.cpp reads in another order (a model whose tensors it skips).
"""

from __future__ import annotations

import bisect
import ctypes
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from typing import Any

from ..errors import CodemoatError
from ..vault.codec import VaultError
from ..vault.container import SealedFile, default_threads
from .memfd import MemfdBuffer

log = logging.getLogger("codemoat.vault")

#: what one fread may pull in beyond a tensor's end (glibc's FILE buffer: the file's st_blksize)
READ_AHEAD = 64 << 10
_BLOCK = re.compile(r"blk\.(\d+)\.")


def gguf_table(header: bytes) -> tuple[int, list[tuple[str, int, int]]]:
    """(data offset, [(tensor name, absolute offset, bytes)]) from a GGUF header held in `header`, parsed
    by llama.cpp's own reader (ggml's `gguf_init_from_buffer`); ValueError when `header` is too short."""
    from llama_cpp._ggml import libggml

    class Params(ctypes.Structure):
        _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]

    lib = libggml
    lib.gguf_init_from_buffer.restype = ctypes.c_void_p
    lib.gguf_init_from_buffer.argtypes = [ctypes.c_char_p, ctypes.c_size_t, Params]
    for fn, res in (("gguf_get_data_offset", ctypes.c_size_t), ("gguf_get_n_tensors", ctypes.c_int64)):
        getattr(lib, fn).restype, getattr(lib, fn).argtypes = res, [ctypes.c_void_p]
    for fn, res in (
        ("gguf_get_tensor_name", ctypes.c_char_p),
        ("gguf_get_tensor_offset", ctypes.c_size_t),
        ("gguf_get_tensor_size", ctypes.c_size_t),
    ):
        getattr(lib, fn).restype, getattr(lib, fn).argtypes = res, [ctypes.c_void_p, ctypes.c_int64]
    lib.gguf_free.argtypes = [ctypes.c_void_p]
    ctx = lib.gguf_init_from_buffer(header, len(header), Params(True, None))
    if not ctx:
        raise ValueError("GGUF header incomplete")
    try:
        base = lib.gguf_get_data_offset(ctx)
        table = [
            (
                lib.gguf_get_tensor_name(ctx, i).decode("utf-8", "replace"),
                base + lib.gguf_get_tensor_offset(ctx, i),
                lib.gguf_get_tensor_size(ctx, i),
            )
            for i in range(lib.gguf_get_n_tensors(ctx))
        ]
    finally:
        lib.gguf_free(ctx)
    return base, table


class _Plan:
    """The chunk order and, per group of tensors, how far along that order llama.cpp may read."""

    def __init__(self, table: list[tuple[str, int, int]], first: list[int], chunk: int, n_chunks: int):
        groups: dict[int, list[tuple[int, int]]] = {}
        for name, start, size in table:
            m = _BLOCK.match(name)
            groups.setdefault(int(m.group(1)) + 1 if m else 0, []).append((start, size))
        self.order = list(first)
        self.pos = {c: i for i, c in enumerate(self.order)}
        self.starts: list[int] = []  # bytes llama.cpp has loaded when it begins each group
        self.upto: list[int] = []  # plan entries that must be done before it reads that group
        loaded = 0
        for g in sorted(groups):
            for start, size in sorted(groups[g]):
                last = min(start + size + READ_AHEAD, n_chunks * chunk) - 1
                for c in range(start // chunk, last // chunk + 1):
                    if c not in self.pos:
                        self.pos[c] = len(self.order)
                        self.order.append(c)
            self.starts.append(loaded)
            self.upto.append(len(self.order))
            loaded += sum(size for _, size in groups[g])
        self.total = loaded
        for c in range(n_chunks):  # gaps and padding: what no tensor covers
            if c not in self.pos:
                self.pos[c] = len(self.order)
                self.order.append(c)

    def need(self, loaded: int) -> int:
        """Plan entries done before llama.cpp, having loaded `loaded` bytes, reads its next tensor."""
        slack = max(1024, self.total >> 20)  # the progress value is a float32: ~70 bytes per GiB
        g = max(0, bisect.bisect_right(self.starts, loaded + slack) - 1)
        return self.upto[g]


class FillingBuffer(MemfdBuffer):
    """A memfd that a background thread fills with a sealed file's plaintext in llama.cpp's read order."""

    def __init__(self, sealed: SealedFile, key: bytes, *, mode: str = "read", threads: int | None = None):
        if mode not in ("read", "map"):
            raise ValueError(f"overlap mode {mode!r} is not read or map")
        self.mode = mode
        super().__init__(sealed.manifest.plaintext_size, name=f"codemoat-{sealed.manifest.model_id}")
        self.sealed_file, self._key = sealed, key
        self.chunk, self.n_chunks = sealed.manifest.chunk_size, sealed.n_chunks
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self.failed: str | None = None
        #: how the load went: "overlap" (llama.cpp read behind the decryptor), "fallback" (it read
        #: ahead of it, so the load was redone after a full decryption), or "" (not loaded yet)
        self.outcome = ""
        self.reason = ""
        self.gate_wait_s = 0.0
        self._threads = threads or max(1, default_threads() - 1)  # one core for llama.cpp's reader
        self._workers: list[threading.Thread] = []
        try:
            self._start()
        except BaseException:
            self.close(zero=True)
            raise

    # -- decryption --------------------------------------------------------------
    def _write(self, offset: int, data: memoryview) -> None:
        if self.hugepages:
            self.view[offset : offset + len(data)] = data
        else:
            self.write_at(offset, data)

    def _start(self) -> None:
        """Decrypt the header (synchronously), plan the rest, and start the decrypting threads."""
        table = None
        done = 0
        while table is None:
            self.sealed_file.decrypt_chunks(self._key, [done], self._write)
            done += 1
            head = bytes(self.view[: min(done * self.chunk, self.size)])
            try:
                base, table = gguf_table(head)
            except ValueError:
                if done == self.n_chunks:
                    raise CodemoatError("the sealed model is not a GGUF file llama.cpp can read") from None
        header = min(self.n_chunks, -(-(base + READ_AHEAD) // self.chunk))
        self.plan = _Plan(table, list(range(max(done, header))), self.chunk, self.n_chunks)
        self.sealed_file.decrypt_chunks(self._key, range(done, max(done, header)), self._write)
        self._done = [i < max(done, header) for i in range(len(self.plan.order))]
        self._next = self.prefix = max(done, header)
        self._lock = threading.Lock()
        for i in range(self._threads):
            t = threading.Thread(target=self._work, name=f"codemoat-overlap-{i}", daemon=True)
            t.start()
            self._workers.append(t)

    def _take(self):
        """Chunk indices in plan order, shared by the workers (each holds its own generator)."""
        while True:
            with self._lock:
                i = self._next
                if i >= len(self.plan.order) or self._stop.is_set():
                    return
                self._next += 1
            yield self.plan.order[i]

    def _work(self) -> None:
        def write(offset: int, data: memoryview) -> None:  # called once the chunk's tag checked out
            self._write(offset, data)
            with self._cond:
                self._done[self.plan.pos[offset // self.chunk]] = True
                while self.prefix < len(self._done) and self._done[self.prefix]:
                    self.prefix += 1
                self._cond.notify_all()

        try:
            self.sealed_file.decrypt_chunks(self._key, self._take(), write, self._stop)
        except Exception as e:
            with self._cond:
                self.failed = self.failed or (str(e) if isinstance(e, CodemoatError) else f"{type(e).__name__}: {e}")
                self._stop.set()
                self._cond.notify_all()

    def wait(self, upto: int) -> bool:
        """Block until the first `upto` plan entries are done; False once a chunk failed."""
        with self._cond:
            while self.prefix < upto and self.failed is None:
                self._cond.wait()
            return self.failed is None

    def finish(self) -> None:
        """Wait for every chunk, then seal; raises `VaultError` (one line) when a chunk failed."""
        self.wait(len(self.plan.order))
        for t in self._workers:
            t.join()
        if self.failed is not None:
            raise VaultError(self.failed)
        self.seal()

    def close(self, zero: bool = True) -> None:
        self._stop.set()
        for t in self._workers:
            t.join()
        super().close(zero=zero)

    # -- llama.cpp's side -------------------------------------------------------------
    def _other_fds(self) -> list[int]:
        """Every other descriptor of this memfd in this process: llama.cpp's (it opened `self.path`)."""
        me = os.fstat(self.fd)
        found = []
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            try:
                st = os.stat(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            if fd != self.fd and (st.st_dev, st.st_ino) == (me.st_dev, me.st_ino):
                found.append(fd)
        return found

    def _position(self, fd: int) -> int | None:
        try:
            with open(f"/proc/self/fdinfo/{fd}", encoding="ascii") as f:
                for line in f:
                    if line.startswith("pos:"):
                        return int(line.split()[1])
        except OSError:
            pass
        return None

    def _read_was_safe(self, pos: int, span: int, snapshot: int) -> bool:
        """Were all bytes of [pos - span, pos) decrypted when the last callback returned (`snapshot`)?"""
        lo, hi = max(0, pos - span), min(pos, self.size)
        if hi <= lo:
            return True
        return all(self.plan.pos[c] < snapshot for c in range(lo // self.chunk, (hi - 1) // self.chunk + 1))

    def gate(self) -> Callable[[float, Any], bool]:
        """llama.cpp's progress callback for one load (see the module's docstring)."""
        import llama_cpp

        state: dict[str, Any] = {"fds": None, "seen": set(), "loaded": 0, "snapshot": self.prefix}

        def whole(progress: float) -> bool:
            """map: before its first tensor llama.cpp has read the header only; from there, everything."""
            if state["fds"] is None:
                state["fds"] = []
                t = time.perf_counter()
                if not self.wait(len(self.plan.order)):
                    return False
                self.gate_wait_s += time.perf_counter() - t
            return True

        def check(progress: float) -> bool:
            loaded = round(progress * self.plan.total)
            if state["fds"] is None:
                state["fds"] = self._other_fds()
                if not state["fds"]:
                    self.reason = "cannot see llama.cpp's descriptor of the model file"
                    return False
            # what llama.cpp read since the last callback: one tensor (plus what its FILE buffer read
            # ahead, and a float32's rounding on the size); everything before, the first time
            span = loaded - state["loaded"] + READ_AHEAD + max(1024, self.plan.total >> 20)
            positions = {fd: self._position(fd) for fd in state["fds"]}
            if None in positions.values() or state["seen"] and not any(positions.values()):
                # from the second callback on, llama.cpp has read a tensor: one of these has moved (the
                # others are, e.g., the duplicate descriptor our own mmap keeps, which stays at 0)
                self.reason = "cannot read llama.cpp's file position"
                return False
            for fd, pos in positions.items():
                if not self._read_was_safe(pos, span if fd in state["seen"] else pos, state["snapshot"]):
                    self.reason = f"llama.cpp read bytes before {pos} ahead of the decryption (another tensor order)"
                    return False
                state["seen"].add(fd)
            state["loaded"] = loaded
            if progress < 1.0:
                t = time.perf_counter()
                if not self.wait(self.plan.need(loaded)):
                    return False
                self.gate_wait_s += time.perf_counter() - t
            state["snapshot"] = self.prefix
            return True

        @llama_cpp.llama_progress_callback
        def callback(progress: float, _user: Any) -> bool:
            try:
                return whole(progress) if self.mode == "map" else check(progress)
            except Exception as e:  # a callback must not raise into C: abort the load instead
                self.reason = f"{type(e).__name__}: {e}"
                return False

        return callback

    def load_overlapped(self, make: Callable[..., Any]) -> Any:
        """`make(use_mmap=..., progress=callback)` builds the engine while this buffer fills; if
        llama.cpp got ahead of the decryption, `make()` again after it (mmap, as without overlap)."""
        callback = self.gate()
        try:
            try:
                engine = make(use_mmap=self.mode == "map", progress=callback)
            except CodemoatError:
                if self.failed is not None:
                    raise VaultError(self.failed) from None
                if not self.reason:
                    raise
                self.finish()
                self.outcome = "fallback"
                log.warning("overlapped load redone after full decryption: %s", self.reason)
                return make()
        except BaseException:
            self.close(zero=True)
            raise
        try:
            self.finish()
        except BaseException:
            engine.close()  # zeroes and closes this buffer too
            raise
        self.outcome = "overlap"
        return engine
