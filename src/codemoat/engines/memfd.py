"""Plaintext weights in anonymous memory: a sealed memfd that a loader opens as `/proc/self/fd/N`.

The vault decrypts straight into `buffer.view` (`AESGCM.decrypt_into`), then `seal()` forbids
resizing and new writable mappings, so nothing can swap the bytes after verification. The file
lives only in RAM: no disk path ever holds the plaintext. `close()` zeroes it before release.

Huge pages. A fresh memfd costs the kernel one page allocation per 4 KiB written (about 3 GB/s
here, three times slower than AES-GCM), where a plaintext GGUF in the page cache costs nothing to
map. When the kernel allows transparent huge pages for shmem
(`/sys/kernel/mm/transparent_hugepage/shmem_enabled` is `advise`, `within_size`, `always` or
`force`), the mapping is advised `MADV_HUGEPAGE` and filled through 2 MiB pages at about memory
speed; the vault then decrypts straight into the mapping. With the kernel's default (`never`) the
buffer is filled with `pwrite`, the cheapest 4 KiB path (see docs/operations.md).
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import threading

# Linux values (fcntl exposes F_ADD_SEALS and most seals on 3.11; FUTURE_WRITE may be missing).
F_SEAL_SEAL = getattr(fcntl, "F_SEAL_SEAL", 0x0001)
F_SEAL_SHRINK = getattr(fcntl, "F_SEAL_SHRINK", 0x0002)
F_SEAL_GROW = getattr(fcntl, "F_SEAL_GROW", 0x0004)
F_SEAL_WRITE = getattr(fcntl, "F_SEAL_WRITE", 0x0008)
F_SEAL_FUTURE_WRITE = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x0010)
F_ADD_SEALS = getattr(fcntl, "F_ADD_SEALS", 1033)
F_GET_SEALS = getattr(fcntl, "F_GET_SEALS", 1034)
MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", 14)
SHMEM_THP = "/sys/kernel/mm/transparent_hugepage/shmem_enabled"
_HUGE_MODES = {"advise", "within_size", "always", "force"}


def shmem_thp_mode(path: str = SHMEM_THP) -> str:
    """The kernel's shmem huge-page policy (the bracketed word in sysfs), or "unavailable"."""
    try:
        text = open(path, encoding="ascii").read()
    except OSError:
        return "unavailable"
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else "unavailable"


def huge_pages_allowed() -> bool:
    """Whether a new MemfdBuffer's mapping may get 2 MiB pages (the kernel's shmem policy allows advising)."""
    return shmem_thp_mode() in _HUGE_MODES


class MemfdBuffer:
    """A fixed-size anonymous file with a writable mapping owned by this process."""

    def __init__(self, size: int, name: str = "codemoat-model", *, hugepages: bool = True):
        if size <= 0:
            raise ValueError("memfd size must be positive")
        self.size = size
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.fd, size)
        self._map = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.view = memoryview(self._map)
        self.sealed = False
        self.writable = True  # False for an adopted memfd: this process cannot zero it
        #: the SHA-256 of the content, when a signed manifest vouches for it (engines.sealed sets it
        #: once every chunk has authenticated): then nothing needs to hash the plaintext again
        self.sha256: str | None = None
        #: the kernel's shmem huge-page policy when the buffer was made
        self.policy = shmem_thp_mode()
        #: True when writes through `view` land in 2 MiB pages: fill through the mapping then.
        self.hugepages = hugepages and self.policy in _HUGE_MODES and self._advise_huge()

    def _advise_huge(self) -> bool:
        try:
            self._map.madvise(MADV_HUGEPAGE)
        except (OSError, ValueError):
            return False
        return True

    def write_at(self, offset: int, data: memoryview | bytes) -> None:
        """Copy `data` in at `offset` with `pwrite` (the kernel allocates the pages, no fault per page)."""
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview, name: str = "codemoat-model") -> MemfdBuffer:
        buf = cls(len(data), name)
        buf.view[:] = data
        buf.seal()
        return buf

    @classmethod
    def adopt(cls, fd: int, size: int) -> MemfdBuffer:
        """Take over a sealed memfd another process made (the vault daemon's, received over SCM_RIGHTS):
        refused unless it cannot shrink, grow or be written again and holds exactly `size` bytes.
        Mapped read-only; `close()` only lets go of it (the daemon zeroes its own copy)."""
        need = F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL
        try:
            seals, actual = fcntl.fcntl(fd, F_GET_SEALS), os.fstat(fd).st_size
        except OSError:
            seals, actual = 0, -1
        if seals & need != need or not seals & (F_SEAL_WRITE | F_SEAL_FUTURE_WRITE) or actual != size or size <= 0:
            os.close(fd)
            raise ValueError(f"not a sealed model file of {size} bytes (seals {seals:#x}, size {actual})")
        buf = cls.__new__(cls)
        buf.size, buf.fd, buf.sealed, buf.policy, buf.hugepages = size, fd, True, shmem_thp_mode(), False
        buf.sha256 = None
        buf._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        buf.view = memoryview(buf._map)
        buf.writable = False
        return buf

    @property
    def path(self) -> str:
        """A path the loader can open; valid only inside this process."""
        return f"/proc/self/fd/{self.fd}"

    def seal(self) -> None:
        """No shrink, no grow, no new writable mapping; our own mapping can still zero it at close."""
        fcntl.fcntl(self.fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_FUTURE_WRITE | F_SEAL_SEAL)
        self.sealed = True

    def seals(self) -> int:
        return fcntl.fcntl(self.fd, F_GET_SEALS)

    def close(self, zero: bool = True) -> None:
        if self.fd < 0:
            return
        if zero and self.writable:
            # memset through our own mapping: one C call, ~10x faster than slice assignment
            base = ctypes.c_char.from_buffer(self._map)
            ctypes.memset(ctypes.addressof(base), 0, self.size)
            del base
        self.view.release()
        self._map.close()
        os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> MemfdBuffer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Prefault:
    """A `MemfdBuffer` whose pages a background thread allocates (`fallocate`, a step at a time) while the
    caller waits for the key that will fill it: a TPM's unwrap (socket round trips, the GIL released) or a
    lease. With 4 KiB pages the kernel's page allocation is most of a start (a fresh 64 MiB memfd took
    51 ms to fill by pwrite, 16 ms once allocated), so the decryption that follows finds part or all of it
    done. `take()` stops the thread where it is and hands the buffer over (the decryption allocates what
    is left), so a key that comes at once costs nothing; `close()` frees it unused. With 2 MiB pages the
    mapping fills at memory speed and nothing is allocated ahead."""

    STEP = 8 << 20

    def __init__(self, size: int, name: str = "codemoat-model"):
        self._stop = threading.Event()
        self._buf: MemfdBuffer | None = None
        self._lock = threading.Lock()
        self.allocated = 0  # bytes allocated ahead when `take()` stopped the thread
        self._thread = threading.Thread(target=self._run, args=(size, name), name="codemoat-prefault", daemon=True)
        self._thread.start()

    def _run(self, size: int, name: str) -> None:
        try:
            buf = self._buf = MemfdBuffer(size, name)
            while not buf.hugepages and self.allocated < size and not self._stop.is_set():
                n = min(self.STEP, size - self.allocated)
                os.posix_fallocate(buf.fd, self.allocated, n)
                self.allocated += n
        except (OSError, ValueError):
            pass  # out of memory ahead of time: the decryption allocates the rest, or says why it cannot

    def take(self) -> MemfdBuffer | None:
        """The buffer (once; None after, or when it could not be made), its thread stopped."""
        self._stop.set()
        self._thread.join()
        with self._lock:  # a reload in the lease's thread and open_sealed's cleanup may ask at once
            buf, self._buf = self._buf, None
        return buf

    def close(self) -> None:
        buf = self.take()
        if buf is not None:
            buf.close(zero=False)  # nothing was written to it
