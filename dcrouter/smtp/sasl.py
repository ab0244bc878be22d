"""The server side of the SASL PLAIN (RFC 4616), LOGIN, XOAUTH2 and OAUTHBEARER (RFC 7628) mechanisms as
used by SMTP AUTH (RFC 4954).

A :class:`SaslExchange` turns the client's base64 lines into either the next challenge to send (``334
<text>``) or, at the end, credentials to hand to the portal: a :class:`twisted.cred.credentials.
UsernamePassword` for PLAIN and LOGIN, an :class:`~dcrouter.auth.credentials.OAuthBearer` for the OAuth
mechanisms. It does no I/O and checks nothing; every malformed input raises :class:`SaslError` carrying the
reply to send, after which the exchange is over. When OAuth credentials are refused, :meth:`SaslExchange.
failed` gives the error challenge the client must answer before the final reply (RFC 7628 §3.2.3).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any

from twisted.cred.credentials import UsernamePassword

from dcrouter.auth.credentials import OAuthBearer
from dcrouter.mail.reply import Reply

#: ``authMethods`` "OAUTH2" offers both: XOAUTH2 (Google's, what most clients send) and OAUTHBEARER
#: (RFC 7628).
OAUTH_MECHANISMS = ("XOAUTH2", "OAUTHBEARER")
MECHANISMS = ("PLAIN", "LOGIN", *OAUTH_MECHANISMS)

#: Largest decoded client response accepted. RFC 4616 allows 255 octets per field; 12 KiB leaves room for
#: long tokens while keeping a hostile client from making the server buffer or decode megabytes.
MAX_DECODED_RESPONSE = 12 * 1024
MAX_ENCODED_RESPONSE = (MAX_DECODED_RESPONSE + 2) // 3 * 4

LOGIN_USERNAME_PROMPT = base64.b64encode(b"Username:").decode("ascii")
LOGIN_PASSWORD_PROMPT = base64.b64encode(b"Password:").decode("ascii")

CANCELLED = Reply(501, "5.7.0", "Authentication cancelled")
UNDECODABLE = Reply(501, "5.5.2", "Cannot decode Base64 response")
MALFORMED = Reply(501, "5.5.2", "Malformed authentication data")
TOO_LONG = Reply(500, "5.5.6", "Authentication exchange line is too long")
AUTHZID_REFUSED = Reply(535, "5.7.8", "Authentication credentials invalid")
OUT_OF_SEQUENCE = Reply(503, "5.5.1", "Authentication exchange already finished")

_FORBIDDEN_IN_NAMES = ("\x00", "\r", "\n")

#: RFC 6750 §2.1 b64token: what a bearer token may consist of.
_BEARER = re.compile(r"[Bb][Ee][Aa][Rr][Ee][Rr] ([A-Za-z0-9\-._~+/]+=*)\Z")

#: The error challenges of a failed token check (RFC 7628 §3.2.2; Google's form for XOAUTH2).
_OAUTH_ERRORS = {
    "XOAUTH2": {"status": "401", "schemes": "bearer"},
    "OAUTHBEARER": {"status": "invalid_token", "schemes": "bearer"},
}


class SaslError(Exception):
    """The exchange failed; ``reply`` is what to send the client. The exchange accepts no further input."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(f"{reply.code} {reply.enhanced} {reply.text}")
        self.reply = reply


@dataclass(frozen=True)
class Challenge:
    """A server challenge: send ``334 `` + ``text`` (already base64; may be empty), then read one line."""

    text: str


def _decode(line: str, *, initial: bool) -> bytes:
    if line == "*":
        raise SaslError(CANCELLED)
    if initial and line == "=":
        # RFC 4954 §4: "=" is a present but empty initial response.
        return b""
    if len(line) > MAX_ENCODED_RESPONSE:
        raise SaslError(TOO_LONG)
    try:
        data = base64.b64decode(line.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise SaslError(UNDECODABLE) from None
    if len(data) > MAX_DECODED_RESPONSE:
        raise SaslError(TOO_LONG)
    return data


def _text(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SaslError(MALFORMED) from None


def _name(data: bytes) -> str:
    name = _text(data)
    if not name or any(char in name for char in _FORBIDDEN_IN_NAMES):
        raise SaslError(MALFORMED)
    return name


def _credentials(username: str, password: bytes) -> UsernamePassword:
    # RFC 4616 requires UTF-8 passwords; rejecting others here keeps the checker's decoding unambiguous.
    _text(password)
    return UsernamePassword(username.encode("utf-8"), password)


def _bearer(value: str) -> str:
    match = _BEARER.match(value)
    if match is None:
        raise SaslError(MALFORMED)
    return match.group(1)


def _xoauth2(data: bytes) -> OAuthBearer:
    # "user=" user ^A "auth=Bearer " token ^A ^A
    text = _text(data)
    if not text.endswith("\x01\x01"):
        raise SaslError(MALFORMED)
    fields = text[:-2].split("\x01")
    pairs = dict(field.partition("=")[::2] for field in fields)
    if len(pairs) != len(fields) or "auth" not in pairs:
        raise SaslError(MALFORMED)
    user = pairs.get("user") or None
    if user is not None:
        user = _name(user.encode("utf-8"))
    return OAuthBearer(user, _bearer(pairs["auth"]))


def _saslname(value: str) -> str:
    # RFC 5801 §4: "," and "=" are written =2C and =3D; any other "=" is an error.
    if re.search(r"=(?!2C|3D)", value):
        raise SaslError(MALFORMED)
    return value.replace("=2C", ",").replace("=3D", "=")


def _oauthbearer(data: bytes) -> OAuthBearer:
    # gs2-header ^A *(key "=" value ^A) ^A  (RFC 7628 §3.1)
    text = _text(data)
    header, sep, rest = text.partition("\x01")
    if not sep or (not rest.endswith("\x01\x01") and rest != "\x01"):
        raise SaslError(MALFORMED)
    parts = header.split(",")
    if len(parts) != 3 or parts[0] not in ("n", "y") or parts[2] != "":
        raise SaslError(MALFORMED)  # "p=...": channel binding, which OAUTHBEARER does not define
    user = None
    if parts[1]:
        if not parts[1].startswith("a="):
            raise SaslError(MALFORMED)
        user = _name(_saslname(parts[1][2:]).encode("utf-8"))
    pairs: dict[str, str] = {}
    for field in rest[:-2].split("\x01") if rest != "\x01" else []:
        key, eq, value = field.partition("=")
        if not eq or not key.isalpha():
            raise SaslError(MALFORMED)
        pairs[key] = value
    if "auth" not in pairs:
        raise SaslError(MALFORMED)
    return OAuthBearer(user, _bearer(pairs["auth"]))


class SaslExchange:
    """One PLAIN, LOGIN, XOAUTH2 or OAUTHBEARER exchange.

    The caller's first call is ``respond(initial_response)`` — the initial response given on the AUTH command
    (``"="`` meaning present but empty), or ``None`` when there was none. ``begin()`` does exactly that with
    the ``initial_response`` given here. Each later call passes the client's next line (CRLF removed). A call
    returns a :class:`Challenge` to send, or the final credentials; it raises :class:`SaslError` on ``*``
    (cancel), undecodable or over-long input, malformed PLAIN messages, names that are empty, not UTF-8 or
    contain NUL, CR or LF, and a PLAIN authorization identity other than empty or the authentication identity.
    """

    def __init__(self, mechanism: str, initial_response: str | None = None) -> None:
        mechanism = mechanism.upper()
        if mechanism not in MECHANISMS:
            raise ValueError(f"unsupported SASL mechanism {mechanism!r}")
        self.mechanism = mechanism
        self.initial_response = initial_response
        self._started = False
        self._finished = False
        self._username: str | None = None
        self._failure: Reply | None = None

    def begin(self) -> Challenge | UsernamePassword | OAuthBearer:
        """Equivalent to ``respond(self.initial_response)`` as the first call."""
        return self.respond(self.initial_response)

    def respond(self, line: str | None) -> Challenge | UsernamePassword | OAuthBearer:
        """Advance the exchange with the client's line; see the class docstring for what may be relied on."""
        if self._failure is not None:
            # The client's answer to the error challenge (an empty line, or ^A for OAUTHBEARER): whatever it
            # says, the exchange fails with the reply held back (RFC 7628 §3.2.3).
            failure, self._failure = self._failure, None
            self._finished = True
            raise SaslError(failure)
        if self._finished:
            raise SaslError(OUT_OF_SEQUENCE)
        initial = not self._started
        self._started = True
        try:
            if line is None:
                if not initial:
                    raise SaslError(MALFORMED)
                return self._prompt()
            data = _decode(line, initial=initial)
            if self.mechanism == "PLAIN":
                return self._finish(self._plain(data))
            if self.mechanism == "XOAUTH2":
                return self._finish(_xoauth2(data))
            if self.mechanism == "OAUTHBEARER":
                return self._finish(_oauthbearer(data))
            return self._login(data)
        except SaslError:
            self._finished = True
            raise

    def failed(self, reply: Reply) -> Challenge | None:
        """The credentials this exchange gave were refused with ``reply``. For the OAuth mechanisms, the
        error challenge to send (``334`` + base64 JSON): the client answers it, and that answer makes
        :meth:`respond` raise ``SaslError(reply)``. None for the others: send ``reply`` at once."""
        error = _OAUTH_ERRORS.get(self.mechanism)
        if error is None:
            return None
        self._failure = reply
        self._finished = False
        text = json.dumps(error, separators=(",", ":")).encode("ascii")
        return Challenge(base64.b64encode(text).decode("ascii"))

    def _prompt(self) -> Challenge:
        if self.mechanism in ("PLAIN", *OAUTH_MECHANISMS):
            return Challenge("")
        return Challenge(LOGIN_USERNAME_PROMPT)

    def _finish(self, credentials: Any) -> Any:
        self._finished = True
        return credentials

    def _plain(self, data: bytes) -> UsernamePassword:
        parts = data.split(b"\x00")
        if len(parts) != 3:
            raise SaslError(MALFORMED)
        authzid, authcid, password = parts
        username = _name(authcid)
        # Acting as another user is not offered: an authorization identity must be empty or the same name.
        if authzid and _text(authzid) != username:
            raise SaslError(AUTHZID_REFUSED)
        return _credentials(username, password)

    def _login(self, data: bytes) -> Challenge | UsernamePassword:
        if self._username is None:
            self._username = _name(data)
            return Challenge(LOGIN_PASSWORD_PROMPT)
        return self._finish(_credentials(self._username, data))
