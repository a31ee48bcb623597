"""An offline start's part of the TPM: the CRL counter, the unwrap key, its policy session and ECDH_ZGen.

Every command here is `attest.tpmcmd` bytes (no ESAPI: see that module for why nothing is lost). `StartPath` holds
the logic; `TpmAttestor` (attest.tpm) has it beside its ESAPI commands, and `StartChip` has it alone, on its own
transport (`attest.tpmsock`: on a swtpm one TCP connection per burst of commands, and no tpm2-pytss import, which
skips ~0.1 s on a process's first start), for `vault.tpmstart`.

The unwrap key: with `unwrap_handle` (the persistent handle `machine-id --tpm` made it at, TPM2_EvictControl),
TPM2_ReadPublic of that handle replaces a TPM2_CreatePrimary and its FlushContext at every start (a chip's key
derivation: ~0.3 ms on swtpm, tens of ms on a discrete TPM). The key found there is used only when its public area
is the license's: the template with the license's policy (fixedTPM, no userWithAuth) and the license's point, so
its TPM name is the one the license names. Anything else there (an evicted or replaced key, a key for an older
policy, a cleared chip with nothing there) is not used: the key is derived as before, from the endorsement seed.
"""

from __future__ import annotations

import os
from typing import Any

from .base import AttestError
from .tpmcmd import (
    AK_TEMPLATE,
    RC_NV_UNINITIALIZED,
    RC_PCR_CHANGED,
    RH_ENDORSEMENT,
    Commands,
    TpmRc,
    ecc_der,
    tpm2b,
    unwrap_template,
)
from .tpmsock import open_transport

BANK = "sha256"
# The tamper latch (TPM_NT_COUNTER, owner range of the TCG handle registry): +1 per tamper event; unwrap policies
# require its provisioned count.
TAMPER_NV_INDEX = 0x0100C0DF
# CRL installs (TPM_NT_COUNTER beside it): +1 per CRL installed; the clock record keeps the count it reached (vault.crl).
CRL_NV_INDEX = 0x0100C0E0
# Where `machine-id --tpm` makes the unwrap key and the attestation key persistent (TCG handle registry: the
# endorsement primary objects' range).
UNWRAP_HANDLE, AK_HANDLE = 0x8101C0DE, 0x8101C0DD


def pcr_selection(pcrs: list[int]) -> str:
    if not pcrs or not all(isinstance(p, int) and 0 <= p < 24 for p in pcrs):
        raise AttestError("PCR selection must be PCR numbers 0-23")
    return f"{BANK}:" + ",".join(str(p) for p in sorted(set(pcrs)))


def policy_digest(policy: dict[str, Any]) -> bytes:
    """The authPolicy of TPM2_PolicyPCR(selection, recorded values) then TPM2_PolicyNV(tamper latch == its count):
    what a trial session returns, computed as the vendor computes it (`tpmcred`), which saves five chip round trips
    per start (the vendor's check of the AK-certified key shows they agree)."""
    from ..vault.tpmcred import pcr_policy_digest

    pcr_selection(policy["pcrs"])
    return pcr_policy_digest(policy)


class StartPath:
    """The start's commands on `self._cmd` (a `tpmcmd.Commands`); subclasses open it."""

    kind = "tpm2"

    def __init__(self, tcti: str):
        self.tcti = tcti
        self._cmd: Any = None
        # policy key -> (TPM handle, DER hex, flush): the unwrap keys found or derived on this connection
        self._raw_keys: dict[str, tuple[int, str, bool]] = {}
        self._latches_seen: set[int] = set()  # tamper latch indexes whose name was checked on this connection
        self._policy_session: int | None = None  # zgen's policy session (TPM handle), kept for the next zgen
        self._policy_ran = False  # prepare_unwrap already ran the policy on it

    def policy_digest(self, policy: dict[str, Any]) -> bytes:
        return policy_digest(policy)

    def idle(self) -> None:
        """Nothing is sent for a while: give a held connection back (a swtpm serves one at a time)."""

    def _flush_start(self) -> None:
        """Flush what this path made in the chip (the transient unwrap keys, the kept policy session)."""
        try:
            raw = [h for h, _, flush in self._raw_keys.values() if flush]
            if self._policy_session is not None:
                raw.append(self._policy_session)
            for h in raw:
                try:
                    self._raw(self._cmd.flush, h)
                except TpmRc:
                    pass  # already gone (a session the chip ended)
        finally:
            self._policy_session, self._policy_ran = None, False
            self._raw_keys.clear()
            self._latches_seen.clear()

    def _raw(self, fn: Any, *args: Any) -> Any:
        """A `tpmcmd` command; TpmRc passes through, a TCTI failure or a malformed answer is one line."""
        try:
            return fn(*args)
        except TpmRc:
            raise
        except Exception as e:  # TSS2_Exception or OSError from the transport, struct.error from a short answer
            self.idle()  # a connection left mid-answer is not used again
            raise AttestError(f"the TPM at {self.tcti!r} did not answer: {e}") from None

    # -- NV counters -------------------------------------------------------------
    def crl_count(self, ak: str | None = None) -> int | None:
        """The CRL counter's value; None when it was never defined or counted. `ak` (the AK's DER, hex, as the
        license names it): the value comes from a TPM2_NV_Certify by that AK over a fresh nonce instead of
        TPM2_NV_Read, whose answer a proxy on the TCTI could change (`CODEMOAT_TPM_TCTI`)."""
        if ak is not None:
            return self._certified_count(CRL_NV_INDEX, "CRL counter", ak)
        if not self._nv_ok(CRL_NV_INDEX, "CRL counter"):
            return None
        return self._read_counter(CRL_NV_INDEX)

    def _certified_count(self, index: int, what: str, ak: str) -> int | None:
        """codemoat's NV counter at `index` as the AK `ak` certifies it over a fresh nonce (its signature, the
        index's name and the nonce checked: a VaultError when they do not hold); None when undefined or never
        counted. The AK `machine-id --tpm` made persistent signs first; when its signature is not `ak`'s (nothing
        there, another key), the AK is derived again, as `TpmAttestor._ak` does."""
        from ..vault.tpmwrap import QuoteRefused, verify_nv_certify

        nonce = os.urandom(32)
        for key in (AK_HANDLE, None):
            if key is None:
                key = self._derived_ak()
            try:
                attest, r, s = self._raw(self._cmd.nv_certify, key, index, nonce, 8)
            except TpmRc as e:
                if (e.rc & 0xFFF) == RC_NV_UNINITIALIZED or _handle_error(e.rc) in (2, 3):
                    return None  # never counted, or no such index
                if key == AK_HANDLE:
                    continue  # nothing there, or a key that cannot sign this: derive the AK
                raise AttestError(f"the TPM could not certify its {what}: {e}") from None
            try:
                return verify_nv_certify(ak, attest, r, s, nonce, index, f"the TPM's certification of its {what}").counter
            except QuoteRefused:
                if key != AK_HANDLE:
                    raise
        raise AssertionError("unreachable")

    def _derived_ak(self) -> int:
        """The attestation key derived from the endorsement seed (flushed by `_flush_start`)."""
        got = self._raw_keys.get("ak")
        if got is None:
            try:
                h, _ = self._raw(self._cmd.create_primary, RH_ENDORSEMENT, tpm2b(AK_TEMPLATE + b"\0\0\0\0"))
            except TpmRc as e:
                raise AttestError(f"the TPM could not derive its attestation key: {e}") from None
            got = self._raw_keys["ak"] = (h, "", True)
        return got[0]

    def _read_counter(self, index: int) -> int | None:
        """The 8-byte NV counter at `index`; None when it was never incremented."""
        try:
            return int.from_bytes(self._raw(self._cmd.nv_read, index, 8), "big")
        except TpmRc as e:
            if (e.rc & 0xFFF) == RC_NV_UNINITIALIZED:
                return None
            raise AttestError(f"cannot read the TPM's NV counter: {e}") from None

    def _nv_ok(self, index: int, what: str) -> bool:
        """Whether codemoat's NV counter at `index` is defined (False when the chip has no such index); an index of
        another kind there is refused (an owner can undefine the counter and define an index it can write)."""
        from ..vault.tpmwrap import counter_name

        try:
            name = self._raw(self._cmd.nv_read_public, index)
        except TpmRc:
            return False
        if name not in (counter_name(index), counter_name(index, written=False)):
            raise AttestError(
                f"NV index {index:#x} is not codemoat's {what} (another kind of index was defined "
                "there: the counter was undefined and replaced)"
            )
        return True

    def _latch_present(self, index: int) -> bool:
        """The tamper latch is in this chip (its name checked as `_nv_ok` checks it), once per connection."""
        if index not in self._latches_seen:
            if not self._nv_ok(index, "tamper latch"):
                return False
            self._latches_seen.add(index)
        return True

    # -- the unwrap key ------------------------------------------------------------
    def _raw_unwrap(self, policy: dict[str, Any], expect: str | None = None) -> tuple[int, str]:
        """The unwrap key for `policy`: (TPM handle, DER hex), once per connection: the persistent one when it is
        `expect` (the license's key), else derived (and flushed by `_flush_start`)."""
        ck = ",".join(map(str, sorted(policy["pcrs"]))) + ":" + policy["digest"] + ":" + repr(policy.get("latch"))
        got = self._raw_keys.get(ck)
        if got is None:
            head = unwrap_template(self.policy_digest(policy))
            if expect is not None and self._persistent_unwrap(head) == expect.lower():
                got = self._raw_keys[ck] = (UNWRAP_HANDLE, expect.lower(), False)
                return got[0], got[1]
            try:
                h, area = self._raw(self._cmd.create_primary, RH_ENDORSEMENT, tpm2b(head + b"\0\0\0\0"))
            except TpmRc as e:
                raise AttestError(f"the TPM could not derive its unwrap key: {e}") from None
            self._raw_keys[ck] = (h, "", True)  # flushed by _flush_start whatever follows
            got = self._raw_keys[ck] = (h, ecc_der(head, area), True)
        return got[0], got[1]

    def _persistent_unwrap(self, head: bytes) -> str | None:
        """The DER (hex) of the key at UNWRAP_HANDLE when its public area is the template `head` (the policy, the
        attributes: so its TPM name is the one such a key of that point has); None when nothing or another is there."""
        try:
            area = self._raw(self._cmd.read_public, UNWRAP_HANDLE)
        except TpmRc:
            return None  # none made persistent (an older machine-id), or gone (a cleared chip, an evicted key)
        try:
            return ecc_der(head, area)
        except AttestError:
            return None  # another key (another policy, other attributes) there

    def unwrap_public(self, policy: dict[str, Any], expect: str | None = None) -> str:
        """The unwrap key this chip has for `policy` (DER hex): equal to a license's only on the same chip
        ("" when this chip has no tamper latch to derive it with: another chip). `expect`: the license's key, which
        the persistent key (`machine-id --tpm`) is used as only when it is that key with that policy."""
        latch = policy.get("latch")
        if latch is not None and not self._latch_present(latch["index"]):
            return ""
        return self._raw_unwrap(policy, expect)[1]

    # -- the policy session and ECDH_ZGen ----------------------------------------------
    def _policy_latch(self, sess: int, policy: dict[str, Any]) -> None:
        """TPM2_PolicyNV: the tamper latch holds the policy's count (policies made before it had none)."""
        latch = policy.get("latch")
        if latch is None:
            return
        if not self._latch_present(latch["index"]):
            raise AttestError(
                f"this TPM has no tamper latch at NV index {latch['index']:#x} (another TPM than the license's, or the "
                "latch was deleted with owner authorization): the key cannot be unwrapped here"
            )
        try:
            self._raw(self._cmd.policy_nv, sess, latch["index"], latch["count"].to_bytes(8, "big"))
        except TpmRc:
            raise AttestError(
                f"the TPM refused to unwrap: its tamper latch has counted a tamper event since provisioning (count "
                f"{latch['count']} expected; it survives reboots): the vendor must reprovision"
            ) from None

    def prepare_unwrap(self, policy: dict[str, Any] | None = None) -> None:
        """Start the next zgen's policy session now (a start does it while the license is still being checked),
        and with `policy` also run its PolicyPCR and PolicyNV, so the unwrap that follows is one command. None of
        it grants anything: only TPM2_ECDH_ZGen uses the session, and the chip refuses it (TPM_RC_PCR_CHANGED)
        when any PCR was extended since PolicyPCR; zgen then runs the policy again on a fresh session."""
        if self._policy_session is None:
            self._policy_session = self._new_policy_session()
        if policy is not None and not self._policy_ran:
            self._run_policy(self._policy_session, policy)
            self._policy_ran = True

    def _new_policy_session(self) -> int:
        try:
            return self._raw(self._cmd.start_policy_session)
        except TpmRc as e:
            raise AttestError(f"the TPM could not start a policy session: {e}") from None

    def _run_policy(self, sess: int, policy: dict[str, Any]) -> None:
        """PolicyPCR over the chip's current values, then PolicyNV: the tamper latch still at its provisioned count."""
        from ..vault.tpmwrap import pcr_bitmap

        self._raw(self._cmd.policy_pcr, sess, pcr_bitmap(policy["pcrs"]))
        self._policy_latch(sess, policy)

    def zgen(self, policy: dict[str, Any], point: bytes, keep: bool = True) -> bytes:
        """ECDH's Z (the x coordinate) of the unwrap key and an uncompressed P-256 `point`, in the chip. `keep`: keep
        the policy session for another zgen on this connection; False for the last one (the chip then ends the session
        itself when the ZGen succeeds: no FlushContext)."""
        if len(point) != 65 or point[0] != 4:
            raise AttestError("ECDH point must be an uncompressed P-256 point")
        pcr_selection(policy["pcrs"])
        h, _ = self._raw_unwrap(policy)
        # A start unwraps two keys (content, watermark): the second reuses the first's policy session, two TPM
        # commands fewer (StartAuthSession, FlushContext). The session continues after use, and the chip resets
        # a used policy session's digest, so each use runs PolicyPCR and PolicyNV again; a session whose use failed
        # is flushed, never kept.
        sess, ran, kept = self._policy_session, self._policy_ran, False
        self._policy_session, self._policy_ran = None, False
        if sess is None:
            sess = self._new_policy_session()
        try:
            if not ran:
                self._run_policy(sess, policy)
            try:
                out = self._raw(self._cmd.ecdh_zgen, h, sess, point, keep)
            except TpmRc as e:
                if not (ran and (e.rc & 0xFFF) == RC_PCR_CHANGED):
                    raise
                # A PCR was extended after prepare_unwrap's PolicyPCR (the OS measures too): all of it again, now.
                self._raw(self._cmd.flush, sess)
                sess = self._new_policy_session()
                self._run_policy(sess, policy)
                out = self._raw(self._cmd.ecdh_zgen, h, sess, point, keep)
            if keep:
                self._policy_session = sess
            kept = True  # kept for the next zgen, or ended by the chip
            return out
        except TpmRc as e:
            # TPM_RC_POLICY_FAIL = RC_FMT1 + 0x01D (Part 2 §6.6.3); bits 6 and 8-11 name the session
            if (e.rc & 0x80) and (e.rc & 0x3F) == 0x1D:
                raise AttestError(
                    "the TPM refused to unwrap: its PCRs no longer match the license's policy "
                    f"(PCRs {policy['pcrs']}: a tamper event, or another boot state)"
                ) from None
            raise AttestError(f"the TPM refused to unwrap: {e}") from None
        finally:
            if not kept:
                try:
                    self._raw(self._cmd.flush, sess)
                except TpmRc:
                    pass  # already gone


def _handle_error(rc: int) -> int:
    """Which handle (1-7) a TPM_RC_HANDLE names (Part 2 §6.6.3: format 1, bit 11 clear); 0 for any other code."""
    return (rc >> 8) & 7 if (rc & 0xBF) == 0x8B and not rc & 0x800 else 0


class StartChip(StartPath):
    """`StartPath` alone on its own transport (`open_transport`): what `vault.tpmstart` opens for one start.
    Use as a context manager; call `idle()` before waiting on anything."""

    def __init__(self, tcti: str):
        super().__init__(tcti)
        self._transport: Any = None

    def __enter__(self) -> StartChip:
        self._transport = open_transport(self.tcti)
        self._cmd = Commands(self._transport)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._transport is None:
            return
        try:
            self._flush_start()
        finally:
            self._transport.close()
            self._transport = self._cmd = None

    def idle(self) -> None:
        if self._transport is not None:
            self._transport.idle()
