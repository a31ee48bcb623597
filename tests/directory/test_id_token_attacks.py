"""An attacker's ID tokens against `OidcClient.check_id_token`: each refusal the sign-in relies on (OpenID Connect
Core §3.1.3.7), with tokens made independently of the verifier (tests/directory/idtokens.py) and a loopback provider
publishing the discovery document and JWKS. Every refusal is one line naming no secret."""

from __future__ import annotations

import time

import pytest

from codemoat.config import DirectorySettings
from codemoat.db import open_db
from codemoat.directory.ldap import DirectoryError, DirectoryUnavailable
from codemoat.directory.oidc import OidcClient
from codemoat.errors import Unauthorized
from idtokens import EdSigner, RsaSigner, StubProvider, b64, hs256, unsigned

NONCE = "n1"


@pytest.fixture(scope="module")
def signer():
    return RsaSigner("k1")


@pytest.fixture
def idp(stub_provider, signer):
    p = stub_provider
    p.docs["/.well-known/openid-configuration"] = {"issuer": p.url, "jwks_uri": p.url + "/jwks"}
    p.docs["/jwks"] = {"keys": [signer.jwk()]}
    return p


@pytest.fixture
def client(idp, home):
    cfg = DirectorySettings(oidc_issuer=idp.url, oidc_client_id="codemoat", oidc_redirect_url=idp.url + "/cb")
    engine = open_db(f"sqlite:///{home / 'codemoat.db'}")
    yield OidcClient(cfg, engine)
    engine.dispose()


def claims(idp: StubProvider, **over) -> dict:
    now = int(time.time())
    c = {"iss": idp.url, "aud": "codemoat", "sub": "alice", "nonce": NONCE, "iat": now, "exp": now + 300, **over}
    return {k: v for k, v in c.items() if v is not None}


def refused(client: OidcClient, token: str, nonce: str = NONCE, **kw) -> str:
    with pytest.raises(Unauthorized, match="sign-in refused: the ID token") as e:
        client.check_id_token(token, nonce, **kw)
    assert "\n" not in str(e.value), str(e.value)
    return str(e.value)


def test_a_genuine_token_holds(client, idp, signer):
    assert client.check_id_token(signer.token(claims(idp)), NONCE)["sub"] == "alice"
    assert client.check_id_token(signer.token(claims(idp, aud=["codemoat"])), NONCE)["sub"] == "alice"
    assert client.check_id_token(signer.token(claims(idp, aud=["codemoat", "b"], azp="codemoat")), NONCE)


def test_a_wrong_signature_is_refused(client, idp, signer):
    """Another key under the provider's kid, a payload changed after signing, a signature cut off."""
    assert "does not hold" in refused(client, RsaSigner("k1").token(claims(idp)))
    head, _, sig = signer.token(claims(idp)).split(".")
    forged = signer.token(claims(idp, sub="bob")).split(".")[1]
    refused(client, f"{head}.{forged}.{sig}")
    refused(client, f"{head}.{forged}.")


def test_an_unknown_kid_is_refused_after_one_fresh_jwks(client, idp, signer):
    """A kid the JWKS lacks: the provider may have rotated a key in, so the JWKS is fetched once more, no more;
    a key that did rotate in holds."""
    client.check_id_token(signer.token(claims(idp)), NONCE)
    before = idp.gets["/jwks"]
    client.check_id_token(signer.token(claims(idp)), NONCE)
    assert idp.gets["/jwks"] == before  # a known kid: the cached JWKS
    refused(client, RsaSigner("k9").token(claims(idp)))
    assert idp.gets["/jwks"] == before + 1
    rotated = RsaSigner("k2")
    idp.docs["/jwks"] = {"keys": [signer.jwk(), rotated.jwk()]}
    assert client.check_id_token(rotated.token(claims(idp)), NONCE)["sub"] == "alice"


@pytest.mark.parametrize("alg", ["Ed25519", "EdDSA"])
def test_ed25519_tokens_hold_without_a_warning_and_forged_ones_are_refused(client, idp, signer, alg, recwarn):
    """An Ed25519-signed ID token, under RFC 9864's name "Ed25519" or RFC 8037's "EdDSA" (which deployed providers
    still write, and which joserfc verified with a SecurityWarning each time), holds with no warning at all; one
    changed after signing, signed by another key under its kid, or signed with the RSA key's kid, does not.
    "EdDSA" means Ed25519 here: an Ed448 key under that name is refused."""
    ed = EdSigner("e1", alg=alg)
    ed448 = EdSigner("e448", alg="EdDSA", curve="Ed448")
    idp.docs["/jwks"] = {"keys": [signer.jwk(), ed.jwk(), ed448.jwk()]}
    assert client.check_id_token(ed.token(claims(idp)), NONCE)["sub"] == "alice"
    head, _, sig = ed.token(claims(idp)).split(".")
    forged = ed.token(claims(idp, sub="bob")).split(".")[1]
    refused(client, f"{head}.{forged}.{sig}")
    refused(client, EdSigner("e1", alg=alg).token(claims(idp)))  # another key under the provider's kid
    refused(client, ed.token(claims(idp), kid=signer.kid))  # the RSA key's kid
    assert [str(w.message) for w in recwarn] == []
    refused(client, ed448.token(claims(idp)))  # joserfc's "EdDSA" took Ed448 keys too


def _okp(kid: str, crv: str, raw: bytes, alg: str | None = "EdDSA") -> dict:
    return {k: v for k, v in {"kty": "OKP", "crv": crv, "use": "sig", "alg": alg, "kid": kid, "x": b64(raw)}.items() if v}


def _raw(public_key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def test_eddsa_means_an_ed25519_key_whatever_the_jwks_or_the_header_claims(client, idp, signer):
    """Key and curve confusion against "EdDSA" taken as Ed25519 (oidc._id_token_registry): the token's kid naming an
    EC key, an X25519 (key agreement) OKP key, or a JWK whose "crv" does not match its key bytes (an Ed448 key
    labelled Ed25519, an Ed25519 key labelled Ed448), each signed by the matching private key where one exists, is
    refused; so are "Ed448" and misspelt algorithm names, and an Ed25519 key's token under "ES256". The positive
    beside them: a JWK with no "alg" (many providers publish none) verifies an "EdDSA" token."""
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, x25519

    ed = EdSigner("e1", alg="EdDSA")
    plain = ed.jwk()
    del plain["alg"]
    ed448_key = ed448.Ed448PrivateKey.generate()
    p256 = ec.generate_private_key(ec.SECP256R1()).public_key().public_numbers()
    ec_jwk = {"kty": "EC", "crv": "P-256", "use": "sig", "kid": "c1", "alg": "ES256",
              "x": b64(p256.x.to_bytes(32, "big")), "y": b64(p256.y.to_bytes(32, "big"))}  # fmt: skip
    idp.docs["/jwks"] = {
        "keys": [signer.jwk(), plain, ec_jwk, _okp("x1", "X25519", _raw(x25519.X25519PrivateKey.generate().public_key()))]
    }
    assert client.check_id_token(ed.token(claims(idp)), NONCE)["sub"] == "alice"
    for kid in ("c1", "x1"):
        refused(client, ed.token(claims(idp), kid=kid))
    for alg in ("Ed448", "eddsa", "EDDSA", "ed25519", "ES256", "RS256", "EdDSA "):
        refused(client, ed.token(claims(idp), alg=alg))

    # an Ed448 key under a JWK that says Ed25519, its token signed by that Ed448 key
    mislabelled = EdSigner("m1", alg="EdDSA", curve="Ed448")
    mislabelled.key = ed448_key
    for jwk in (_okp("m1", "Ed25519", _raw(ed448_key.public_key())), _okp("m1", "Ed25519", _raw(ed448_key.public_key()), None)):
        idp.docs["/jwks"] = {"keys": [signer.jwk(), jwk]}
        with pytest.raises((DirectoryUnavailable, Unauthorized)) as e:
            client.check_id_token(mislabelled.token(claims(idp)), NONCE)
        assert "\n" not in str(e.value), str(e.value)
    # an Ed25519 key under a JWK that says Ed448 (a kid not seen before: the client keeps the keys it fetched)
    ed2 = EdSigner("e2", alg="EdDSA")
    idp.docs["/jwks"] = {"keys": [signer.jwk(), _okp("e2", "Ed448", _raw(ed2.key.public_key()))]}
    with pytest.raises((DirectoryUnavailable, Unauthorized)) as e:
        client.check_id_token(ed2.token(claims(idp)), NONCE)
    assert "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize(("jwk_alg", "token_alg"), [("Ed25519", "EdDSA"), ("EdDSA", "Ed25519")])
def test_a_jwk_and_a_token_naming_ed25519_differently_agree(client, idp, signer, jwk_alg, token_alg, recwarn):
    """A provider moving to RFC 9864 publishes its Ed25519 key as "alg": "Ed25519" while its tokens still say
    "EdDSA" (or the reverse): for an OKP Ed25519 key both names are the one algorithm, so the token holds, with no
    warning. Beside it, what the pairing must not open: a forged token, another key under the kid, an Ed448 key
    under either name (its JWK saying Ed448, EdDSA or Ed25519), a JWK saying "Ed448" for Ed25519 key bytes, and the
    RSA key's kid or an RSA JWK labelled with an Ed25519 name."""
    from cryptography.hazmat.primitives.asymmetric import ed448

    ed = EdSigner("e1", alg=token_alg)
    jwk = {**ed.jwk(), "alg": jwk_alg}
    idp.docs["/jwks"] = {"keys": [signer.jwk(), jwk]}
    assert client.check_id_token(ed.token(claims(idp)), NONCE)["sub"] == "alice"
    assert [str(w.message) for w in recwarn] == []
    head, _, sig = ed.token(claims(idp)).split(".")
    refused(client, f"{head}.{ed.token(claims(idp, sub='bob')).split('.')[1]}.{sig}")
    refused(client, EdSigner("e1", alg=token_alg).token(claims(idp)))  # another key under the provider's kid
    # the RSA key's kid (its JWK says RS256): refused, and the refusal says why, not "no provider key has its kid"
    why = refused(client, ed.token(claims(idp), kid=signer.kid))
    assert "RS256" in why and "no provider key" not in why, why

    # an Ed448 key under each JWK label, its token signed by it under the other Ed25519 name (a new kid each time:
    # the client fetches the JWKS again for a kid it has not seen)
    key448 = ed448.Ed448PrivateKey.generate()
    for i, (label, crv) in enumerate((("Ed448", "Ed448"), ("EdDSA", "Ed448"), ("Ed25519", "Ed448"), (jwk_alg, "Ed25519"))):
        e448 = EdSigner(f"e448-{i}", alg=token_alg, curve="Ed448")
        e448.key = key448
        idp.docs["/jwks"] = {"keys": [signer.jwk(), jwk, _okp(e448.kid, crv, _raw(key448.public_key()), label)]}
        with pytest.raises((DirectoryUnavailable, Unauthorized)) as e:
            client.check_id_token(e448.token(claims(idp)), NONCE)
        assert "\n" not in str(e.value), str(e.value)
    # an Ed25519 key whose JWK says "Ed448": that label is not widened to the Ed25519 names
    e2 = EdSigner("e2", alg=token_alg)
    idp.docs["/jwks"] = {"keys": [signer.jwk(), _okp("e2", "Ed25519", _raw(e2.key.public_key()), "Ed448")]}
    assert "Ed448" in refused(client, e2.token(claims(idp)))
    # an RSA JWK labelled with an Ed25519 name, named by an Ed25519 token's kid
    rsa = RsaSigner("r2")
    idp.docs["/jwks"] = {"keys": [{**rsa.jwk(), "alg": jwk_alg}, jwk]}
    refused(client, ed.token(claims(idp), kid=rsa.kid))
    assert client.check_id_token(ed.token(claims(idp)), NONCE)["sub"] == "alice"


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
def test_alg_none_is_refused(client, idp, signer, alg):
    refused(client, unsigned(claims(idp), alg=alg, kid=signer.kid))
    refused(client, unsigned(claims(idp), alg=alg))


def test_hs256_signed_with_the_public_key_is_refused(client, idp, signer):
    """Algorithm confusion: a verifier that takes the JWK's key as an HMAC secret would accept a token anyone can
    make from the published key (its PEM, its DER, or the modulus bytes)."""
    pub = signer.key.public_key()
    n = pub.public_numbers().n
    for secret in (signer.public_pem(), pub.public_bytes(*_der()), n.to_bytes((n.bit_length() + 7) // 8, "big")):
        refused(client, hs256(claims(idp), secret, kid=signer.kid))
        refused(client, hs256(claims(idp), secret))


def _der():
    from cryptography.hazmat.primitives import serialization

    return serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo


def test_expired_and_not_yet_valid_tokens_are_refused(client, idp, signer):
    now = int(time.time())
    refused(client, signer.token(claims(idp, iat=now - 900, exp=now - 300)))  # past the 60 s leeway
    refused(client, signer.token(claims(idp, nbf=now + 600)))
    refused(client, signer.token(claims(idp, iat=now + 600, exp=now + 900)))  # issued in the future
    refused(client, signer.token(claims(idp, exp=None)))  # never expires
    refused(client, signer.token(claims(idp, exp="9999999999")))
    # inside the leeway: a provider whose clock is a little off still signs people in
    assert client.check_id_token(signer.token(claims(idp, exp=now - 20, nbf=now + 20)), NONCE)["sub"] == "alice"


def test_a_token_for_another_audience_is_refused(client, idp, signer):
    refused(client, signer.token(claims(idp, aud="someone-else")))
    refused(client, signer.token(claims(idp, aud=None)))
    refused(client, signer.token(claims(idp, aud=["someone-else"])))
    refused(client, signer.token(claims(idp, aud="codemoat-and-more")))
    # several audiences with codemoat among them: only if codemoat is the authorized party
    assert "azp" in refused(client, signer.token(claims(idp, aud=["someone-else", "codemoat"], azp="someone-else")))
    refused(client, signer.token(claims(idp, aud=["someone-else", "codemoat"])))


def test_a_wrong_or_missing_nonce_is_refused(client, idp, signer):
    refused(client, signer.token(claims(idp)), nonce="another-nonce")
    refused(client, signer.token(claims(idp, nonce=None)))
    refused(client, signer.token(claims(idp, nonce=[NONCE])))
    # a pending sign-in whose stored nonce is empty (a row written without one) never matches a token lacking it
    refused(client, signer.token(claims(idp, nonce=None)), nonce=None)
    refused(client, signer.token(claims(idp, nonce="")), nonce="")
    # the device flow's token (RFC 8628 has no nonce) may lack it; if it has one, it must match
    assert client.check_id_token(signer.token(claims(idp, nonce=None)), NONCE, nonce_required=False)
    refused(client, signer.token(claims(idp, nonce="another-nonce")), nonce_required=False)


def test_a_token_without_a_subject_or_not_a_token_is_refused(client, idp, signer):
    refused(client, signer.token(claims(idp, sub=None)))
    refused(client, signer.token(claims(idp, sub=7)))
    for junk in ("", "x", "a.b.c", "a.b", "....", "eyJhbGciOiJSUzI1NiJ9.e30.\udcff", signer.token(["not", "claims"])):
        refused(client, junk)


def test_an_id_token_or_discovery_from_another_issuer_is_refused(client, idp, signer, home):
    """Mix-up: the company runs two providers (or an attacker runs one and gets a token signed by a key
    the configured one also publishes); only `iss` tells them apart, and it is checked both places."""
    for other in ("http://127.0.0.1:1", idp.url + "/", idp.url + "/other", "https://evil.example", None, [idp.url]):
        refused(client, signer.token(claims(idp, iss=other)))
    # a provider whose issuer ends in "/" (Auth0 does): its tokens say so, and only those hold
    idp.docs["/.well-known/openid-configuration"] = {"issuer": idp.url + "/", "jwks_uri": idp.url + "/jwks"}
    slash = OidcClient(client.cfg.model_copy(update={"oidc_issuer": idp.url + "/"}), client.engine)
    assert slash.check_id_token(signer.token(claims(idp, iss=idp.url + "/")), NONCE)["sub"] == "alice"
    refused(slash, signer.token(claims(idp)))
    # a discovery document naming another issuer (a provider at this address speaking for another)
    idp.docs["/.well-known/openid-configuration"] = {"issuer": "https://evil.example", "jwks_uri": idp.url + "/jwks"}
    with pytest.raises(DirectoryError, match="names another issuer"):
        OidcClient(client.cfg, client.engine).metadata()


@pytest.mark.parametrize(
    "jwks",
    [{}, {"keys": []}, {"keys": "x"}, {"keys": [{"kty": "RSA"}]}, {"keys": [{"kty": "RSA", "n": 5, "e": "AQAB"}]}, []],
)
def test_a_jwks_the_server_cannot_use_is_one_line(client, idp, signer, jwks):
    idp.docs["/jwks"] = jwks
    with pytest.raises((DirectoryUnavailable, Unauthorized)) as e:
        client.check_id_token(signer.token(claims(idp)), NONCE)
    assert "\n" not in str(e.value), str(e.value)
