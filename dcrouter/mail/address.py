"""Mailbox addresses and the arguments of MAIL FROM and RCPT TO, parsed strictly by RFC 5321 §4.1.2.

Syntax (RFC 5321 §4.1.2, RFC 6531 for SMTPUTF8)::

    Path = "<" [ A-d-l ":" ] Mailbox ">"        Mailbox = Local-part "@" ( Domain / address-literal )
    Local-part = Dot-string / Quoted-string     Mail-parameters = esmtp-param *(SP esmtp-param)

Decisions a caller may rely on:

- **Source routes** (``<@a,@b:u@c>``): in a forward path (RCPT) they are declined with ``553 5.7.1``, as
  RFC 5321 §3.6.1 allows; a relay that honoured them would be open. In a reverse path (MAIL) the route is
  syntax-checked and dropped, keeping the mailbox, as RFC 5321 Appendix C recommends: a sender is never
  routed by us.
- **Quoted local parts** are kept minimally quoted: ``"abc"@x`` becomes ``abc@x``; ``"a b"@x`` stays quoted.
  The local part's case is preserved (it belongs to the receiving system); the domain is normalised.
- **Address literals** ``[192.0.2.1]`` and ``[IPv6:2001:db8::1]`` are accepted and kept in canonical form;
  general literals (``[tag:...]``) are declined with ``553``.
- **Non-ASCII** (RFC 6531) is accepted only in SMTPUTF8 transactions, else ``553 5.6.7``.
- Syntax errors are ``501 5.1.7`` (sender) or ``501 5.1.3`` (recipient); a malformed verb keyword or parameter
  list is ``501 5.5.4``. Parameters are syntax-checked only; their meaning is the protocol's business.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from dcrouter.mail.reply import Reply
from dcrouter.net.domains import normalize_domain

MAX_LOCAL_PART = 64  # octets, RFC 5321 §4.5.3.1.1
MAX_DOMAIN = 255  # octets, RFC 5321 §4.5.3.1.2
MAX_PATH = 256  # octets including the angle brackets, RFC 5321 §4.5.3.1.3

_ATEXT = r"A-Za-z0-9!#$%&'*+\-/=?^_`{|}~"
_NON_ASCII = "\u0080-\ud7ff\ue000-\U0010ffff"  # any character but ASCII and surrogates
_DOT_STRING = {
    False: re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*\Z"),
    True: re.compile(rf"[{_ATEXT}{_NON_ASCII}]+(?:\.[{_ATEXT}{_NON_ASCII}]+)*\Z"),
}
_QUOTED_STRING = {
    False: re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"'),
    True: re.compile(rf'"(?:[\x20\x21\x23-\x5b\x5d-\x7e{_NON_ASCII}]|\\[\x20-\x7e])*"'),
}
_QUOTED_PAIR = re.compile(r"\\(.)")
_NEEDS_ESCAPE = re.compile(r'(["\\])')
_ESMTP_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")
_ESMTP_VALUE = {
    False: re.compile(r"[\x21-\x3c\x3e-\x7e]+\Z"),
    True: re.compile(rf"[\x21-\x3c\x3e-\x7e{_NON_ASCII}]+\Z"),
}
# Characters with which a local part names a further hop that some downstream MTA may honour.
_ROUTING_CHARS = frozenset("%!@:")


@dataclass(frozen=True, slots=True)
class Address:
    """A mailbox as used in the SMTP envelope.

    ``local`` is the local part in wire form (minimally quoted, case preserved); ``domain`` is the normalised
    domain (lower-case A-labels) or a canonical address literal. The null reverse path has both empty;
    ``<postmaster>`` (RCPT only) is ``Address("postmaster", "")``.
    """

    local: str
    domain: str

    def __post_init__(self) -> None:
        if self.domain and not self.domain.startswith("["):
            object.__setattr__(self, "domain", self.domain.lower())

    @classmethod
    def null(cls) -> Address:
        """The null reverse path ``<>`` (bounces)."""
        return cls("", "")

    @property
    def is_null(self) -> bool:
        return not self.local and not self.domain

    @property
    def is_literal(self) -> bool:
        """True when the domain is an address literal such as ``[192.0.2.1]``."""
        return self.domain.startswith("[")

    @property
    def relay_trick(self) -> bool:
        """True when the local part carries routing that a downstream server might honour: the percent hack
        (``u%evil.com``), a bang path (``evil.com!u``), or a quoted local part holding ``@`` or ``:``
        (``"u@evil.com"``). Such an address must not be accepted as local without trust."""
        return not _ROUTING_CHARS.isdisjoint(self.local)

    def __str__(self) -> str:
        """``local@domain``; ``""`` for the null path; ``postmaster`` for the bare postmaster."""
        if not self.domain:
            return self.local
        return f"{self.local}@{self.domain}"


class AddressError(Exception):
    """A MAIL or RCPT argument that cannot be accepted; ``reply`` is what to answer the client."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.text)
        self.reply = reply


@dataclass(frozen=True)
class _Kind:
    verb: str
    keyword: str
    status: str  # RFC 3463 code for bad address syntax
    what: str

    def syntax(self, text: str) -> AddressError:
        return AddressError(Reply(501, self.status, f"Bad {self.what} address syntax: {text}"))


_SENDER = _Kind("MAIL", "FROM:", "5.1.7", "sender")
_RECIPIENT = _Kind("RCPT", "TO:", "5.1.3", "recipient")


def parse_mail_argument(arg: str, *, utf8: bool) -> tuple[Address, dict[str, str]]:
    """Parse the text after ``MAIL`` (``FROM:<a@b.example> SIZE=100 BODY=8BITMIME``).

    ``FROM:`` is case-insensitive and may be followed by one space. ``<>`` gives ``Address.null()``.
    ``utf8``: whether this session may use SMTPUTF8 (it was offered in EHLO); a non-ASCII address is then
    accepted only if this very command carries the ``SMTPUTF8`` parameter. Returns the address and the
    parameters, keys upper-cased, values as given (xtext not decoded), ``""`` for a bare keyword.
    Raises AddressError.
    """
    inner, rest = _split_argument(arg, _SENDER)
    params = _parse_params(rest, utf8=utf8)
    return _parse_path(inner, _SENDER, utf8=utf8 and "SMTPUTF8" in params), params


def parse_rcpt_argument(arg: str, *, utf8: bool) -> tuple[Address, dict[str, str]]:
    """Parse the text after ``RCPT`` (``TO:<u@local.example> NOTIFY=NEVER``) like
    :func:`parse_mail_argument`.

    ``utf8``: whether the current transaction is SMTPUTF8 (its MAIL FROM carried the parameter); non-ASCII
    addresses are refused otherwise. ``<postmaster>`` (any case, no domain) is allowed; the null path is not.
    Raises AddressError.
    """
    inner, rest = _split_argument(arg, _RECIPIENT)
    params = _parse_params(rest, utf8=utf8)
    return _parse_path(inner, _RECIPIENT, utf8=utf8), params


def _split_argument(arg: str, kind: _Kind) -> tuple[str, str]:
    """The text between the angle brackets, and what follows the closing one."""
    if arg[: len(kind.keyword)].upper() != kind.keyword:
        raise AddressError(Reply(501, "5.5.4", f"Syntax: {kind.verb} {kind.keyword}<address> [parameters]"))
    text = arg[len(kind.keyword) :]
    if text.startswith(" "):
        text = text[1:]
    if not text:
        raise kind.syntax("missing address")
    if not text.startswith("<"):
        raise kind.syntax("the address must be enclosed in <>")
    end = _closing_bracket(text)
    if end < 0:
        raise kind.syntax("missing closing >")
    rest = text[end + 1 :]
    if rest and not rest.startswith(" "):
        raise kind.syntax("unexpected text after >")
    return text[1:end], rest


def _closing_bracket(text: str) -> int:
    """Index of the ``>`` closing the path that ``text`` opens, skipping quoted strings; -1 if none."""
    quoted = False
    index = 1
    while index < len(text):
        char = text[index]
        if quoted and char == "\\":
            index += 1
        elif char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            return index
        index += 1
    return -1


def _parse_params(text: str, *, utf8: bool) -> dict[str, str]:
    params: dict[str, str] = {}
    for token in text.split(" "):
        if not token:
            continue  # tolerate runs of spaces and trailing spaces
        key, eq, value = token.partition("=")
        if not _ESMTP_KEYWORD.match(key) or (eq and not _ESMTP_VALUE[utf8].match(value)):
            raise AddressError(Reply(501, "5.5.4", f"Invalid parameter syntax: {token[:40]}"))
        key = key.upper()
        if key in params:
            raise AddressError(Reply(501, "5.5.4", f"Duplicate parameter {key}"))
        params[key] = value
    return params


def _parse_path(inner: str, kind: _Kind, *, utf8: bool) -> Address:
    if not utf8 and not inner.isascii():
        raise AddressError(
            Reply(553, "5.6.7", f"Non-ASCII {kind.what} address not permitted without SMTPUTF8")
        )
    if len(inner.encode("utf-8", "surrogatepass")) + 2 > MAX_PATH:
        raise kind.syntax(f"path longer than {MAX_PATH} octets")
    if not inner:
        if kind is _SENDER:
            return Address.null()
        raise kind.syntax("the null path is not a recipient")
    if inner.startswith("@"):
        inner = _strip_route(inner, kind)
    return _parse_mailbox(inner, kind, utf8=utf8)


def _strip_route(inner: str, kind: _Kind) -> str:
    route, colon, mailbox = inner.partition(":")
    if not colon:
        raise kind.syntax("a source route must end with ':'")
    for hop in route.split(","):
        if not hop.startswith("@"):
            raise kind.syntax("bad source route")
        try:
            normalize_domain(hop[1:])
        except ValueError:
            raise kind.syntax("bad domain in source route") from None
    if kind is _RECIPIENT:
        raise AddressError(
            Reply(553, "5.7.1", "Source routes are not accepted; address the mailbox directly")
        )
    return mailbox


def _parse_mailbox(text: str, kind: _Kind, *, utf8: bool) -> Address:
    if text.startswith('"'):
        quoted = _QUOTED_STRING[utf8].match(text)
        if quoted is None:
            raise kind.syntax("bad quoted local part")
        wire_local, rest = quoted.group(), text[quoted.end() :]
        if not rest.startswith("@"):
            raise kind.syntax("missing @domain")
        local = _minimal_quoting(wire_local, utf8=utf8)
    else:
        wire_local, at, rest = text.partition("@")
        if not at:
            if kind is _RECIPIENT and text.lower() == "postmaster":
                return Address("postmaster", "")
            raise kind.syntax("missing @domain")
        rest = "@" + rest
        if not _DOT_STRING[utf8].match(wire_local):
            raise kind.syntax("bad local part")
        local = wire_local
    domain = rest[1:]
    if "@" in domain:
        raise kind.syntax("more than one @")
    if len(wire_local.encode("utf-8", "surrogatepass")) > MAX_LOCAL_PART:
        raise kind.syntax(f"local part longer than {MAX_LOCAL_PART} octets")
    if len(domain.encode("utf-8", "surrogatepass")) > MAX_DOMAIN:
        raise kind.syntax(f"domain longer than {MAX_DOMAIN} octets")
    return Address(local, _parse_domain(domain, kind))


def _minimal_quoting(quoted: str, *, utf8: bool) -> str:
    content = _QUOTED_PAIR.sub(r"\1", quoted[1:-1])
    if _DOT_STRING[utf8].match(content):
        return content
    return '"' + _NEEDS_ESCAPE.sub(r"\\\1", content) + '"'


def _parse_domain(domain: str, kind: _Kind) -> str:
    if not domain:
        raise kind.syntax("missing domain")
    if domain.endswith("."):  # RFC 5321 Domain has no root label, though DNS names may
        raise kind.syntax("bad domain")
    if domain.startswith("["):
        return _parse_literal(domain, kind)
    try:
        return normalize_domain(domain)
    except ValueError:
        raise kind.syntax("bad domain") from None


def _parse_literal(literal: str, kind: _Kind) -> str:
    if not literal.endswith("]") or len(literal) < 3:
        raise kind.syntax("bad address literal")
    body = literal[1:-1]
    try:
        if body[:5].lower() == "ipv6:":
            if "%" in body:  # a zone index means nothing to another host
                raise ValueError(body)
            return f"[IPv6:{ipaddress.IPv6Address(body[5:]).compressed}]"
        if ":" not in body:
            return f"[{ipaddress.IPv4Address(body)}]"
    except ValueError:
        raise kind.syntax("bad address literal") from None
    raise AddressError(Reply(553, kind.status, "General address literals are not supported"))
