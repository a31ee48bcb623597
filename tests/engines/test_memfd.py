"""The sealed memfd: huge-page policy detection, both fill paths, seals, zeroing."""

import os

import pytest

from codemoat.engines.memfd import F_SEAL_FUTURE_WRITE, MemfdBuffer, shmem_thp_mode


@pytest.mark.parametrize(
    "text, mode",
    [
        ("always within_size advise [never] deny force\n", "never"),
        ("always [within_size] advise never deny force\n", "within_size"),
        ("[advise]\n", "advise"),
        ("garbage\n", "unavailable"),
    ],
)
def test_shmem_thp_mode_reads_the_bracketed_policy(tmp_path, text, mode):
    f = tmp_path / "shmem_enabled"
    f.write_text(text)
    assert shmem_thp_mode(str(f)) == mode


def test_shmem_thp_mode_without_sysfs(tmp_path):
    assert shmem_thp_mode(str(tmp_path / "missing")) == "unavailable"


def test_hugepages_follow_the_kernel_policy_and_can_be_declined():
    size = 4 << 20
    with MemfdBuffer(size, hugepages=False) as off:
        assert off.hugepages is False
    with MemfdBuffer(size) as on:
        assert on.hugepages == (shmem_thp_mode() in {"advise", "within_size", "always", "force"})


@pytest.mark.parametrize("hugepages", [False, True])
def test_both_fill_paths_give_the_same_bytes_and_zero_on_close(hugepages):
    data = os.urandom(3 * (1 << 20) + 12345)  # not a multiple of any page size
    buf = MemfdBuffer(len(data), hugepages=hugepages)
    if buf.hugepages:
        buf.view[:] = data
    else:
        half = len(data) // 2
        buf.write_at(half, memoryview(data)[half:])
        buf.write_at(0, data[:half])
    buf.seal()
    assert buf.seals() & F_SEAL_FUTURE_WRITE
    with open(buf.path, "rb") as f:
        assert f.read() == data
    fd = os.dup(buf.fd)
    try:
        buf.close(zero=True)
        assert os.pread(fd, len(data), 0) == bytes(len(data))
    finally:
        os.close(fd)


def test_prefault_allocates_ahead_and_hands_its_buffer_over_once():
    from codemoat.engines.memfd import Prefault

    size = (20 << 20) + 123
    p = Prefault(size)
    p._thread.join()  # let it finish: a slow key
    buf = p.take()
    try:
        assert buf is not None and buf.size == size and not buf.sealed
        if not buf.hugepages:
            assert p.allocated == size and os.fstat(buf.fd).st_blocks * 512 >= size
        assert p.take() is None  # handed over once: a second start decrypts into a buffer of its own
    finally:
        buf.close()
    stopped = Prefault(64 << 20)
    stopped.close()  # a key that comes at once: the thread stops where it is, and nothing is kept
    assert stopped.take() is None
