"""The schema of SMTP AUTH: ``smtpConfig.auth`` and its accounts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dcrouter.config import values
from dcrouter.config.schema import Report, block_check, checked, join, option
from dcrouter.passwords import is_password_hash, looks_like_password_hash


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


@checked(auth_unique_users)
@dataclass(frozen=True)
class AuthConfig:
    required: bool = option(
        False, doc="Require AUTH before MAIL on every port (it always is on submissionPorts)."
    )
    methods: list[Literal["PLAIN", "LOGIN", "OAUTH2"]] = option(
        factory=lambda: ["PLAIN", "LOGIN"],
        doc="SASL mechanisms offered (after TLS only).",
        unsupported_values={"OAUTH2": "OAUTH2 is not built yet."},
        check=values.unique,
    )
    users: list[UserConfig] = option(factory=list, doc="Accounts allowed to authenticate.")
    ldap_url: str | None = option(None, unsupported="LDAP authentication is not built yet.")
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
