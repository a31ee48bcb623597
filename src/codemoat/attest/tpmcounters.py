"""codemoat's NV counters in a TPM, over ESAPI: the tamper latch, the CRL install counter and the audit log's counter.

Each is a TPM_NT_COUNTER in the owner range, defined on first use, and read only when the index's name is
codemoat's counter (the name covers the type and the attributes: an owner who undefines the counter and
defines an ordinary index there, whose value it could write back, is refused). A counter only counts up, and
one undefined and defined again starts above the highest count the chip ever held (TPM 2.0 Part 1, NV counter
indexes). A value a verifier relies on comes as the AK's TPM2_NV_Certify over its nonce, so another chip
cannot answer for this one. A base of `TpmAttestor` (`attest.tpm`), which holds the ESAPI connection and
the keys.
"""

from __future__ import annotations

from typing import Any

from .base import AttestError, Quote
from .tpmcmd import RC_NV_UNINITIALIZED
from .tpmraw import CRL_NV_INDEX, TAMPER_NV_INDEX, StartPath
from .tpmsock import _pt

# The audit log's NV counter (TPM_NT_COUNTER, owner range of the TCG handle registry): +1 per TPM-signed checkpoint.
AUDIT_NV_INDEX = 0x0100C0DE


class NvCounters(StartPath):
    """codemoat's NV counters (see the module docstring)."""

    # and from `TpmAttestor`: the AK (`_ak`) and the ESAPI connection
    ctx: Any

    def tamper_count(self) -> int:
        """The tamper latch's count (defined and counted once on first use: a counter is unreadable before)."""
        h = self._counter(TAMPER_NV_INDEX, create=True, what="tamper latch")
        got = self._read_counter(TAMPER_NV_INDEX)
        if got is None:
            got = self._count_up(h, TAMPER_NV_INDEX, "cannot start the TPM's tamper latch")
        return got

    def crl_count(self, create: bool = False, ak: str | None = None) -> int | None:
        """The CRL counter's value; None when it was never defined (with `create`: defined and counted once).
        `ak`: certified by that AK, as `StartPath.crl_count` reads it."""
        if not create:
            return super().crl_count(ak)
        self._counter(CRL_NV_INDEX, create=True, what="CRL counter")
        got = self._read_counter(CRL_NV_INDEX)
        return self.crl_count_up() if got is None else got

    def crl_count_up(self) -> int:
        """Count one CRL install; the counter's new value."""
        h = self._counter(CRL_NV_INDEX, create=True, what="CRL counter")
        return self._count_up(h, CRL_NV_INDEX, "the TPM could not count the CRL install")

    def _count_up(self, h: Any, index: int, failed: str) -> int:
        """Increment the NV counter `h` (at `index`); its new value (`failed` starts the one-line error)."""
        try:
            self.ctx.nv_increment(h, auth_handle=h)
        except _pt().TSS2_Exception as e:
            raise AttestError(f"{failed}: {e}") from None
        return self._read_counter(index) or 0

    def _nv_certify(self, ak: Any, nv: Any, data: bytes) -> Quote:
        """TPM2_NV_Certify by `ak` of the 8-byte NV counter `nv` over `data` (TSS2_Exception passes through)."""
        pt = _pt()
        attest, sig = self.ctx.nv_certify(
            ak,
            nv,
            data,
            pt.TPMT_SIG_SCHEME(scheme=pt.TPM2_ALG.NULL),
            8,
            0,
            auth_handle=nv,
            session1=pt.ESYS_TR.PASSWORD,
            session2=pt.ESYS_TR.PASSWORD,
        )
        e = sig.signature.ecdsa
        return Quote(bytes(attest), bytes(e.signatureR), bytes(e.signatureS))

    def _counter(self, index: int, create: bool, what: str) -> Any:
        """The ESYS handle of codemoat's NV counter at `index` (defined on first use when `create`), else None."""
        pt = _pt()
        c = self.ctx
        try:
            h = c.tr_from_tpmpublic(index)
        except pt.TSS2_Exception:
            if not create:
                return None
        else:
            # The index's name covers its type and attributes: an owner can undefine the counter and
            # define an ordinary index there, whose value it can write back to an older one.
            from ..vault.tpmwrap import counter_name

            if bytes(c.tr_get_name(h)) not in (counter_name(index), counter_name(index, written=False)):
                raise AttestError(
                    f"NV index {index:#x} is not codemoat's {what} (another kind of index was defined "
                    "there: the counter was undefined and replaced)"
                )
            return h
        attrs = pt.TPMA_NV.AUTHWRITE | pt.TPMA_NV.AUTHREAD | pt.TPMA_NV.NO_DA | (pt.TPM2_NT.COUNTER << pt.TPMA_NV.TPM2_NT_SHIFT)
        pub = pt.TPM2B_NV_PUBLIC(
            nvPublic=pt.TPMS_NV_PUBLIC(nvIndex=index, nameAlg=pt.TPM2_ALG.SHA256, attributes=attrs, dataSize=8)
        )
        try:
            return c.nv_define_space(b"", pub, pt.ESYS_TR.OWNER)
        except pt.TSS2_Exception as e:
            raise AttestError(f"cannot define the {what} (NV index {index:#x}) in the TPM: {e}") from None

    def _certified(self, index: int, what: str, nonce: bytes) -> Quote | None:
        """codemoat's NV counter at `index` certified by the AK over `nonce`; None when undefined or never counted."""
        pt = _pt()
        c = self.ctx
        h = self._counter(index, create=False, what=what)
        if h is None:
            return None
        ak, _ = self._ak()
        try:
            return self._nv_certify(ak, h, nonce)
        except pt.TSS2_Exception as e:  # a counter never incremented cannot be read (TPM_RC_NV_UNINITIALIZED)
            if (e.rc & 0xFFF) == RC_NV_UNINITIALIZED:
                return None
            raise AttestError(f"cannot read the TPM's {what}: {e}") from None
        finally:
            c.flush_context(ak)

    # -- the audit log's monotonic counter --------------------------------------------
    def _audit_nv(self, create: bool) -> Any:
        """The ESYS handle of the audit counter (defined on first use when `create`), else None."""
        return self._counter(AUDIT_NV_INDEX, create, "audit counter")

    def audit_counter(self, nonce: bytes) -> Quote | None:
        """The audit counter's value now, certified by the AK (TPM2_NV_Certify) over `nonce` so the
        verifier knows this chip answered; None when this TPM has none (no checkpoint was ever signed)."""
        return self._certified(AUDIT_NV_INDEX, "audit counter", nonce)

    def audit_checkpoint(self, data: bytes) -> tuple[Quote, int]:
        """Increment the audit counter, then TPM2_NV_Certify it with the AK over `data` (<= 64 bytes):
        the signed TPMS_ATTEST carries the counter's value, its NV name, `data` and the TPM clock."""
        pt = _pt()
        c = self.ctx
        h = self._audit_nv(create=True)
        ak, _ = self._ak()
        try:
            c.nv_increment(h, auth_handle=h)
            q = self._nv_certify(ak, h, data)
        except pt.TSS2_Exception as e:
            raise AttestError(f"the TPM could not sign the audit checkpoint: {e}") from None
        finally:
            c.flush_context(ak)
        return q, int.from_bytes(q.attest[-8:], "big")
