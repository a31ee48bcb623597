"""The `[directory]` section: the company's LDAP directory and OpenID provider (`codemoat.directory`), and the
rule that neither is reached without TLS off loopback."""

from __future__ import annotations

from pydantic import Field, model_validator

from .serving import Section


class DirectorySettings(Section):
    """The company directory as the source of truth for users and groups (`codemoat.directory`)."""

    ldap_url: str | None = Field(
        None, description="LDAP server, ldap://host:389 or ldaps://host:636 (unset: no directory; users are made by hand)."
    )
    start_tls: bool = Field(False, description="Upgrade an ldap:// connection with StartTLS before binding.")
    ca_file: str | None = Field(
        None, description="CA certificate file that the server's TLS certificate must chain to (LDAPS and StartTLS)."
    )
    bind_dn: str | None = Field(None, description="The service account that searches the directory.")
    bind_password_file: str | None = Field(
        None, description="File holding the service account's password (a mounted secret; never in the config)."
    )
    user_base: str = Field("", description="Base DN under which users are searched.")
    user_filter: str = Field(
        "(&(objectClass=inetOrgPerson)(uid={username}))",
        description="Filter finding one user; {username} is escaped per RFC 4515 before it is put in.",
    )
    user_attr: str = Field("uid", description="Attribute holding the user name codemoat uses.")
    users_filter: str = Field("(objectClass=inetOrgPerson)", description="Filter listing every user for `directory sync`.")
    disabled_filter: str | None = Field(
        "(pwdAccountLockedTime=*)",
        description="Users matching this filter are disabled (lose tokens and groups at the next sync); unset: none.",
    )
    group_base: str = Field("", description="Base DN under which groups are searched.")
    group_filter: str = Field("(objectClass=groupOfNames)", description="Filter selecting group entries.")
    group_member_attr: str = Field(
        "member", description="Group attribute listing member DNs (users or, for nested groups, other groups)."
    )
    group_name_attr: str = Field("cn", description="Attribute holding a group's name.")
    group_map: dict[str, str] = Field(
        default_factory=dict,
        description="Directory group name -> codemoat group; only mapped groups grant access (an empty map mirrors every group under its own name, except `admin` and `everyone`).",
    )
    admin_groups: list[str] = Field(
        default_factory=list,
        description="codemoat groups whose members' self-service tokens get the admin scope. Set directory.group_map too: without it these are the identity provider's own group names, and where users may create groups there (Google Groups, GitLab, Entra self-service) anyone can make one (serve warns at start).",
    )
    token_ttl_days: int = Field(30, ge=1, le=3650, description="Lifetime of a token made by `codemoat login`.")
    sync_interval_s: int = Field(
        300, ge=0, description="How often `serve` mirrors the directory (0: never; run `codemoat directory sync`)."
    )
    max_staleness_s: int = Field(
        86400,
        ge=0,
        description="While the directory is unreachable, directory users keep their last-known groups this long; after it, their requests are refused.",
    )
    timeout_s: float = Field(5, gt=0, description="Connect and operation timeout for the directory, in seconds.")
    ldap_pool_size: int = Field(
        4,
        ge=1,
        le=64,
        description="LDAP connections kept open per pool (searches as the service account; password checks), each used by one sign-in at a time.",
    )
    oidc_issuer: str | None = Field(
        None,
        description="OpenID Connect issuer URL for browser sign-in (its /.well-known/openid-configuration is read); unset: no OIDC.",
    )
    oidc_client_id: str | None = Field(None, description="This server's client id at the OpenID provider.")
    oidc_client_secret_file: str | None = Field(
        None, description="File holding the OIDC client secret (a mounted secret; never in the config)."
    )
    oidc_redirect_url: str | None = Field(
        None, description="This server's public callback URL, registered at the provider: https://HOST/auth/oidc/callback."
    )
    oidc_user_claim: str = Field("preferred_username", description="ID-token claim that names the codemoat user.")
    oidc_shares_ldap_names: bool = Field(
        False,
        description="With LDAP and OIDC both set: the OpenID provider names the same people as the LDAP directory (Keycloak or Entra ID over this LDAP), so an OIDC sign-in may take a name the LDAP directory holds. Off: it is refused.",
    )
    oidc_groups_claim: str = Field(
        "groups", description="ID-token claim listing the user's directory groups (mapped through group_map)."
    )
    oidc_leeway_s: int = Field(60, ge=0, le=600, description="Clock skew allowed when checking an ID token's exp/iat/nbf.")
    oidc_console_redirect_url: str | None = Field(
        None,
        description="The admin console's OIDC callback, registered at the provider too (unset: /admin/oidc/callback on oidc_redirect_url's host).",
    )
    oidc_display_name: str = Field(
        "your company account", description="How the console's sign-in button names the OpenID provider (Sign in with ...)."
    )
    oidc_pending_per_address: int = Field(
        50,
        ge=1,
        le=100_000,
        description="Unfinished browser sign-ins (GET /auth/oidc/start, /admin/oidc/start) one client address may hold for their 10 minutes; past it: 429.",
    )
    oidc_pending_max: int = Field(
        10_000,
        ge=1,
        le=1_000_000,
        description="Unfinished browser sign-ins kept in all; past it new ones get 503 (those under way still finish).",
    )
    device_code_ttl_s: int = Field(
        300,
        ge=10,
        le=1800,
        description="Life of a `codemoat login` device code (RFC 8628), at most the provider's own: short, so a phished code soon dies.",
    )
    insecure_transport: bool = Field(
        False,
        description="Allow an http:// OIDC issuer, or an ldap:// URL without StartTLS, on a host other than loopback: whoever is on that path can then sign in as anyone (their own ID-token keys; any bind answered yes). Off: such a setting is refused at start.",
    )

    @model_validator(mode="after")
    def _codemoat_group_names(self) -> DirectorySettings:
        """The codemoat groups named here follow the one rule for names (`codemoat.names`): sync made a group
        `eng corp` from a group_map that `index add --groups` refuses, so no repository could ever be given it, and
        an admin group no mirrored name can match gave nobody the admin scope, silently."""
        from ..names import RULE, valid_name

        named = [("group_map", v) for v in self.group_map.values()] + [("admin_groups", g) for g in self.admin_groups]
        for where, g in named:
            if not valid_name(g):
                raise ValueError(f"directory.{where} names the codemoat group {g!r}, which is not a group name: {RULE}")
        return self

    @model_validator(mode="after")
    def _tls_off_loopback(self) -> DirectorySettings:
        plain = []
        if self.oidc_issuer and self.oidc_issuer.lower().startswith("http://"):
            plain.append(("oidc_issuer", self.oidc_issuer, "use https://"))
        if self.ldap_url and self.ldap_url.lower().startswith("ldap://") and not self.start_tls:
            plain.append(("ldap_url", self.ldap_url, "use ldaps:// or start_tls = true"))
        for name, url, fix in plain:
            if not self.insecure_transport and not loopback_url(url):
                raise ValueError(
                    f"directory.{name} {url!r} is reached without TLS, so anyone on the path can sign in as any user: "
                    f"{fix} (or set directory.insecure_transport = true on a path you trust)"
                )
        return self


def loopback_url(url: str) -> bool:
    """The URL's host is localhost or a loopback address."""
    import ipaddress
    from urllib.parse import urlsplit

    try:
        host = urlsplit(url).hostname or ""
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
