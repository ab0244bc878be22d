"""The schema of the management API: ``apiConfig`` (a dcrouter addition; see docs/api.md)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from dcrouter.config import values
from dcrouter.config.schema import Report, block_check, checked, join, option
from dcrouter.passwords import is_password_hash, looks_like_password_hash

#: ``sha256$`` and 64 hex digits: the SHA-256 of a token, for tokens that are long random strings (what
#: ``dcrouter api-token`` makes), where a slow hash adds nothing.
SHA256_TOKEN_HASH = re.compile(r"sha256\$[0-9a-f]{64}\Z")

#: The Host names the API answers by default: loopback only, so a web page whose name an attacker re-points
#: at 127.0.0.1 (DNS rebinding) is refused.
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def is_token_hash(value: str) -> bool:
    """True for a well-formed ``scrypt$...`` or ``sha256$<hex>`` token hash."""
    return bool(SHA256_TOKEN_HASH.match(value)) or is_password_hash(value)


def _token_hash(value: str) -> str | None:
    if is_token_hash(value):
        return None
    if looks_like_password_hash(value):
        return "malformed scrypt hash; make a new one with 'dcrouter api-token NAME'"
    return (
        "not a token hash: 'scrypt$...' or 'sha256$<64 hex digits>' (make one with 'dcrouter api-token NAME')"
    )


def _api_port(value: int) -> str | None:
    # 0 binds an ephemeral port (tests, embedding programs that read the bound port back).
    if not 0 <= value <= 65535:
        return f"not a port number (0-65535): {value}"
    return None


def _host_entry(value: str) -> str | None:
    if value == "*":
        return None
    name = value[1:-1] if value.startswith("[") and value.endswith("]") else value
    if values.host_or_ip(name) is None:
        return None
    return f"not a host name or IP address: {value!r}"


def _socket_path(value: str | None) -> str | None:
    if value is None:
        return None
    return values.all_of(values.not_empty, values.one_line)(value)


def _origin(value: str) -> str | None:
    if value == "*" or re.match(r"https?://[^/\s]+\Z", value):
        return None
    return f"not an origin (scheme://host[:port], or '*'): {value!r}"


@block_check("tokens")
def unique_token_names(api: ApiConfig, path: str, report: Report) -> None:
    first: dict[str, int] = {}
    for i, token in enumerate(api.tokens):
        if token.name in first:
            report.error(
                f"{join(path, 'tokens')}[{i}].name",
                f"{token.name!r} is also {join(path, 'tokens')}[{first[token.name]}]",
            )
        first.setdefault(token.name, i)


@block_check("enabled", "tokens")
def enabled_without_tokens(api: ApiConfig, path: str, report: Report) -> None:
    if api.enabled and not api.tokens:
        report.warning(
            join(path, "tokens"),
            "empty: only /health answers; every other endpoint needs a token (make one with "
            "'dcrouter api-token NAME')",
        )


@dataclass(frozen=True)
class ApiToken:
    name: str = option(
        doc="Who holds the token (logged with each write it makes).",
        check=values.all_of(values.not_empty, values.one_line),
    )
    token_hash: str = option(
        doc="The token's hash, as printed by `dcrouter api-token NAME`: `scrypt$...` (also what "
        "`dcrouter hash-password` makes) or `sha256$<64 hex digits>` (SHA-256 of the token).",
        check=_token_hash,
    )
    scope: Literal["read", "admin"] = option(
        "read", doc="`read`: GET endpoints only; `admin`: every endpoint, writes included."
    )


@checked(unique_token_names, enabled_without_tokens)
@dataclass(frozen=True)
class ApiConfig:
    enabled: bool = option(False, doc="Serve the management API (docs/api.md).")
    bind_address: str = option("127.0.0.1", doc="Address the API listens on (TCP).", check=values.ip_address)
    port: int = option(8025, doc="TCP port of the API (0: any free port).", check=_api_port)
    socket: str | None = option(
        None,
        doc="Also listen on this Unix socket path (mode 0600); the same tokens apply.",
        check=_socket_path,
    )
    tokens: list[ApiToken] = option(factory=list, doc="Bearer tokens allowed to call the API.")
    allowed_hosts: list[str] = option(
        factory=lambda: list(LOOPBACK_HOSTS),
        doc="Host header names (without port) the API answers; others get 421 (DNS rebinding). `*` allows "
        "any.",
        each=_host_entry,
    )
    persist: bool = option(
        False,
        doc="Write changes made through the API (`PUT /api/v1/routing`) back to the configuration file "
        "(atomically, the previous file kept as `<file>.bak`; a TOML file keeps its comments). Off: they "
        "last until the process restarts.",
    )
    cors: list[str] = option(
        factory=list,
        doc="Origins allowed by CORS (`https://ops.example.com`, or `*`); empty: no CORS headers at all.",
        each=_origin,
    )
