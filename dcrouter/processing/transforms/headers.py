"""Header and address transformations: ``addHeader``, ``removeHeader``, ``modifyHeader``, ``rewriteAddress``
and ``domainConfigs[].headerInfo``. They change the header block (and the envelope) only, so the body is never
copied. Values are checked when the configuration loads and again when written (no CR/LF/NUL injection)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from email.utils import formatdate
from typing import Any

from zope.interface import implementer

from dcrouter.interfaces import ITransformation
from dcrouter.log import logger
from dcrouter.mail.headers import HeaderError, check_value
from dcrouter.net.domains import DomainMatcher
from dcrouter.processing.message import Draft

log = logger(__name__)

#: Header fields holding addresses that ``rewriteAddress`` rewrites (scope ``headers``).
ADDRESS_FIELDS = ("From", "To", "Cc", "Reply-To", "Sender")
_ADDRESS = re.compile(
    r"(?<![\w.+-])([\w.!#$%&'*+/=?^`{|}~-]+@[\w.-]+\.[A-Za-z0-9-]+|[\w.!#$%&'*+/=?^`{|}~-]+@\[[^\]\s]+\])"
)


def recipient_filter(domains: Iterable[str]) -> Callable[[Draft], bool]:
    """A predicate: does the draft have a recipient in ``domains`` (exact or ``*.`` wildcard)? Empty: yes."""
    patterns = list(domains)
    if not patterns:
        return lambda draft: True
    matcher: DomainMatcher[bool] = DomainMatcher((p, True) for p in patterns)

    def wanted(draft: Draft) -> bool:
        return any(matcher.match(r.rpartition("@")[2]) for r in draft.envelope.recipients)

    return wanted


def _template(value: str, draft: Draft, hostname: str, now: Callable[[], float]) -> str:
    """Tracking values: ``{queueId}``, ``{sender}``, ``{hostname}``, ``{peer}``, ``{date}``; other braces are
    left as written. The result is checked again: an envelope sender cannot smuggle CR/LF through it."""
    fields = {
        "queueId": draft.queue_id,
        "sender": draft.envelope.mail_from or "<>",
        "hostname": hostname,
        "peer": draft.envelope.peer_host,
        "date": formatdate(now(), localtime=False),
    }
    result = re.sub(r"\{(\w+)\}", lambda m: fields.get(m.group(1), m.group(0)), value)
    return check_value(result)


@implementer(ITransformation)
class AddHeader:
    name = "addHeader"

    def __init__(
        self,
        header: str,
        value: str,
        *,
        domains: Iterable[str] = (),
        hostname: str = "localhost",
        now: Callable[[], float] = time.time,
    ) -> None:
        self.header = header
        self.value = value
        self._wanted = recipient_filter(domains)
        self._hostname = hostname
        self._now = now

    def apply(self, draft: Draft) -> None:
        if self._wanted(draft):
            draft.headers.add(self.header, _template(self.value, draft, self._hostname, self._now))


@implementer(ITransformation)
class RemoveHeader:
    name = "removeHeader"

    def __init__(self, header: str, *, domains: Iterable[str] = ()) -> None:
        self.header = header
        self._wanted = recipient_filter(domains)

    def apply(self, draft: Draft) -> None:
        if self._wanted(draft):
            draft.headers.remove(self.header)


@implementer(ITransformation)
class ModifyHeader:
    """Replace what ``pattern`` matches in every ``header`` field's value by ``replacement``."""

    name = "modifyHeader"

    def __init__(
        self, header: str, pattern: str, replacement: str = "", *, domains: Iterable[str] = ()
    ) -> None:
        self.header = header
        self._pattern = re.compile(pattern)
        self._replacement = replacement
        self._wanted = recipient_filter(domains)

    def apply(self, draft: Draft) -> None:
        if not self._wanted(draft):
            return

        def change(value: str) -> str:
            new = self._pattern.sub(self._replacement, value)
            try:
                return check_value(new)
            except HeaderError:
                # A group reference can pull in nothing dangerous from a value that held none, but a pattern
                # that matches across folded text could; refuse to write it rather than inject.
                log.warn(
                    "{queue_id}: modifyHeader on {header} would inject; left as it was",
                    queue_id=draft.queue_id,
                    header=self.header,
                )
                return value

        draft.headers.replace_values(self.header, change)


@implementer(ITransformation)
class RewriteAddress:
    """Rewrite addresses by a map (whole addresses, or ``@domain`` keys for every address of a domain) or a
    regular expression, in the envelope (MAIL FROM, RCPT TO), the address header fields, or both."""

    name = "rewriteAddress"

    def __init__(
        self,
        mapping: dict[str, str] | None = None,
        pattern: str | None = None,
        replacement: str | None = None,
        *,
        scope: str = "both",
    ) -> None:
        self._map = {k.lower(): v for k, v in (mapping or {}).items()}
        self._pattern = re.compile(pattern) if pattern is not None else None
        self._replacement = replacement or ""
        self.scope = scope

    def rewrite(self, address: str) -> str:
        """The address as rewritten (unchanged when nothing applies); the null sender stays null."""
        if not address:
            return address
        local, at, domain = address.rpartition("@")
        key = address.lower()
        if key in self._map:
            return self._map[key]
        if at and "@" + domain.lower() in self._map:
            target = self._map["@" + domain.lower()]
            return local + target if target.startswith("@") else target
        if self._pattern is not None:
            return self._pattern.sub(self._replacement, address)
        return address

    def apply(self, draft: Draft) -> None:
        if self.scope in ("envelope", "both"):
            env = draft.envelope
            env.mail_from = self._checked(env.mail_from)
            seen: list[str] = []
            for rcpt in env.recipients:
                new = self._checked(rcpt)
                if new not in seen:
                    seen.append(new)
            env.recipients = seen
        if self.scope in ("headers", "both"):
            for field in ADDRESS_FIELDS:
                draft.headers.replace_values(field, self._in_text)

    def _checked(self, address: str) -> str:
        new = self.rewrite(address)
        if new != address and (not new or any(c in new for c in " <>\r\n\x00") or new.count("@") != 1):
            raise HeaderError(f"rewriteAddress made an invalid address of {address!r}: {new!r}")
        return new

    def _in_text(self, value: str) -> str:
        return _ADDRESS.sub(lambda m: self._checked(m.group(1)), value)


@implementer(ITransformation)
class DomainHeaders:
    """``domainConfigs[].addHeaders``/``headerInfo``: the fields of every entry one of whose domains has a
    recipient of the message (each entry's fields once, whatever the number of such recipients)."""

    name = "headerInfo"

    def __init__(self, entries: Iterable[tuple[Iterable[str], Iterable[tuple[str, str]]]]) -> None:
        self._entries = [(recipient_filter(domains), list(fields)) for domains, fields in entries]

    def apply(self, draft: Draft) -> None:
        for wanted, fields in self._entries:
            if wanted(draft):
                for name, value in fields:
                    draft.headers.add(name, value)


def build_header_transformation(entry: Any, hostname: str) -> ITransformation | None:
    """The header/address transformation of a checked ``TransformationConfig``, or None for other types."""
    if entry.type == "addHeader":
        return AddHeader(entry.header, entry.value, domains=entry.domains, hostname=hostname)
    if entry.type == "removeHeader":
        return RemoveHeader(entry.header, domains=entry.domains)
    if entry.type == "modifyHeader":
        return ModifyHeader(entry.header, entry.pattern, entry.replacement or "", domains=entry.domains)
    if entry.type == "rewriteAddress":
        return RewriteAddress(entry.map, entry.pattern, entry.replacement, scope=entry.scope)
    return None
