"""A TPM 2.0 attestor over tpm2-pytss (ESAPI): keys made in the chip, used there, never exported.

Both keys are *primary* keys of the endorsement hierarchy (TPM 2.0 Part 1 §27.5 / Part 3
§24.1 TPM2_CreatePrimary): the chip derives them from its endorsement seed and the template,
so the same template gives the same key on the same chip, a different key on any other chip,
and nothing needs to be stored on disk. The unwrap key (ECC P-256, decrypt, no
userWithAuth) carries an authPolicy of TPM2_PolicyPCR over the license's PCRs and values, so
TPM2_ECDH_ZGen runs only while those PCRs hold the values the vendor recorded; extend one
(a tamper event) and the chip refuses. The attestation key (P-256, restricted signing,
ECDSA-SHA256) signs TPM2_Quote over the same PCRs with the key server's nonce.

A reboot resets the tamper PCR, so the policy also names the tamper latch: an NV counter
(`TAMPER_NV_INDEX`) that `tamper` increments beside the PCR extend, and TPM2_PolicyNV (Part 3
§23.9) requires it to hold the count recorded at provisioning. NV survives a reboot; an NV counter
only counts up, and one undefined and defined again starts above the highest count the chip ever
held (Part 1, NV counter indexes), so someone with owner authorization can delete the latch (the unwrap then
fails for good) but cannot set it back.

The TCTI is a tpm2-tss string: `device:/dev/tpmrm0` on a host, `swtpm:host=127.0.0.1,port=P` in
tests. Without a resource manager (swtpm's socket) every transient handle is flushed here.

What an offline start asks of the chip (the CRL counter, the unwrap key, the policy session, PolicyPCR,
PolicyNV, ECDH_ZGen) is `attest.tpmraw.StartPath`, as `attest.tpmcmd` bytes on the same TCTI: tpm2-tss 3.2.1's
ESAPI spends about 2 ms of client CPU on each ECDH_ZGen's session crypto, which proves nothing for these sessions.
"""

from __future__ import annotations

import hashlib
from typing import Any

from .base import AttestError, Quote
from .tpmcmd import Commands, tpm2b, unwrap_template
from .tpmcounters import NvCounters
from .tpmraw import AK_HANDLE, BANK, CRL_NV_INDEX, TAMPER_NV_INDEX, UNWRAP_HANDLE, pcr_selection
from .tpmsock import _pt

__all__ = ["AK_HANDLE", "BANK", "CRL_NV_INDEX", "TAMPER_NV_INDEX", "UNWRAP_HANDLE", "TpmAttestor", "_pt", "pcr_selection"]

DEVICE_TCTI = "device:/dev/tpmrm0"
TAMPER_PCR = 15  # not resettable from software (PCR 16 and 23 are), extended only by codemoat
# TCG EK Credential Profile 2.0 §2.2.1.4: EK types whose certificates are looked up in NV, in this order.
_EK_TYPES = ("EK-ECC256", "EK-ECC384", "EK-RSA2048")


class TpmAttestor(NvCounters):
    """One TPM, reached through `tcti`; use as a context manager (one ESAPI connection). The offline start's
    commands (`StartPath`) go on the same TCTI as bytes; codemoat's NV counters are `NvCounters`'."""

    def __init__(self, tcti: str = DEVICE_TCTI):
        super().__init__(tcti)
        self._ctx: Any = None
        self._tcti: Any = None
        self._unwrap_keys: dict[str, tuple[Any, Any]] = {}  # policy digest -> (ESYS handle, public): identity's

    # -- connection ---------------------------------------------------------
    def __enter__(self) -> TpmAttestor:
        pt = _pt()
        name, _, conf = self.tcti.partition(":")
        try:
            self._tcti = pt.TCTILdr(name, conf)
            self._ctx = pt.ESAPI(self._tcti)
        except Exception as e:  # TSS2_Exception and friends: one line, never a traceback
            if self._tcti is not None:
                self._tcti.close()
                self._tcti = None
            raise AttestError(f"cannot reach the TPM at {self.tcti!r}: {e}") from None
        self._cmd = Commands(self._tcti)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._ctx is not None:
            try:
                for h, _ in self._unwrap_keys.values():
                    self._ctx.flush_context(h)
                self._flush_start()
            finally:
                self._unwrap_keys.clear()
                self._ctx.close()
                self._ctx = None
                self._tcti.close()  # ESAPI does not close a TCTI it was given (a device TCTI's fd stayed open)
                self._tcti = self._cmd = None

    @property
    def ctx(self) -> Any:
        if self._ctx is None:
            raise AttestError("TPM is not open (use `with attestor:`)")
        return self._ctx

    # -- templates ------------------------------------------------------------
    def _attrs(self, *names: str) -> int:
        A = _pt().TPMA_OBJECT
        v = A.FIXEDTPM | A.FIXEDPARENT | A.SENSITIVEDATAORIGIN
        for n in names:
            v |= getattr(A, n)
        return v

    def _unwrap_key(self, policy: dict[str, Any]) -> tuple[Any, Any]:
        """The unwrap key for `policy`, derived once per connection (held until `__exit__` flushes it)."""
        pt = _pt()
        ck = ",".join(map(str, sorted(policy["pcrs"]))) + ":" + policy["digest"] + ":" + repr(policy.get("latch"))
        got = self._unwrap_keys.get(ck)
        if got is None:
            tmpl, _ = pt.TPM2B_PUBLIC.unmarshal(tpm2b(unwrap_template(self.policy_digest(policy)) + b"\0\0\0\0"))
            h, pub, *_ = self.ctx.create_primary(None, tmpl, pt.ESYS_TR.ENDORSEMENT)
            got = self._unwrap_keys[ck] = (h, pub)
        return got

    def _ak(self) -> tuple[Any, Any]:
        pt = _pt()
        tmpl = pt.TPM2B_PUBLIC.parse(
            "ecc256:ecdsa-sha256", objectAttributes=self._attrs("USERWITHAUTH", "RESTRICTED", "SIGN_ENCRYPT")
        )
        tmpl.publicArea.parameters.eccDetail.symmetric.algorithm = pt.TPM2_ALG.NULL  # Part 2 §12.2.3.6
        h, pub, *_ = self.ctx.create_primary(None, tmpl, pt.ESYS_TR.ENDORSEMENT)
        return h, pub

    # -- the interface ----------------------------------------------------------
    def pcr_values(self, pcrs: list[int]) -> list[bytes]:
        _, _, digests = self.ctx.pcr_read(pcr_selection(pcrs))
        return [bytes(d) for d in digests]

    def current_policy(self, pcrs: list[int]) -> dict[str, Any]:
        """The PCR policy and the tamper latch's count as the chip stands now: what the vendor records at provisioning."""
        values = self.pcr_values(pcrs)
        return {
            "bank": BANK,
            "pcrs": sorted(set(pcrs)),
            "digest": hashlib.sha256(b"".join(values)).hexdigest(),
            "latch": {"index": TAMPER_NV_INDEX, "count": self.tamper_count()},
        }

    def tamper(self, pcr: int, data: bytes) -> int:
        """A tamper event: extend `pcr` (ends serving now) and count it in the latch (survives a reboot);
        the latch's new count."""
        self.extend(pcr, data)
        h = self._counter(TAMPER_NV_INDEX, create=True, what="tamper latch")
        return self._count_up(
            h, TAMPER_NV_INDEX, f"the TPM could not count the tamper event in its latch (PCR {pcr} was extended)"
        )

    def identity(self, pcrs: list[int]) -> dict[str, Any]:
        """Public keys (DER SubjectPublicKeyInfo, hex), the EK certificate where present, and the policy."""
        policy = self.current_policy(pcrs)
        out: dict[str, Any] = {"kind": self.kind, "policy": policy}
        pt = _pt()
        from ..vault.tpmwrap import CRL_CERTIFY_DOMAIN, LATCH_CERTIFY_DOMAIN, crl_certify_data, unwrap_certify_data

        uh, upub = self._unwrap_key(policy)
        out["unwrap"] = upub.to_der().hex()
        out["unwrap_public"] = upub.publicArea.marshal().hex()  # its name: what the AK certifies below
        h, pub = self._ak()
        try:
            out["ak"] = pub.to_der().hex()
            out["ak_public"] = pub.publicArea.marshal().hex()  # TPMT_PUBLIC: the vendor computes the AK's name from it
            # TPM2_Certify by the AK: the unwrap key is in this chip (the vendor binds the AK to the EK)
            attest, sig = self.ctx.certify(
                uh,
                h,
                unwrap_certify_data(out["unwrap"]),
                pt.TPMT_SIG_SCHEME(scheme=pt.TPM2_ALG.NULL),
                session1=pt.ESYS_TR.PASSWORD,
                session2=pt.ESYS_TR.PASSWORD,
            )
            e = sig.signature.ecdsa
            out["unwrap_certify"] = {
                "attest": bytes(attest).hex(),
                "r": bytes(e.signatureR).hex(),
                "s": bytes(e.signatureS).hex(),
            }
            self.persist(h, AK_HANDLE)
        finally:
            self.ctx.flush_context(h)
        self.persist(uh, UNWRAP_HANDLE)
        out.update(self._ek())
        # The CRL install counter, defined and counted now if it is not yet: the license names it (signed by the
        # vendor), so a chip without it, or with one defined again since, is refused at start (vault.crl).
        out["crl"] = {"index": CRL_NV_INDEX, "count": self.crl_count(create=True)}
        # ...and that count as the AK signs it: the vendor issues only from a count the chip had (vault.tpmbind)
        for key, index, what, domain in (
            ("crl_certify", CRL_NV_INDEX, "CRL counter", CRL_CERTIFY_DOMAIN),
            ("latch_certify", TAMPER_NV_INDEX, "tamper latch", LATCH_CERTIFY_DOMAIN),  # the policy's latch count
        ):
            q = self._certified(index, what, crl_certify_data(out["ak"], domain))
            if q is not None:
                out[key] = {"attest": q.attest.hex(), "r": q.r.hex(), "s": q.s.hex()}
        return out

    def persist(self, key: Any, handle: int) -> bool:
        """Make the loaded `key` persistent at `handle` (TPM2_EvictControl with owner authorization), in place of what
        was there: a start then reads it (`tpmraw`) instead of deriving it again. False when the chip refuses (an
        owner password, no room): starts then derive the key, as before."""
        pt = _pt()
        c = self.ctx
        try:
            try:
                old = c.tr_from_tpmpublic(handle)
            except pt.TSS2_Exception:
                old = None  # nothing there
            if old is not None:
                c.evict_control(pt.ESYS_TR.OWNER, old, handle)
            c.tr_close(c.evict_control(pt.ESYS_TR.OWNER, key, handle))
        except pt.TSS2_Exception:
            return False
        return True

    def _ek_template(self) -> tuple[bytes | None, Any] | None:
        """(certificate, template) of the EK the manufacturer certified, else the default ECC P-256 EK's."""
        _pt()
        from tpm2_pytss.utils import NVReadEK, create_ek_template

        found = None
        for ektype in _EK_TYPES:
            try:
                cert, tmpl = create_ek_template(ektype, NVReadEK(self.ctx))
            except ValueError:
                continue  # a high-range type with no certificate on this chip
            if cert is not None or found is None:
                found = (cert, tmpl)
            if cert is not None:
                break
        return found

    def _ek(self) -> dict[str, Any]:
        """The endorsement key whose certificate the manufacturer stored (else the default ECC P-256 EK)."""
        pt = _pt()
        found = self._ek_template()
        if found is None:
            return {"ek": None, "ek_cert": None}
        cert, tmpl = found
        h, pub, *_ = self.ctx.create_primary(None, tmpl, pt.ESYS_TR.ENDORSEMENT)
        self.ctx.flush_context(h)
        return {"ek": pub.to_der().hex(), "ek_cert": cert.hex() if cert else None}

    def activate_credential(self, credential_blob: bytes, secret: bytes) -> bytes:
        """TPM2_ActivateCredential with the certified EK and this chip's AK: the vendor's secret, which
        the chip gives back only when it holds both (TPM 2.0 Part 1 §24, Part 3 §12.5)."""
        pt = _pt()
        found = self._ek_template()
        if found is None:
            raise AttestError("this TPM has no endorsement key template to activate a credential with")
        c = self.ctx
        ek, _, *_ = c.create_primary(None, found[1], pt.ESYS_TR.ENDORSEMENT)
        ak, _ = self._ak()
        sess = None
        try:
            sess = self._endorsement_session()
            try:
                blob, _ = pt.TPM2B_ID_OBJECT.unmarshal(len(credential_blob).to_bytes(2, "big") + credential_blob)
                enc, _ = pt.TPM2B_ENCRYPTED_SECRET.unmarshal(len(secret).to_bytes(2, "big") + secret)
                out = c.activate_credential(ak, ek, blob, enc, session1=pt.ESYS_TR.PASSWORD, session2=sess)
            except pt.TSS2_Exception as e:
                raise AttestError(
                    f"the TPM refused the vendor's credential (it was made for another TPM or another attestation key): {e}"
                ) from None
            return bytes(out)
        finally:
            if sess is not None:
                c.flush_context(sess)
            c.flush_context(ak)
            c.flush_context(ek)

    def _start_policy_session(self) -> Any:
        pt = _pt()
        return self.ctx.start_auth_session(
            pt.ESYS_TR.NONE, pt.ESYS_TR.NONE, pt.TPM2_SE.POLICY, pt.TPMT_SYM_DEF(algorithm=pt.TPM2_ALG.NULL), pt.TPM2_ALG.SHA256
        )

    def _endorsement_session(self) -> Any:
        """A policy session that meets the EK's authPolicy, PolicySecret(TPM_RH_ENDORSEMENT) (EK Credential
        Profile §B.6): what TPM2_ActivateCredential needs for the EK. The caller flushes it."""
        sess = self._start_policy_session()
        try:
            self.ctx.policy_secret(_pt().ESYS_TR.ENDORSEMENT, sess)
        except BaseException:
            self.ctx.flush_context(sess)
            raise
        return sess

    def _signing_ak(self, expect: str | None) -> tuple[Any, bool]:
        """(ESYS handle, derived): the AK `machine-id --tpm` made persistent when its public key is `expect` (DER
        hex, the license's AK), else the AK derived again (the caller flushes that one)."""
        if expect is not None:
            c = self.ctx
            try:
                h = c.tr_from_tpmpublic(AK_HANDLE)
            except _pt().TSS2_Exception:
                h = None  # none persisted (an older machine-id), or gone (a cleared chip, an evicted key)
            if h is not None:
                pub, _, _ = c.read_public(h)
                if pub.to_der().hex() == expect.lower():
                    return h, False
                c.tr_close(h)  # another key there: not used
        return self._ak()[0], True

    def quote(self, policy: dict[str, Any], data: bytes, ak: str | None = None) -> Quote:
        """TPM2_Quote by the AK over the policy's PCRs, with `data` (at most 64 bytes) as qualifyingData; when
        the policy names the tamper latch, also the AK's TPM2_NV_Certify of it over `data` (`Quote.latch`, None
        when the chip has no latch): a reboot resets the tamper PCR, not the latch, so the verifier sees the event.
        `ak`: the license's AK (DER hex), so the persistent one signs when it is that key (`_signing_ak`)."""
        pt = _pt()
        c = self.ctx
        h, derived = self._signing_ak(ak)
        latch = None
        try:
            attest, sig = c.quote(h, pcr_selection(policy["pcrs"]), data)
            index = (policy.get("latch") or {}).get("index")
            nv = None if index is None else self._counter(index, create=False, what="tamper latch")
            if nv is not None:
                try:
                    latch = self._nv_certify(h, nv, data)
                except pt.TSS2_Exception as e:
                    raise AttestError(f"the TPM could not certify its tamper latch: {e}") from None
        finally:
            if derived:
                c.flush_context(h)
            else:
                c.tr_close(h)
        e = sig.signature.ecdsa
        return Quote(bytes(attest), bytes(e.signatureR), bytes(e.signatureS), latch)

    def extend(self, pcr: int, data: bytes) -> None:
        """Extend `pcr` with SHA-256(`data`): from then on a policy over it no longer holds."""
        pt = _pt()
        pcr_selection([pcr])
        self.ctx.pcr_event(getattr(pt.ESYS_TR, f"PCR{pcr}"), data)  # TPM2_PCR_Event: hashed and extended in every bank
