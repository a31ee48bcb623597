"""The TPM's share of an offline license check: one connection, in a thread beside the rest of the start.

On a machine whose keys are in a TPM, `license.check` needs the chip for the CRL install counter
(`vault.crl`: a clock record put back from a backup is refused) and, for a license bound to the chip,
for the ECDH unwraps of the content and watermark keys. Each is a few round trips to the chip, time
the CPU spends waiting. `TpmStart` opens the chip once, as soon as the license's machine entry is
known (`attest.tpmraw.StartChip`: these commands alone, no ESAPI), and in this order:

1. finds the unwrap key (the persistent one when it is the license's, else derived), compares it with the
   license's (another chip is refused, once the CRL count below is out), starts the
   policy session and runs PolicyPCR and PolicyNV on it: nothing secret, done while the other checks run
   and a start allocates the memfd's pages (`engines.memfd.Prefault`), so the unwrap after `release()` is
   one TPM2_ECDH_ZGen (the chip refuses it when a PCR was extended since; `zgen` then runs it all again);
2. reads the CRL counter as the AK certifies it (`crl_count(ak=...)`, what the CRL check asks for: the
   caller waits for it there, off the GIL, which is when this thread's commands run fastest);
3. waits for `release()`, which `check` calls once every other check has passed: only such a license
   gets a key out of the chip. The connection is held for `HOLD_S` (the rest of the checks), then given back;
4. unwraps the content key (`key(0)`: `release()` does it on the caller's thread when this one already
   waits), then the watermark key (`key(1)`). A start needs the latter only
   once it serves, so with `check(..., defer_watermark=True)` that unwrap overlaps the decryption. A license
   whose two keys are wrapped to one ephemeral point (the vendor does so since session 12) needs one
   TPM2_ECDH_ZGen for both: the watermark key is then HKDF and AES-GCM in software, with its own context.

An error in the thread is raised by the call that asks for that step's result, so refusals come in the
order, and with the words, of a check done in one thread. `close()` stops a start not yet released and
waits for the thread, which closes the connection (swtpm serves one connection at a time).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from ..errors import CodemoatError
from .codec import VaultError, b64d
from .tpmwrap import unwrap_p256


def tpm_unwrapper(attestor: Any, entry: dict[str, Any], last: bytes | None = None) -> Any:
    """`unwrap(wrapped, context, what)` through an open TPM: refuses another chip before asking for ECDH. `last`: the
    ephemeral point of the last key to unwrap: its ZGen lets the chip end the policy session (no FlushContext)."""
    t = entry["tpm"]
    mine = attestor.unwrap_public(t["policy"], t["unwrap"])
    if mine == "":  # the policy names a tamper latch this chip does not have
        raise VaultError(
            f"license is sealed to another TPM, or this one's tamper latch was deleted (no tamper latch in the chip at "
            f"{attestor.tcti}): a copied data directory, another machine, or a reprovision by the vendor is needed"
        )
    if mine != t["unwrap"]:
        raise VaultError(
            f"license is sealed to another TPM (its unwrap key is not in this chip at "
            f"{attestor.tcti}): a copied data directory, or another machine"
        )

    # Z per ephemeral point, for this unwrapper's one start only (never kept beyond it, never written anywhere): a
    # license's keys wrapped to one point (`license_issue.wrap_keys`) cost one TPM2_ECDH_ZGen; each key's own context
    # (HKDF info and AES-GCM's associated data) still decides whether it opens. Older licenses: one ZGen per key.
    zs: dict[bytes, bytes] = {}

    def zgen(point: bytes) -> bytes:
        z = zs.get(point)
        if z is None:
            z = zs[point] = attestor.zgen(t["policy"], point, keep=point != last)
        return z

    def unwrap_tpm(wrapped: Any, context: bytes, what: str) -> bytes:
        return unwrap_p256(zgen, t["unwrap"], wrapped, context, what)

    return unwrap_tpm


def _point(wrapped: Any) -> bytes | None:
    """A wrapped key's ephemeral point (None when it has none: `unwrap_p256` says what is wrong with it)."""
    try:
        return b64d(wrapped["epk"], "epk")
    except (VaultError, KeyError, TypeError):
        return None


HOLD_S = 0.005  # how long a start holds the chip's connection while the caller finishes its checks


class _Result:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None

    def set(self, value: Any = None, error: BaseException | None = None) -> None:
        self.value, self.error = value, error
        self.done.set()

    def get(self) -> Any:
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.value


class TpmStart:
    """The chip's part of one check (see the module's text). `unwraps` are (wrapped, context, what) of the
    keys to unwrap through `entry`'s TPM binding after `release()`; none: the CRL counter alone. `ak`: the AK that
    certifies the CRL counter (`vault.crl.chip_ak`)."""

    def __init__(
        self,
        attestor: Any,
        entry: dict[str, Any] | None = None,
        unwraps: Sequence[tuple[Any, bytes, str]] = (),
        ak: str | None = None,
    ):
        self.unwraps, self.ak = list(unwraps), ak
        self._crl, self._keys = _Result(), [_Result() for _ in self.unwraps]
        self._gate, self._released = threading.Event(), False
        self._parked: Any = None  # the unwrapper, while the thread waits at the gate with the chip ready for ZGen
        self._ready = threading.Event()  # the thread waits at the gate, or has ended (release() waits for it)
        self._lock = threading.Lock()  # release() takes the parked connection, or the thread gives it back
        self._thread = threading.Thread(target=self._run, args=(attestor, entry), name="codemoat-tpm", daemon=True)
        self._thread.start()

    def _run(self, attestor: Any, entry: dict[str, Any] | None) -> None:
        pending = [self._crl, *self._keys]
        try:
            with attestor as a:
                # The unwrap's preparation first, then the CRL counter: the caller waits for the count at its CRL
                # check, off the GIL, and the thread's commands run fastest then; the rest of its checks need no
                # chip. A refusal here is raised for the keys, after the count (the refusals' order is unchanged).
                opened = refused = None
                if self.unwraps:
                    assert entry is not None
                    try:
                        opened = tpm_unwrapper(a, entry, _point(self.unwraps[-1][0]))
                        a.prepare_unwrap(entry["tpm"]["policy"])  # the session and its policy: ZGen alone after release
                    except CodemoatError as e:  # another chip, no tamper latch, the chip unreachable
                        refused = e
                self._crl.set(a.crl_count(ak=self.ak))
                pending.pop(0)
                if refused is not None:
                    raise refused
                if opened is None:
                    return
                self._parked = opened  # release() may unwrap the content key itself, until the gate opens
                self._ready.set()
                # The connection is held for a moment (release() comes a check's length later: a new connection
                # costs swtpm an accept, ~0.1-0.4 ms), then given back, as swtpm serves one connection at a time.
                if not self._gate.wait(HOLD_S):
                    with self._lock:
                        if self._parked is not None:  # release() has not taken it
                            a.idle()
                    self._gate.wait()
                self._parked = None
                if not self._released:
                    return
                for result, (wrapped, context, what) in zip(self._keys, self.unwraps):
                    if not result.done.is_set():
                        result.set(opened(wrapped, context, what))
                    elif result.error is not None:  # release() unwrapped it, or the chip refused it there
                        raise result.error
                    pending.pop(0)
        except BaseException as e:  # raised to whoever asks for a step not done
            for result in pending:
                result.set(error=e)
        finally:
            self._ready.set()
            for result in pending:
                if not result.done.is_set():
                    result.set(error=VaultError("the TPM start was stopped before this key was unwrapped"))

    def crl_count(self, ak: str | None = None) -> int | None:
        """The TPM's CRL install counter (`TpmAttestor.crl_count`), certified by the `ak` given at the start."""
        if ak != self.ak:
            raise VaultError("the TPM start certified its CRL counter with another attestation key")
        return self._crl.get()

    def release(self) -> None:
        """Every other check passed: the keys may be unwrapped. Once the thread waits at the gate (its commands
        before the unwrap done: the caller asks for the content key next anyway), this thread unwraps the content
        key itself (one ECDH_ZGen on the thread's connection, which the thread does not touch until the gate
        opens): the key is then out without two hand-offs between threads. The thread unwraps the rest."""
        self._released = True
        if self._keys:
            self._ready.wait()  # parked at the gate, or ended (its error is key(0)'s)
        with self._lock:
            opened, self._parked = self._parked, None
        if opened is not None and self._keys:
            try:
                self._keys[0].set(opened(*self.unwraps[0]))
            except BaseException as e:  # raised by key(0), in the words the thread would have used
                self._keys[0].set(error=e)
        self._gate.set()

    def key(self, i: int) -> bytes:
        """The `i`th unwrapped key (waits for it; raises the chip's refusal)."""
        return self._keys[i].get()

    def close(self) -> None:
        """Stop a start not released, and wait until the thread has closed the connection."""
        self._gate.set()
        self._thread.join()
