"""OpenID Connect sign-in: the authorization code flow with PKCE (OpenID Connect Core 1.0 §3.1,
RFC 7636), for a browser that signs a developer in with the company's identity provider.

    url = client.start(binding=cookie)         # redirect the browser there (cookie: its own random value)
    user = client.finish(state, code, binding=cookie)  # on the callback: DirUser, or Unauthorized

`start` keeps a fresh `state`, `nonce` and PKCE verifier in the shared database (so any replica
can take the callback) for `PENDING_TTL_S`; `finish` consumes the state exactly once (a replayed
or unknown state is refused), trades the code with the verifier, and accepts the ID token only if
its signature verifies against the provider's JWKS and `iss`, `aud`, `nonce` and `exp`/`iat`
match (with `oidc_leeway_s` of clock skew). Groups come from `oidc_groups_claim`.

Login CSRF (OpenID Connect Core §15.5.2, RFC 6749 §10.12): a sign-in is bound to the browser that
started it. `start` keeps the SHA-256 of a random value that the caller also puts in a cookie;
`finish` refuses a callback whose browser does not hold it, so a callback URL carrying someone
else's state and code (forged, or stolen from their browser) signs no one in. A `purpose` ("api":
the token page at /auth/oidc, "console": the admin console) keeps a sign-in started for one from
being finished at the other, and picks the redirect URI registered for it.

Flooding: `start` needs no token, so it keeps at most `oidc_pending_per_address` unfinished sign-ins
per client address (429 past it) and `oidc_pending_max` in all (503 past it: new sign-ins wait, those
already under way still finish). Expired ones are pruned through the `created_at` index and counted
through the `client` index, so neither the table nor the cost of a start grows with a flood.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import threading
import time
from urllib.parse import urlencode

import httpx
import sqlalchemy as sa
from sqlalchemy import Engine

from ..config import DirectorySettings
from ..names import valid_name
from ..deadline import ANSWER_TIMEOUTS, DeadlinePassed, within
from ..paths import read_secret
from ..errors import Overloaded, RateLimited, Unauthorized
from .ldap import DirectoryError, DirectoryUnavailable, DirUser

PENDING_TTL_S = 600

meta = sa.MetaData()
pending = sa.Table(
    "oidc_pending",
    meta,
    sa.Column("state", sa.String(64), primary_key=True),
    sa.Column("nonce", sa.String(64)),
    sa.Column("verifier", sa.String(128)),
    sa.Column("created_at", sa.Float),
    sa.Column("purpose", sa.String(16)),
    sa.Column("binding", sa.String(64)),
    sa.Column("client", sa.String(64)),  # the address that started it (None: started before d004)
    sa.Index("ix_oidc_pending_created_at", "created_at"),
    sa.Index("ix_oidc_pending_client", "client"),
)
PURPOSES = ("api", "console")
# what providers sign ID tokens with. Ed25519 is RFC 9864's name; "EdDSA" (RFC 8037, which RFC 9864 deprecates
# and joserfc warns about at every verification) is still what deployed providers write (Rauthy's default for
# new clients): it is verified as Ed25519 is, an Ed25519 key only (`_id_token_registry`), without the warning.
ID_TOKEN_ALGS = ("RS256", "PS256", "ES256", "Ed25519", "EdDSA")
# the two names of one algorithm for an OKP Ed25519 key: a JWK labelled with either verifies a token under either
# (a provider moving to RFC 9864 relabels its keys and its tokens at different times). Ed448 is neither.
ED25519_NAMES = ("Ed25519", "EdDSA")
_REGISTRY = None


def _id_token_registry():
    """joserfc's JWS registry allowing ID_TOKEN_ALGS, with "Ed25519" and "EdDSA" both RFC 9864's Ed25519: the
    same Ed25519 verification and curve check, no Ed448 key, a JWK labelled with either name accepted for
    either, and no SecurityWarning on each use."""
    global _REGISTRY
    if _REGISTRY is None:
        from joserfc.errors import InvalidKeyCurveError, InvalidKeyTypeError, UnsupportedKeyAlgorithmError
        from joserfc.jws import JWSRegistry

        base = type(JWSRegistry.algorithms["Ed25519"])  # RFC 9864's EdDSAAlgorithm: checks the key's curve

        class Ed25519Either(base):
            def check_key(self, key) -> None:
                # joserfc's own check (JWSAlgModel.check_key) with the JWK's "alg" compared as a name of Ed25519
                key.check_use("sig")
                if key.key_type != "OKP":
                    raise InvalidKeyTypeError(f"Algorithm '{self.name}' requires 'OKP' key")
                if key.get("alg") not in (None, *ED25519_NAMES):
                    raise UnsupportedKeyAlgorithmError(f"This key is designed for algorithm '{key.get('alg')}'")
                if key.curve_name != "Ed25519":
                    raise InvalidKeyCurveError(f"Key for '{self.name}' not supported, only 'Ed25519' allowed")

        either = {}
        for name in ED25519_NAMES:
            either[name] = Ed25519Either("Ed25519")
            either[name].name = name

        class IdTokenRegistry(JWSRegistry):
            algorithms = {**JWSRegistry.algorithms, **either}

        _REGISTRY = IdTokenRegistry(algorithms=ID_TOKEN_ALGS)
    return _REGISTRY


class KeyForOtherAlg(Exception):
    """The key an ID token's kid names is labelled ("alg") for another algorithm than the token's."""


def _key_named(keys, headers: dict):
    """The provider key `headers` (a JWS header) names: its kid (or the only key, for a token without one), whose
    JWK "use" is absent or "sig" and whose "alg" is absent or the token's (either name of Ed25519 for the other).
    joserfc's own lookup compares "alg" strings, so an Ed25519 JWK refused an "EdDSA" token as if no key had its
    kid. InvalidKeyIdError when no key has the kid; KeyForOtherAlg when the one that has it is for another alg."""
    from joserfc.errors import InvalidKeyIdError

    kid, alg = headers.get("kid"), headers["alg"]
    named = list(keys) if kid is None and len(list(keys)) == 1 else [k for k in keys if k.kid == kid]
    if not named:
        raise InvalidKeyIdError(f"No key for kid: '{kid}'")
    names = ED25519_NAMES if alg in ED25519_NAMES else (alg,)
    for k in named:
        if k.get("use") in (None, "sig") and k.get("alg") in (None, *names):
            return k
    other = next((k.get("alg") for k in named if k.get("alg") not in (None, *names)), None)
    raise KeyForOtherAlg(
        f"the key its kid names is for {str(other)[:20]!r}, not {alg}" if other else "the key its kid names is not for signing"
    )


def stored_hash(value: str) -> str:
    """What the database keeps of a browser binding or a device code: its SHA-256 (hex), never the value."""
    return hashlib.sha256(value.encode()).hexdigest()


_OURS = re.compile(r"[A-Za-z0-9_-]{1,128}")


def could_be_ours(value: str) -> bool:
    """Whether `value` could be a state or device code this server made (`secrets.token_urlsafe`); anything
    else is unknown before it reaches a hash or a query (a lone surrogate failed the hash: a 500)."""
    return _OURS.fullmatch(value) is not None


def console_redirect(cfg: DirectorySettings) -> str:
    """The console's callback: `oidc_console_redirect_url`, else /admin/oidc/callback on the API callback's origin."""
    if cfg.oidc_console_redirect_url:
        return cfg.oidc_console_redirect_url
    u = httpx.URL(cfg.oidc_redirect_url or "")
    return str(u.copy_with(path="/admin/oidc/callback", query=None, fragment=None))


def s256(verifier: str) -> str:
    """The PKCE code challenge of `verifier` (RFC 7636 §4.2: BASE64URL(SHA256(verifier)), unpadded)."""
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode("ascii")).digest()).rstrip(b"=").decode("ascii")


def _tls_or_loopback(url: object) -> bool:
    from ..config import loopback_url

    return isinstance(url, str) and (url.lower().startswith("https://") or loopback_url(url))


class OidcClient:
    def __init__(self, cfg: DirectorySettings, engine: Engine):
        missing = [k for k in ("oidc_issuer", "oidc_client_id", "oidc_redirect_url") if not getattr(cfg, k)]
        if missing:
            raise DirectoryError(f"OpenID Connect sign-in needs directory.{', directory.'.join(missing)}")
        self.cfg = cfg
        self.engine = engine
        self.issuer = cfg.oidc_issuer.rstrip("/")
        self._meta: dict | None = None
        self._jwks = None
        self._lock = threading.Lock()

    def redirect_for(self, purpose: str) -> str:
        """The callback URL registered at the provider for this kind of sign-in."""
        if purpose == "console":
            return console_redirect(self.cfg)
        return self.cfg.oidc_redirect_url

    def _secret(self) -> str:
        f = self.cfg.oidc_client_secret_file
        return read_secret(f, "directory.oidc_client_secret_file") if f else ""

    def request(self, method: str, url: str, **kw) -> httpx.Response:
        """One request to the provider, its whole answer due within ANSWER_TIMEOUTS times directory.timeout_s:
        httpx's timeout bounds each read, so a provider (or proxy) dripping a byte every few seconds held the
        sign-in, and, in discovery, every other sign-in waiting on the lock."""
        limit = self.cfg.timeout_s * ANSWER_TIMEOUTS
        try:
            return within(limit, lambda: httpx.request(method, url, timeout=self.cfg.timeout_s, **kw), "")
        except DeadlinePassed:
            raise DirectoryUnavailable(
                f"OpenID provider {self.issuer} is unreachable: no complete answer in {limit:g} s"
            ) from None

    def _get(self, url: str) -> dict:
        try:
            r = self.request("GET", url)
            r.raise_for_status()
        except httpx.HTTPError as e:
            raise DirectoryUnavailable(f"OpenID provider {self.issuer} is unreachable: {type(e).__name__}") from None
        return self.answer(r, url)

    def answer(self, r: httpx.Response, what: str) -> dict:
        """The provider's answer as a JSON object, else one line: an HTML error page, a list, or JSON nested past
        the decoder's limit (what a proxy on the way, or a broken provider, sends) is no answer."""
        try:
            body = r.json()
        except (ValueError, RecursionError):
            body = None
        if not isinstance(body, dict):
            raise DirectoryUnavailable(
                f"OpenID provider {self.issuer} answered {what} (HTTP {r.status_code}) with no JSON object"
            )
        return body

    def error_of(self, r: httpx.Response) -> str:
        """The OAuth `error` of a refusal, else its HTTP status."""
        try:
            return str(self.answer(r, "").get("error", r.status_code))
        except DirectoryUnavailable:
            return str(r.status_code)

    def metadata(self) -> dict:
        """The provider's discovery document (cached); its `issuer` must be the one configured."""
        with self._lock:
            if self._meta is None:
                meta = self._get(self.issuer + "/.well-known/openid-configuration")
                iss = meta.get("issuer")
                if not isinstance(iss, str) or iss.rstrip("/") != self.issuer:
                    raise DirectoryError(f"OpenID provider at {self.issuer} names another issuer ({meta.get('issuer')!r})")
                # what this server fetches, and where it sends the browser (the user's password goes there)
                for k in ("jwks_uri", "token_endpoint", "device_authorization_endpoint", "authorization_endpoint"):
                    url = meta.get(k)
                    if url is not None and not _tls_or_loopback(url) and not self.cfg.insecure_transport:
                        raise DirectoryError(
                            f"OpenID provider {self.issuer} names its {k} {str(url)[:200]!r} without TLS off loopback: "
                            "anyone on that path could sign ID tokens or read tokens or passwords (directory.insecure_transport "
                            "allows it on a path you trust)"
                        )
                self._meta = meta
            return self._meta

    def _keys(self, refresh: bool = False):
        """The provider's signing keys (its JWKS, cached; `refresh`: fetched again)."""
        from joserfc.errors import JoseError
        from joserfc.jwk import KeySet

        if self._jwks is None or refresh:
            try:
                keys = KeySet.import_key_set(self._get(self.metadata()["jwks_uri"]))
            except (JoseError, KeyError, TypeError, ValueError, AttributeError):
                raise DirectoryUnavailable(
                    f"OpenID provider {self.issuer} publishes no signing key this server can use"
                ) from None
            with self._lock:
                self._jwks = keys
        return self._jwks

    # -- the flow ------------------------------------------------------------------------
    def start(self, purpose: str = "api", binding: str | None = None, client: str | None = None) -> str:
        """The provider's authorization URL for a new sign-in (state, nonce, verifier and the hash of
        the browser's `binding` cookie kept); RateLimited past `oidc_pending_per_address` unfinished
        sign-ins from `client`, Overloaded past `oidc_pending_max` in all."""
        if purpose not in PURPOSES:
            raise ValueError(purpose)
        meta = self.metadata()
        state, nonce, verifier = secrets.token_urlsafe(32), secrets.token_urlsafe(32), secrets.token_urlsafe(64)
        now = time.time()
        with self.engine.begin() as c:
            c.execute(pending.delete().where(pending.c.created_at < now - PENDING_TTL_S))  # indexed range
            client = (client or "unknown")[:64]
            mine = c.execute(sa.select(sa.func.count()).where(pending.c.client == client)).scalar_one()
            if mine >= self.cfg.oidc_pending_per_address:
                raise RateLimited(
                    f"too many unfinished sign-ins from {client} (directory.oidc_pending_per_address = "
                    f"{self.cfg.oidc_pending_per_address}): finish one, or start again in 10 minutes",
                    retry_after=60,
                )
            if c.execute(sa.select(sa.func.count()).select_from(pending)).scalar_one() >= self.cfg.oidc_pending_max:
                raise Overloaded(
                    f"too many unfinished sign-ins on this server (directory.oidc_pending_max = "
                    f"{self.cfg.oidc_pending_max}): start again in a few minutes"
                )
            c.execute(
                pending.insert().values(
                    state=state,
                    nonce=nonce,
                    verifier=verifier,
                    created_at=now,
                    purpose=purpose,
                    binding=stored_hash(binding) if binding else None,
                    client=client,
                )
            )
        q = {
            "response_type": "code",
            "client_id": self.cfg.oidc_client_id,
            "redirect_uri": self.redirect_for(purpose),
            "scope": "openid profile groups",
            "state": state,
            "nonce": nonce,
            "code_challenge": s256(verifier),
            "code_challenge_method": "S256",
        }
        return meta["authorization_endpoint"] + "?" + urlencode(q)

    def _consume(self, state: str, purpose: str, binding: str | None) -> tuple[str, str]:
        """The nonce and verifier kept for `state`, removed so that it can be used once only (a
        callback refused for its browser burns the state too: it was exposed)."""
        row = None
        with self.engine.begin() as c:
            if could_be_ours(state):
                row = c.execute(sa.select(pending).where(pending.c.state == state)).first()
            if row is not None:
                c.execute(pending.delete().where(pending.c.state == state))
        if row is None:
            raise Unauthorized("sign-in refused: unknown or already used state (start again)")
        if row.created_at < time.time() - PENDING_TTL_S:
            raise Unauthorized("sign-in refused: it took longer than 10 minutes (start again)")
        if (row.purpose or "api") != purpose:
            raise Unauthorized("sign-in refused: this sign-in was started for another page (start again)")
        if row.binding is not None and not (binding and hmac.compare_digest(stored_hash(binding), row.binding)):
            raise Unauthorized("sign-in refused: this browser did not start this sign-in (start again from this browser)")
        return row.nonce, row.verifier

    def finish(self, state: str, code: str, purpose: str = "api", binding: str | None = None) -> DirUser:
        """Trade `code` for tokens and return the user the checked ID token names."""
        if not state or not code:
            raise Unauthorized("sign-in refused: the provider's answer has no state or no code")
        nonce, verifier = self._consume(state, purpose, binding)
        meta = self.metadata()
        try:
            r = self.request(
                "POST",
                meta["token_endpoint"],
                auth=(self.cfg.oidc_client_id, self._secret()),
                data={
                    "grant_type": "authorization_code",
                    "code": code,
                    "redirect_uri": self.redirect_for(purpose),
                    "code_verifier": verifier,
                },
            )
        except httpx.HTTPError as e:
            raise DirectoryUnavailable(f"OpenID provider {self.issuer} is unreachable: {type(e).__name__}") from None
        if r.status_code != 200:
            raise Unauthorized(f"sign-in refused by the provider: {self.error_of(r)}")
        id_token = self.answer(r, "the token request").get("id_token")
        if not isinstance(id_token, str) or not id_token:
            raise Unauthorized("sign-in refused: the provider sent no ID token")
        return self.user_from(self.check_id_token(id_token, nonce))

    def token_request(self, data: dict) -> httpx.Response:
        """POST to the provider's token endpoint, authenticated as this client."""
        try:
            return self.request(
                "POST",
                self.metadata()["token_endpoint"],
                auth=(self.cfg.oidc_client_id, self._secret()),
                data=data,
            )
        except httpx.HTTPError as e:
            raise DirectoryUnavailable(f"OpenID provider {self.issuer} is unreachable: {type(e).__name__}") from None

    def check_id_token(self, id_token: str, nonce: str, nonce_required: bool = True) -> dict:
        """The ID token's claims, once its signature, issuer, audience, nonce and times hold
        (`nonce_required=False`: a token the provider answered this client directly, over the
        back channel, may lack the nonce (RFC 8628 has none); if present it must still match)."""
        from joserfc import jwt
        from joserfc.errors import ClaimError, InvalidKeyIdError, JoseError

        expected = jwt.JWTClaimsRegistry(
            leeway=self.cfg.oidc_leeway_s,  # exp, and nbf and iat when present (each a number, NaN refused)
            # exactly the discovery document's issuer (OpenID Connect Core §3.1.3.7), a trailing "/" included
            iss={"essential": True, "value": self.metadata()["issuer"]},
            aud={"essential": True, "value": self.cfg.oidc_client_id},  # the client id, or a list holding it
            exp={"essential": True},
            sub={"essential": True},
        )
        for refresh in (False, True):  # a key the provider rotated in: fetch the JWKS once more
            try:
                # never "none", never HS256 (a verifier taking the RSA public key as its secret), and the
                # key the token's kid names must be of the algorithm's type
                keys = self._keys(refresh)
                claims = jwt.decode(id_token, lambda obj: _key_named(keys, obj.headers()), registry=_id_token_registry()).claims
                expected.validate(claims)
                break
            except InvalidKeyIdError:
                if refresh:
                    raise Unauthorized("sign-in refused: the ID token does not hold (no provider key has its kid)") from None
            except KeyForOtherAlg as e:  # the provider may have relabelled the key: fetch the JWKS once more too
                if refresh:
                    raise Unauthorized(f"sign-in refused: the ID token does not hold ({e})") from None
            except ClaimError as e:
                raise Unauthorized(f"sign-in refused: the ID token does not hold ({e.error} {e.claim})") from None
            except (JoseError, ValueError, TypeError) as e:  # a string that is no JWS, or a payload no JSON object
                raise Unauthorized(f"sign-in refused: the ID token does not hold ({getattr(e, 'error', 'malformed')})") from None
        got = claims.get("nonce")
        if (nonce_required or got is not None) and (not got or got != nonce):
            raise Unauthorized("sign-in refused: the ID token does not hold (nonce)")
        aud = claims["aud"]
        if isinstance(aud, list) and len(aud) > 1 and claims.get("azp") != self.cfg.oidc_client_id:
            raise Unauthorized("sign-in refused: the ID token was issued to another party (azp)")
        return claims

    def user_from(self, claims: dict) -> DirUser:
        name = claims.get(self.cfg.oidc_user_claim) or claims.get("sub")
        if not valid_name(name):
            raise Unauthorized(f"sign-in refused: the ID token's {self.cfg.oidc_user_claim!r} is not a usable user name")
        groups = claims.get(self.cfg.oidc_groups_claim) or []
        if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
            raise Unauthorized(f"sign-in refused: the ID token's {self.cfg.oidc_groups_claim!r} claim is not a list of names")
        return DirUser(name, f"oidc:{self.issuer}#{claims['sub']}", frozenset(groups))
