"""The schema of SMTP AUTH: ``smtpConfig.auth``, its accounts and its providers (LDAP, OAUTH2 tokens, and
third-party providers named like plugin scanners, docs/auth.md)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from dcrouter.config import plugins, values
from dcrouter.config.schema import Report, block_check, checked, join, option
from dcrouter.net.ldapurl import LdapUrlError, parse_ldap_url
from dcrouter.passwords import is_password_hash, looks_like_password_hash

#: What a user filter and a user DN template put the (escaped) user name in place of.
USER_PLACEHOLDER = "{user}"


@block_check("password")
def user_password(user: UserConfig, path: str, report: Report) -> None:
    password = join(path, "password")
    if is_password_hash(user.password):
        return
    if looks_like_password_hash(user.password):
        report.error(password, "malformed scrypt hash; make a new one with 'dcrouter hash-password'")
    else:
        report.warning(password, "stored in plain text; use a hash from 'dcrouter hash-password'")


@block_check("users")
def auth_unique_users(auth: AuthConfig, path: str, report: Report) -> None:
    first: dict[str, int] = {}
    for i, user in enumerate(auth.users):
        if user.username in first:
            report.error(
                f"{join(path, 'users')}[{i}].username",
                f"{user.username!r} is also {join(path, 'users')}[{first[user.username]}]",
            )
        first.setdefault(user.username, i)


@checked(user_password)
@dataclass(frozen=True)
class UserConfig:
    username: str = option(
        doc="Login name for SMTP AUTH.", check=values.all_of(values.not_empty, values.one_line)
    )
    password: str = option(
        doc="A hash made by `dcrouter hash-password` (`scrypt$...`), or plain text (logs a warning).",
        check=values.not_empty,
    )


def _ldap_url_value(value: str) -> str | None:
    try:
        parse_ldap_url(value)
    except LdapUrlError as e:
        return str(e)
    return None


def _with_placeholder(value: str) -> str | None:
    if USER_PLACEHOLDER not in value:
        return f"must contain {USER_PLACEHOLDER} (where the user name goes)"
    return None


def _ldap_filter(value: str) -> str | None:
    if not (value.startswith("(") and value.endswith(")")):
        return f"an LDAP filter in parentheses, like (uid={USER_PLACEHOLDER}): {value!r}"
    return _with_placeholder(value)


@block_check("ldap_url", "ldap")
def auth_ldap(auth: AuthConfig, path: str, report: Report) -> None:
    if auth.ldap_url is None:
        if auth.ldap != LdapConfig():
            report.error(join(path, "ldap"), f"set, but {join(path, 'ldapUrl')} is not")
        return
    url = parse_ldap_url(auth.ldap_url)
    ldap = auth.ldap
    if not url.tls and not url.loopback and not ldap.start_tls:
        report.error(
            join(path, "ldapUrl"),
            "passwords would cross the network in clear: use ldaps:// or set "
            f"{join(path, 'ldap.startTls')} = true (plain ldap:// is taken only on loopback)",
        )
    if url.tls and ldap.start_tls:
        report.error(
            join(path, "ldap.startTls"), "the URL is ldaps:// (TLS already); StartTLS is for ldap://"
        )
    if (ldap.bind_dn is None) != (ldap.bind_password is None):
        missing = "bindPassword" if ldap.bind_password is None else "bindDn"
        report.error(join(path, f"ldap.{missing}"), "bindDn and bindPassword go together")
    if ldap.user_dn is not None and ldap.user_filter != LdapConfig().user_filter:
        report.error(
            join(path, "ldap.userFilter"),
            "not used with ldap.userDn (direct bind); give one of userFilter and userDn",
        )


@block_check("methods", "oauth2")
def auth_oauth2(auth: AuthConfig, path: str, report: Report) -> None:
    if "OAUTH2" in auth.methods and auth.oauth2 is None and not auth.providers:
        report.error(
            join(path, "methods"),
            f"OAUTH2 is offered, but {join(path, 'oauth2')} says nothing of how tokens are verified",
        )
    if auth.oauth2 is not None and "OAUTH2" not in auth.methods:
        report.warning(join(path, "oauth2"), f"not used: {join(path, 'methods')} does not list OAUTH2")


@block_check("providers")
def auth_providers(auth: AuthConfig, path: str, report: Report) -> None:
    for i, entry in enumerate(auth.providers):
        plugins.check_config("auth", entry, f"{join(path, 'providers')}[{i}]", report)


def _jwks_file(value: str) -> str | None:
    try:
        with open(value, "rb") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        return f"cannot read a JSON key set from {value!r}: {e}"
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list) or not data["keys"]:
        return f'{value!r} is not a JWKS (a JSON object with a non-empty "keys" list)'
    return None


@dataclass(frozen=True)
class LdapConfig:
    bind_dn: str | None = option(
        None,
        doc="DN of the service account that searches for users (with bindPassword); without it the search "
        "binds anonymously. Not used with userDn.",
        check=values.one_line,
    )
    bind_password: str | None = option(None, doc="Password of bindDn.", check=values.not_empty)
    user_filter: str = option(
        "(uid={user})",
        doc="Search then bind: the filter that finds the user's entry under the URL's base DN, {user} "
        "being the user name escaped per RFC 4515 (exactly one entry must match).",
        check=_ldap_filter,
    )
    user_dn: str | None = option(
        None,
        doc="Direct bind instead of a search: the user's DN, {user} being the user name escaped per RFC "
        "4514, e.g. `uid={user},ou=people,dc=example,dc=org`.",
        check=values.all_of(values.one_line, _with_placeholder),
    )
    start_tls: bool = option(
        False,
        doc="StartTLS on an ldap:// URL (required unless the directory is on loopback).",
    )
    ca_file: str | None = option(
        None,
        doc="PEM file of the CAs that vouch for the directory's certificate (default: the system's).",
        check=values.ca_certificates_file,
    )
    timeout: int = option(
        10_000,
        doc="Milliseconds a connection or one LDAP operation may take; past it the client gets 454 4.7.0.",
        check=values.duration,
    )


def _http_url(value: str) -> str | None:
    if not value.startswith(("https://", "http://")):
        return f"expected an http:// or https:// URL, got {value!r}"
    return values.one_line(value)


@block_check("introspection_url", "client_id", "client_secret", "jwks_url", "jwks_file", "issuer", "audience")
def oauth2_verification(oauth: OAuth2Config, path: str, report: Report) -> None:
    ways = [k for k, v in (("introspectionUrl", oauth.introspection_url), ("jwksUrl", oauth.jwks_url),
                           ("jwksFile", oauth.jwks_file)) if v is not None]  # fmt: skip
    if len(ways) != 1:
        given = ", ".join(join(path, k) for k in ways) or "none"
        report.error(path, f"give exactly one of introspectionUrl, jwksUrl and jwksFile (given: {given})")
        return
    if oauth.introspection_url is not None:
        for key, value in (("clientId", oauth.client_id), ("clientSecret", oauth.client_secret)):
            if value is None:
                report.error(join(path, key), "required with introspectionUrl")
        return
    for key, value in (("issuer", oauth.issuer), ("audience", oauth.audience)):
        if value is None:
            report.error(
                join(path, key), "required to verify tokens locally (a JWT for anyone else is no proof)"
            )


@checked(oauth2_verification)
@dataclass(frozen=True)
class OAuth2Config:
    introspection_url: str | None = option(
        None, doc="RFC 7662 token introspection endpoint (with clientId and clientSecret).", check=_http_url
    )
    client_id: str | None = option(None, doc="dcrouter's client id at the introspection endpoint.")
    client_secret: str | None = option(None, doc="dcrouter's client secret at the introspection endpoint.")
    jwks_url: str | None = option(
        None, doc="Verify tokens locally as JWTs against the keys (JWKS) at this URL.", check=_http_url
    )
    jwks_file: str | None = option(
        None,
        doc="Verify tokens locally as JWTs against the keys (JWKS) in this file.",
        check=_jwks_file,
    )
    issuer: str | None = option(None, doc="The `iss` a token must carry (required with JWKS).")
    audience: str | None = option(None, doc="A value the token's `aud` must contain (required with JWKS).")
    user_claim: str = option(
        "sub",
        doc="The claim that holds the user name (e.g. `email` or `preferred_username`).",
        check=values.not_empty,
    )
    max_clock_skew: int = option(
        60_000,
        doc="Milliseconds of clock difference tolerated on `exp`, `nbf` and `iat`.",
        check=values.non_negative,
    )
    timeout: int = option(
        10_000,
        doc="Milliseconds a request to the introspection or JWKS endpoint may take; past it the client "
        "gets 454 4.7.0.",
        check=values.duration,
    )
    cache_size: int = option(
        10_000, doc="Introspection results kept (each until its token expires).", check=values.positive
    )


@dataclass(frozen=True)
class ProviderConfig:
    type: str = option(
        doc="A third-party provider: an entry point name in group `dcrouter.auth`, or `package.module:Class` "
        "(a twisted.cred checker, docs/plugins.md).",
        check=values.not_empty,
    )
    options: dict[str, Any] = option(factory=dict, doc="The provider's own options, checked by its schema.")


@checked(auth_unique_users, auth_ldap, auth_oauth2, auth_providers)
@dataclass(frozen=True)
class AuthConfig:
    required: bool = option(
        False, doc="Require AUTH before MAIL on every port (it always is on submissionPorts)."
    )
    methods: list[Literal["PLAIN", "LOGIN", "OAUTH2"]] = option(
        factory=lambda: ["PLAIN", "LOGIN"],
        doc="SASL mechanisms offered (after TLS only); OAUTH2 offers XOAUTH2 and OAUTHBEARER (RFC 7628), "
        "verified as auth.oauth2 says.",
        check=values.unique,
    )
    users: list[UserConfig] = option(factory=list, doc="Accounts allowed to authenticate.")
    ldap_url: str | None = option(
        None,
        doc="Check PLAIN/LOGIN passwords against an LDAP directory: `ldap://host[:port]/base-dn` or "
        "`ldaps://...` (after the users table, which is asked first); see auth.ldap.",
        check=_ldap_url_value,
    )
    ldap: LdapConfig = option(
        factory=LdapConfig, addition=True, doc="How the directory at ldapUrl is asked (docs/auth.md)."
    )
    oauth2: OAuth2Config | None = option(
        None, addition=True, doc="How OAUTH2 bearer tokens are verified (docs/auth.md)."
    )
    providers: list[ProviderConfig] = option(
        factory=list,
        addition=True,
        doc="Third-party authentication providers, asked after the built-in ones (docs/plugins.md).",
    )
    allow_insecure: bool = option(
        False, addition=True, doc="Offer and accept AUTH on connections without TLS (for tests only)."
    )
    max_failures: int = option(
        10,
        addition=True,
        doc="Failed AUTH attempts per client IP or per user name, within failureWindow, "
        "after which further attempts are refused with 454 4.7.0 until the window passes.",
        check=values.positive,
    )
    failure_window: int = option(
        900_000,
        addition=True,
        doc="Milliseconds over which AUTH failures are counted.",
        check=values.duration,
    )
    failure_delay: int = option(
        1_000,
        addition=True,
        doc="Milliseconds added to the reply per recent failure (slows down guessing); 0 adds none.",
        check=values.non_negative,
    )
