"""Attacks on the TPM work of issue 18 (EK->AK binding, the audit counter), each against real swtpm chips.

A customer's admin holds the owner hierarchy (its auth is empty on most machines) and the audit
database; a vendor-side insider can run `vendor tpm challenge` on any identity a customer sends.
"""

from __future__ import annotations

import shutil

import pytest

from codemoat.attest import AttestError
from codemoat.attest.tpm import TAMPER_PCR, TpmAttestor
from codemoat.attest.tpmcounters import AUDIT_NV_INDEX
from codemoat.audit.log import AuditLog
from codemoat.audit.tpm_checkpoint import take
from codemoat.vault.codec import VaultError
from codemoat.vault.machine import parse_identity
from codemoat.vault.tpmbind import activate, challenge, require_bound
from ggufs import write_gguf

from .tpmhelp import append, audit_log, bind, tpm_machine


def test_a_new_challenge_pairing_a_bound_ak_with_another_ek_does_not_inherit_the_binding(vendor, swtpm_factory):
    one, two = swtpm_factory(), swtpm_factory()
    key = tpm_machine(one, vendor)  # chip one's AK, bound to chip one's EK
    ident = parse_identity(key.identity())
    require_bound(vendor.engine, ident)
    with TpmAttestor(two.tcti) as a:
        other = a.identity([TAMPER_PCR])
    # the bound AK presented beside another genuine chip's EK and certificate: the challenge is made
    # (each part checks out on its own), but nothing has proven the pair, so no license may name it
    forged = dict(ident, tpm=dict(ident["tpm"], ek=other["ek"], ek_cert=other["ek_cert"]))
    ch = challenge(vendor, forged)
    with pytest.raises(VaultError, match="not bound to its EK"):
        require_bound(vendor.engine, forged)
    with pytest.raises(AttestError, match="refused the vendor's credential"):  # neither chip can answer it
        activate(TpmAttestor(one.tcti), key.id, forged["tpm"], ch)
    # the genuine pair binds again through the chip, and only the genuine pair
    bind(vendor, key, one.ca)
    require_bound(vendor.engine, ident)
    with pytest.raises(VaultError, match="not bound to its EK"):
        require_bound(vendor.engine, forged)


def _replace_counter_with_ordinary_index(tcti: str, value: int) -> None:
    """What an owner can do: undefine the audit counter and define an ordinary 8-byte index at the same
    handle, holding whatever value it likes (an ordinary index can be written back down)."""
    import tpm2_pytss as pt

    with TpmAttestor(tcti) as a:
        c = a.ctx
        c.nv_undefine_space(c.tr_from_tpmpublic(AUDIT_NV_INDEX), pt.ESYS_TR.OWNER)
        attrs = pt.TPMA_NV.AUTHWRITE | pt.TPMA_NV.AUTHREAD | pt.TPMA_NV.NO_DA
        pub = pt.TPM2B_NV_PUBLIC(
            nvPublic=pt.TPMS_NV_PUBLIC(nvIndex=AUDIT_NV_INDEX, nameAlg=pt.TPM2_ALG.SHA256, attributes=attrs, dataSize=8)
        )
        h = c.nv_define_space(b"", pub, pt.ESYS_TR.OWNER)
        c.nv_write(h, value.to_bytes(8, "big"), 0, auth_handle=h)


def _rolled_back(machine, tmp_path, monkeypatch) -> AuditLog:
    """An audit log put back to an earlier copy of itself (database and head file): 5 records and a TPM
    checkpoint (counter 1), 2 more, the copy; 3 more and a checkpoint (counter 2); then the copy restored and
    the verifier's memory of the newer head wiped. Every signature in it is valid: only the chip can tell."""
    db = tmp_path / "audit.db"
    url = f"sqlite:///{db}"
    monkeypatch.setenv("CODEMOAT_DATABASE_URL", url)
    log = audit_log(url)
    append(log, 5)
    assert take(log, machine)["counter"] == 1
    append(log, 2)
    copy = tmp_path / "copy"
    copy.mkdir()
    log.engine.dispose()
    for f in (db, log.head_file):
        shutil.copy(f, copy / f.name)
    append(log, 3)
    assert take(log, machine)["counter"] == 2
    log.engine.dispose()
    for f in (db, log.head_file):
        shutil.copy(copy / f.name, f)
    log.verified_file.unlink(missing_ok=True)
    return audit_log(url)


def test_a_rolled_back_log_is_not_hidden_by_an_ordinary_nv_index_holding_the_old_counter(swtpm, tmp_path, monkeypatch):
    machine = tpm_machine(swtpm)
    log = _rolled_back(machine, tmp_path, monkeypatch)
    rep = log.verify()
    assert not rep.ok and "rolled back" in rep.problem  # the chip's counter (2) says so...

    _replace_counter_with_ordinary_index(swtpm.tcti, 1)  # ...so the admin makes the chip "say" 1
    rep = log.verify()
    assert not rep.ok and "not codemoat's audit counter" in rep.problem, rep.problem
    with pytest.raises(AttestError, match="not codemoat's audit counter"):  # and no checkpoint is taken over it
        take(log, machine)


def test_a_log_truncated_before_its_only_tpm_checkpoint_fails_unless_the_operator_rotated_it(swtpm, tmp_path, monkeypatch):
    machine = tpm_machine(swtpm)
    db = tmp_path / "audit.db"
    url = f"sqlite:///{db}"
    monkeypatch.setenv("CODEMOAT_DATABASE_URL", url)
    log = audit_log(url)
    append(log, 5)
    assert log.verify().ok
    copy = tmp_path / "copy"  # taken before the log's first (and only) TPM checkpoint
    copy.mkdir()
    log.engine.dispose()
    for f in (db, log.head_file):
        shutil.copy(f, copy / f.name)
    assert take(log, machine)["counter"] == 1
    append(log, 3)
    assert log.verify().ok
    log.engine.dispose()
    for f in (db, log.head_file):  # the checkpoint and everything after it gone, every signature valid
        shutil.copy(copy / f.name, f)
    log.verified_file.unlink(missing_ok=True)
    log = audit_log(url)
    rep = log.verify()
    assert not rep.ok and "holds none of them" in rep.problem, rep
    # an operator who starts a new chain on purpose says so in the log (a signed rotation record first)
    log.rotate(tmp_path / "archive.jsonl")
    rep = log.verify()
    assert rep.ok and "rotated" in (rep.warning or ""), rep
    assert take(log, machine)["counter"] == 2  # and the next checkpoint starts the new log's sequence
    assert log.verify().ok


def _software_ak(attrs):
    """A P-256 key made in software, described by a TPMT_PUBLIC that claims an AK's attributes."""
    import tpm2_pytss as pt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    k = ec.generate_private_key(ec.SECP256R1())
    n = k.public_key().public_numbers()
    tmpl = pt.TPM2B_PUBLIC.parse("ecc256:ecdsa-sha256", objectAttributes=attrs)
    tmpl.publicArea.parameters.eccDetail.symmetric.algorithm = pt.TPM2_ALG.NULL
    tmpl.publicArea.unique.ecc.x = n.x.to_bytes(32, "big")
    tmpl.publicArea.unique.ecc.y = n.y.to_bytes(32, "big")
    der = k.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return tmpl, der.hex()


def test_a_software_key_loaded_public_only_under_ak_attributes_cannot_activate_the_credential(swtpm):
    """The binding's premise: only a key the chip made can answer. A software key claiming fixedTPM,
    restricted and sign, loaded into the genuine chip as a public area only (TPM2_LoadExternal), has
    the name the vendor's credential is bound to; the chip must still refuse to release the secret."""
    import tpm2_pytss as pt

    from codemoat.vault.tpmcred import ak_name, make_credential

    with TpmAttestor(swtpm.tcti) as a:
        ident = a.identity([TAMPER_PCR])
        tmpl, der = _software_ak(a._attrs("USERWITHAUTH", "RESTRICTED", "SIGN_ENCRYPT"))
        area = tmpl.publicArea.marshal().hex()
        name = ak_name(area, der)  # its public area alone looks like an AK: the vendor makes the credential
        blob, secret = make_credential(ident["ek"], name, b"s" * 32)
        c = a.ctx
        try:
            h = c.load_external(tmpl, None, pt.ESYS_TR.NULL)
        except pt.TSS2_Exception:
            return  # the chip will not even load it with those attributes: stopped
        try:
            assert bytes(c.tr_get_name(h)) == name
            found = a._ek_template()
            ek, *_ = c.create_primary(None, found[1], pt.ESYS_TR.ENDORSEMENT)
            sess = a._endorsement_session()  # as activate_credential satisfies the EK's policy
            b, _ = pt.TPM2B_ID_OBJECT.unmarshal(len(blob).to_bytes(2, "big") + blob)
            e, _ = pt.TPM2B_ENCRYPTED_SECRET.unmarshal(len(secret).to_bytes(2, "big") + secret)
            # swtpm loads it, and refuses here: no authValue for an object whose private part it lacks
            with pytest.raises(pt.TSS2_Exception, match="not available"):
                c.activate_credential(h, ek, b, e, session1=pt.ESYS_TR.PASSWORD, session2=sess)
            c.flush_context(ek)
        finally:
            c.flush_context(h)


def _cert(subject, key, issuer=None, issuer_key=None, *, ca=True, days=(-1, 1), extra=()):
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    n = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(n)
        .issuer_name(issuer.subject if issuer is not None else n)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + datetime.timedelta(days=days[0]))
        .not_valid_after(now + datetime.timedelta(days=days[1]))
    )
    if ca is not None:
        b = b.add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    for ext, critical in extra:
        b = b.add_extension(ext, critical=critical)
    return b.sign(issuer_key if issuer_key is not None else key, hashes.SHA256())


def test_ek_certificate_chains_through_a_non_ca_or_an_expired_certificate_are_refused():
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from codemoat.vault.tpmcred import verify_ek_cert

    root_k, mid_k, ek_k = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ek_hex = ek_k.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo).hex()
    root = _cert("TPM maker root", root_k)

    def chain(mid_ca=True, mid_days=(-1, 1), ek_days=(-1, 1)):
        mid = _cert("TPM maker issuing", mid_k, root, root_k, ca=mid_ca, days=mid_days)
        ek = _cert("EK", ek_k, mid, mid_k, ca=None, days=ek_days)
        return ek.public_bytes(serialization.Encoding.DER).hex(), [mid, root]

    ek, cas = chain()
    assert verify_ek_cert(ek, ek_hex, cas)  # the well-formed chain holds (so each refusal below is the change's)
    ek, cas = chain(mid_ca=False)  # a leaf certificate of the maker's, used to sign an EK certificate
    with pytest.raises(VaultError, match="not a CA"):
        verify_ek_cert(ek, ek_hex, cas)
    ek, cas = chain(mid_ca=None)  # no basicConstraints at all
    with pytest.raises(VaultError, match="not a CA"):
        verify_ek_cert(ek, ek_hex, cas)
    ek, cas = chain(mid_days=(-10, -5))  # an expired intermediate
    with pytest.raises(VaultError, match="outside its validity"):
        verify_ek_cert(ek, ek_hex, cas)
    ek, cas = chain(ek_days=(1, 5))  # an EK certificate not valid yet
    with pytest.raises(VaultError, match="outside its validity"):
        verify_ek_cert(ek, ek_hex, cas)
    ek, cas = chain()
    with pytest.raises(VaultError, match="does not chain"):  # the intermediate not trusted, only the root
        verify_ek_cert(ek, ek_hex, [cas[1]])


def test_ek_certificate_chains_with_unknown_critical_extensions_or_a_ca_key_not_for_certificates_are_refused():
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from codemoat.vault.tpmcred import verify_ek_cert

    root_k, mid_k, ek_k = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ek_hex = ek_k.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo).hex()
    root = _cert("TPM maker root", root_k)
    odd = x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x05\x00")
    no_sign = x509.KeyUsage(True, False, False, False, False, False, True, False, False)  # signature, CRL; no keyCertSign

    def chain(mid_extra=(), ek_extra=()):
        mid = _cert("TPM maker issuing", mid_k, root, root_k, extra=mid_extra)
        ek = _cert("EK", ek_k, mid, mid_k, ca=None, extra=ek_extra)
        return ek.public_bytes(serialization.Encoding.DER).hex(), [mid, root]

    ek, cas = chain(ek_extra=[(odd, False)])
    assert verify_ek_cert(ek, ek_hex, cas)  # the same extension not marked critical: ignored, the chain holds
    ek, cas = chain(ek_extra=[(odd, True)])  # a constraint on the EK certificate this check does not know
    with pytest.raises(VaultError, match="critical extension this vendor does not understand"):
        verify_ek_cert(ek, ek_hex, cas)
    ek, cas = chain(mid_extra=[(odd, True)])  # ...or on the issuing CA
    with pytest.raises(VaultError, match="critical extension"):
        verify_ek_cert(ek, ek_hex, cas)
    ek, cas = chain(mid_extra=[(no_sign, True)])  # an issuer whose key the maker restricted to other uses
    with pytest.raises(VaultError, match="may not sign certificates"):
        verify_ek_cert(ek, ek_hex, cas)


def test_an_ak_public_area_with_another_name_alg_or_without_fixed_tpm_or_restricted_is_refused(swtpm):
    import struct

    from codemoat.vault.tpmcred import FIXED_TPM, RESTRICTED, SENSITIVE_DATA_ORIGIN, SIGN, ak_name

    with TpmAttestor(swtpm.tcti) as a:
        ident = a.identity([TAMPER_PCR])
    area = bytes.fromhex(ident["ak_public"])
    assert ak_name(area.hex(), ident["ak"])[:2] == b"\x00\x0b"
    typ, name_alg, attrs = struct.unpack_from(">HHI", area, 0)
    sha1 = struct.pack(">HHI", typ, 0x0004, attrs) + area[8:]  # the name over SHA-1: a weaker binding
    with pytest.raises(VaultError, match="not an ECDSA-SHA256 P-256 key"):
        ak_name(sha1.hex(), ident["ak"])
    for bit in (FIXED_TPM, RESTRICTED, SENSITIVE_DATA_ORIGIN, SIGN):  # a key that may leave, sign anything, or was imported
        edited = struct.pack(">HHI", typ, name_alg, attrs & ~bit) + area[8:]
        with pytest.raises(VaultError, match="not a restricted signing key"):
            ak_name(edited.hex(), ident["ak"])


def test_a_software_unwrap_key_beside_a_bound_ak_gets_no_license(vendor, swtpm, tmp_path):
    """The admin keeps the chip's bound AK and EK but names an unwrap key made in software: an offline
    license sealed to it would open on any machine. The AK must have certified the unwrap key."""
    import struct
    import time

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = tpm_machine(swtpm, vendor)
    ident = parse_identity(key.identity())
    model = tmp_path / "m.gguf"
    write_gguf(model, 20_000)
    moat = tmp_path / "acme.moat"
    vendor.seal(model, "acme", moat)
    soft = ec.generate_private_key(ec.SECP256R1())
    soft_der = soft.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    forged = dict(ident, tpm=dict(ident["tpm"], unwrap=soft_der.hex()))
    with pytest.raises(VaultError, match="unwrap key"):
        vendor.issue_license(customer="acme", model=moat, machines=[forged], expires=int(time.time()) + 99, mode="offline")
    # its public area rewritten to the software key (attributes and policy kept): not the key the AK certified
    n = soft.public_key().public_numbers()
    area = bytes.fromhex(ident["tpm"]["unwrap_public"])[:-68]
    area += struct.pack(">H", 32) + n.x.to_bytes(32, "big") + struct.pack(">H", 32) + n.y.to_bytes(32, "big")
    forged["tpm"]["unwrap_public"] = area.hex()
    with pytest.raises(VaultError, match="unwrap key is not certified.*made for another key"):
        vendor.issue_license(customer="acme", model=moat, machines=[forged], expires=int(time.time()) + 99, mode="offline")
    # the chip's own certification holds, and the policy in its area is the identity's PCR policy
    from codemoat.vault.tpmcred import pcr_policy_digest

    with TpmAttestor(swtpm.tcti) as a:
        assert pcr_policy_digest(ident["tpm"]["policy"]) == a.policy_digest(ident["tpm"]["policy"])
    doc = vendor.issue_license(customer="acme", model=moat, machines=[ident], expires=int(time.time()) + 99, mode="offline")
    assert doc["license"]["machines"][0]["tpm"]["unwrap"] == ident["tpm"]["unwrap"]
    certified = dict(ident["tpm"], unwrap_certify=dict(ident["tpm"]["unwrap_certify"]))
    r = certified["unwrap_certify"]["r"]  # its first byte flipped ("00" + r[2:] left 1 in 256 signatures as they were)
    certified["unwrap_certify"]["r"] = f"{int(r[:2], 16) ^ 0x80:02x}" + r[2:]
    with pytest.raises(VaultError, match="does not verify"):  # the chip's signature, edited
        vendor.issue_license(
            customer="acme", model=moat, machines=[dict(ident, tpm=certified)], expires=int(time.time()) + 99, mode="offline"
        )


def test_an_old_activation_answer_or_a_relabelled_one_does_not_confirm_a_new_challenge(vendor, swtpm):
    from codemoat.vault.tpmbind import confirm

    key = tpm_machine(swtpm, vendor)
    ident = parse_identity(key.identity())
    old = activate(key.attestor(), key.id, key.tpm["identity"], challenge(vendor, ident))
    fresh = challenge(vendor, ident)  # a new challenge replaces the old one's secret
    with pytest.raises(VaultError, match="does not match the challenge"):  # the chip's genuine, but earlier, answer
        confirm(vendor, old)
    with pytest.raises(VaultError, match="does not match the challenge"):  # a guessed secret
        confirm(vendor, dict(old, secret="11" * 32))
    with pytest.raises(VaultError, match="no open TPM challenge"):  # the answer relabelled for another machine id
        confirm(vendor, dict(old, machine_id="m_" + "0" * 24))
    # the answer to the live challenge still binds (the failed tries above did not spend it)
    confirm(vendor, activate(key.attestor(), key.id, key.tpm["identity"], fresh))
    require_bound(vendor.engine, ident)


def test_a_rolled_back_log_is_not_hidden_by_pointing_the_verifier_at_another_tpm(swtpm_factory, tmp_path, monkeypatch):
    """`audit verify` compares the log with "the chip's counter now": the answer must come from this
    machine's chip (certified by its AK over a fresh nonce), not from whatever TPM the TCTI names."""
    from codemoat.audit.tpm_checkpoint import checkpoint_data
    from codemoat.vault.machine import TCTI_ENV

    one, two = swtpm_factory(ek_cert=False), swtpm_factory(ek_cert=False)
    machine = tpm_machine(one)
    log = _rolled_back(machine, tmp_path, monkeypatch)
    assert not log.verify().ok
    with TpmAttestor(two.tcti) as a:  # a spare (software) TPM whose counter the admin brought to 1
        assert a.audit_checkpoint(checkpoint_data("x", 1, "00" * 32))[1] == 1
    monkeypatch.setenv(TCTI_ENV, two.tcti)
    rep = log.verify()
    assert not rep.ok and "not this machine's TPM" in rep.problem, rep
    monkeypatch.setenv(TCTI_ENV, one.tcti)  # the machine's own chip: the rollback named as before
    rep = log.verify()
    assert not rep.ok and "rolled back" in rep.problem, rep
