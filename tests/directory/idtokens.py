"""ID tokens made the way a provider makes them, written from RFC 7515 (JWS compact serialization) and RFC 7518
§3.2-3.3 (HS256, RS256) and RFC 8037 (EdDSA) with `cryptography` and `hmac` alone: the verifier under test uses a JOSE library, so the
tokens the tests throw at it do not come from the code they check. `StubProvider` publishes what a test sets
(discovery document, JWKS) on a loopback port, and counts the requests for each path."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections import Counter
from http.server import BaseHTTPRequestHandler

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from localhttp import LocalHTTP


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _part(obj: dict) -> str:
    return b64(json.dumps(obj, separators=(",", ":")).encode())


class RsaSigner:
    """An RS256 signing key with a `kid`, as a provider keeps one."""

    def __init__(self, kid: str = "k1"):
        self.kid = kid
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def jwk(self) -> dict:
        """The public key as the provider's JWKS lists it (RFC 7517 §4, RFC 7518 §6.3.1)."""
        n = self.key.public_key().public_numbers()
        return {
            "kty": "RSA",
            "use": "sig",
            "alg": "RS256",
            "kid": self.kid,
            "n": b64(n.n.to_bytes((n.n.bit_length() + 7) // 8, "big")),
            "e": b64(n.e.to_bytes(3, "big")),
        }

    def public_pem(self) -> bytes:
        return self.key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def token(self, claims: dict, **header) -> str:
        signing_input = _part({"alg": "RS256", "kid": self.kid, "typ": "JWT", **header}) + "." + _part(claims)
        sig = self.key.sign(signing_input.encode("ascii"), padding.PKCS1v15(), hashes.SHA256())
        return signing_input + "." + b64(sig)


class EdSigner:
    """An Ed25519 (or Ed448) signing key with a `kid` (RFC 8037 §2 OKP key; the signature is the curve's EdDSA
    signature of the signing input, RFC 8037 §3.1). `alg`: RFC 9864's "Ed25519", or RFC 8037's "EdDSA"."""

    def __init__(self, kid: str = "e1", alg: str = "Ed25519", curve: str = "Ed25519"):
        from cryptography.hazmat.primitives.asymmetric import ed448, ed25519

        self.kid, self.alg, self.curve = kid, alg, curve
        self.key = (ed25519.Ed25519PrivateKey if curve == "Ed25519" else ed448.Ed448PrivateKey).generate()

    def jwk(self) -> dict:
        x = self.key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return {"kty": "OKP", "crv": self.curve, "use": "sig", "alg": self.alg, "kid": self.kid, "x": b64(x)}

    def token(self, claims: dict, **header) -> str:
        signing_input = _part({"alg": self.alg, "kid": self.kid, "typ": "JWT", **header}) + "." + _part(claims)
        return signing_input + "." + b64(self.key.sign(signing_input.encode("ascii")))


def hs256(claims: dict, secret: bytes, **header) -> str:
    """An HS256 token whose MAC key is `secret` (the algorithm confusion: the RSA public key used as one)."""
    signing_input = _part({"alg": "HS256", "typ": "JWT", **header}) + "." + _part(claims)
    return signing_input + "." + b64(hmac.new(secret, signing_input.encode("ascii"), hashlib.sha256).digest())


def unsigned(claims: dict, alg: str = "none", **header) -> str:
    """An "unsecured JWS" (RFC 7515 §A.5): no signature at all."""
    return _part({"alg": alg, "typ": "JWT", **header}) + "." + _part(claims) + "."


class StubProvider(LocalHTTP):
    """A loopback provider that answers GET `path` with `docs[path]` (JSON) and 404 otherwise."""

    def __init__(self) -> None:
        self.docs: dict[str, object] = {}
        self.gets: Counter[str] = Counter()
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                outer.gets[self.path] += 1
                body = json.dumps(outer.docs.get(self.path, {})).encode()
                self.send_response(200 if self.path in outer.docs else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        super().__init__(H)
