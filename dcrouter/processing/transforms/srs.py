"""SRS, the Sender Rewriting Scheme: ``srsForward`` and ``srsReverse``.

A gateway that forwards mail for a domain keeps the original envelope sender only at the cost of SPF: the
next hop sees ``alice@example.org`` arrive from an address example.org never authorised. ``srsForward``
rewrites the envelope sender (MAIL FROM only, never a header) into an address at the SRS domain that carries
the original, signed and dated; ``srsReverse`` turns a bounce to such an address back into one to the
original sender, and refuses addresses it did not sign or that are too old (no open relay through forged
SRS addresses).

The format and the hash are Shevek's guarded scheme as libsrs2, Mail::SRS and postsrsd implement it, so their
addresses and ours verify each other given the same secret::

    SRS0=HHHH=TT=example.org=alice@srs.example.net
    SRS1=HHHH=first.example==HHHH=TT=example.org=alice@srs.example.net

``HHHH`` is the first four characters of the base64 HMAC-SHA1, under the first secret, of the fields after it
(each lower-cased, ASCII only) concatenated; ``TT`` is the day number modulo 1024 in two base32 characters. A
sender that is already SRS0 (we are the second forwarder) becomes SRS1, which names the first forwarder's
domain and keeps its SRS0 part as it was: a bounce then goes back to the first forwarder, which alone can
check its own hash. Hashes are compared ignoring case (some MTAs fold local parts), in constant time, against
every secret (the first signs, the others still verify: key rotation).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from collections.abc import Callable, Iterable, Sequence

from zope.interface import implementer

from dcrouter.interfaces import ITransformation
from dcrouter.log import logger
from dcrouter.mail.reply import Reply
from dcrouter.net.domains import DomainMatcher, normalize_domain
from dcrouter.processing.message import Draft, Refusal

log = logger(__name__)

HASH_LENGTH = 4
DEFAULT_MAX_AGE_DAYS = 21
#: The separators the tag may be followed by (``SRS0=``, ``SRS0+``, ``SRS0-``); inside, fields use ``=``.
TAG_SEPARATORS = "=+-"
TIME_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"  # RFC 4648 base32
TIME_SLOTS = 1024  # two base32 characters
DAY = 86400

INVALID = Reply(550, "5.1.1", "Invalid SRS address")

# A local part that can be carried inside another one unquoted: no quotes, backslashes, spaces, specials.
_UNQUOTED_LOCAL = re.compile(r"[^\s\"\\(),:;<>@\[\]\x00-\x1f\x7f]+\Z")


class InvalidSrsAddress(ValueError):
    """An address at the SRS domain in SRS form that does not verify: ``reason`` is ``forged`` (bad hash,
    malformed, or an unusable result) or ``expired``."""

    def __init__(self, address: str, reason: str) -> None:
        super().__init__(f"{reason} SRS address {address!r}")
        self.address = address
        self.reason = reason


def timestamp(now: float) -> str:
    """The SRS timestamp of ``now`` (seconds since the epoch): days modulo 1024, two base32 characters."""
    days = int(now // DAY) % TIME_SLOTS
    return TIME_CHARS[days >> 5] + TIME_CHARS[days & 31]


def timestamp_age(stamp: str, now: float) -> int | None:
    """Whole days from ``stamp`` to ``now`` (modulo 1024: a stamp from the future reads as very old), or
    None when ``stamp`` is not two base32 characters (any case)."""
    if len(stamp) != 2 or not stamp.isascii():
        return None
    then = 0
    for char in stamp.upper():
        index = TIME_CHARS.find(char)
        if index < 0:
            return None
        then = (then << 5) | index
    return (int(now // DAY) - then) % TIME_SLOTS


def _tag(local: str, tag: str) -> bool:
    return len(local) >= 5 and local[:4].upper() == tag and local[4] in TAG_SEPARATORS


def _fields(text: str, count: int) -> list[str] | None:
    """``text`` split at its first ``count - 1`` ``=``, or None when a field would be empty."""
    parts = text.split("=", count - 1)
    return parts if len(parts) == count and all(parts) else None


class SrsScheme:
    """The SRS domain, its secrets and the maximum age: makes and checks SRS addresses.

    ``secrets``: the first signs, every one verifies. ``now``: seconds since the epoch (``time.time``).
    """

    def __init__(
        self,
        domain: str,
        secrets: Sequence[str],
        *,
        max_age_days: int = DEFAULT_MAX_AGE_DAYS,
        now: Callable[[], float] = time.time,
    ) -> None:
        if not secrets:
            raise ValueError("SRS needs at least one secret")
        self.domain = domain[:-1] if domain.endswith(".") else domain
        self._domain_key = normalize_domain(domain)
        self._keys = [s.encode("utf-8") for s in secrets]
        self.max_age_days = max_age_days
        self._now = now

    def hash(self, *fields: str, key: bytes | None = None) -> str:
        """The SRS hash of ``fields`` under ``key`` (default: the signing secret)."""
        mac = hmac.new(self._keys[0] if key is None else key, digestmod=hashlib.sha1)
        for field in fields:
            mac.update(field.encode("utf-8").lower())  # bytes.lower(): ASCII only, as libsrs2
        return base64.b64encode(mac.digest()).decode("ascii")[:HASH_LENGTH]

    def verify(self, given: str, *fields: str) -> bool:
        """Does ``given`` match the hash of ``fields`` under any secret, ignoring case? Constant time in the
        hash compared, and every secret is tried whatever the outcome."""
        if len(given) != HASH_LENGTH:
            return False
        offered = given.encode("utf-8").lower()
        matched = False
        for key in self._keys:
            expected = self.hash(*fields, key=key).encode("ascii").lower()
            matched |= hmac.compare_digest(expected, offered)
        return matched

    def is_ours(self, domain: str) -> bool:
        try:
            return normalize_domain(domain) == self._domain_key
        except ValueError:
            return False

    def forward(self, sender: str) -> str:
        """``sender`` as an SRS address at the SRS domain; an address this scheme cannot carry (no domain, a
        quoted local part, an address literal) is returned as it is."""
        local, at, host = sender.rpartition("@")
        if not at or not local or not _UNQUOTED_LOCAL.match(local):
            return sender
        try:
            normalize_domain(host)
        except ValueError:
            return sender
        if _tag(local, "SRS1"):
            # A second forwarder's SRS1: re-signed for our domain, still naming the first forwarder.
            parts = _fields(local[5:], 3)
            if parts is not None:
                return self._srs1(parts[1], parts[2])
        if _tag(local, "SRS0"):
            # The first forwarder's SRS0, kept opaque from its separator on: only it can check it.
            return self._srs1(host, local[4:])
        stamp = timestamp(self._now())
        signed = self.hash(stamp, host, local)
        return f"SRS0={signed}={stamp}={host}={local}@{self.domain}"

    def _srs1(self, first_host: str, first_user: str) -> str:
        signed = self.hash(first_host, first_user)
        return f"SRS1={signed}={first_host}={first_user}@{self.domain}"

    def is_srs(self, address: str) -> bool:
        """Is ``address`` at the SRS domain with an SRS0 or SRS1 local part (verified or not)?"""
        local, at, host = address.rpartition("@")
        return bool(at) and self.is_ours(host) and (_tag(local, "SRS0") or _tag(local, "SRS1"))

    def reverse(self, address: str) -> str:
        """The address an SRS address stands for: the original sender for SRS0, the first forwarder's SRS0
        address for SRS1. Raises :class:`InvalidSrsAddress` when the hash does not verify or, for SRS0, the
        timestamp is older than ``max_age_days`` (SRS1 carries no timestamp of ours, as in the spec: the
        first forwarder checks the age of its own SRS0 part)."""
        local = address.rpartition("@")[0]
        stamp: str | None = None
        if _tag(local, "SRS0"):
            parts = _fields(local[5:], 4)
            if parts is None:
                raise InvalidSrsAddress(address, "forged")
            given, stamp, host, user = parts
            if not self.verify(given, stamp, host, user):
                raise InvalidSrsAddress(address, "forged")
            original = f"{user}@{host}"
        elif _tag(local, "SRS1"):
            parts = _fields(local[5:], 3)
            if parts is None:
                raise InvalidSrsAddress(address, "forged")
            given, host, user = parts
            if not self.verify(given, host, user):
                raise InvalidSrsAddress(address, "forged")
            original = f"SRS0{user}@{host}"
        else:
            raise InvalidSrsAddress(address, "forged")
        if stamp is not None:
            age = timestamp_age(stamp, self._now())
            if age is None:
                raise InvalidSrsAddress(address, "forged")
            if age > self.max_age_days:
                raise InvalidSrsAddress(address, "expired")
        if any(c in original for c in " <>\r\n\x00"):
            # Only a signed address gets here, but the hash is short: never let one smuggle a bad address.
            raise InvalidSrsAddress(address, "forged")
        return original


@implementer(ITransformation)
class SrsForward:
    """Rewrite the envelope sender into SRS form, except the null sender and senders at the SRS domain or at
    ``local_domains`` (exact or ``*.`` wildcard): their own mail passes SPF as it is."""

    name = "srsForward"

    def __init__(
        self,
        domain: str,
        secrets: Sequence[str],
        *,
        local_domains: Iterable[str] = (),
        now: Callable[[], float] = time.time,
    ) -> None:
        self.scheme = SrsScheme(domain, secrets, now=now)
        self._local: DomainMatcher[bool] = DomainMatcher((d, True) for d in local_domains)

    def rewrite(self, sender: str) -> str:
        """The envelope sender as forwarded."""
        if not sender:
            return sender
        host = sender.rpartition("@")[2]
        if self.scheme.is_ours(host) or self._local.match(host):
            return sender
        return self.scheme.forward(sender)

    def apply(self, draft: Draft) -> None:
        envelope = draft.envelope
        envelope.mail_from = self.rewrite(envelope.mail_from)


@implementer(ITransformation)
class SrsReverse:
    """Rewrite each recipient that is an SRS address at the SRS domain back to the address it stands for;
    refuse the message (550 5.1.1) when one does not verify or is too old. Other recipients, including other
    local parts at the SRS domain (``postmaster``), are left as they are."""

    name = "srsReverse"
    #: The gateway's own DSNs are reversed too: a bounce of forwarded mail goes to the original sender.
    applies_to_local_mail = True

    def __init__(
        self,
        domain: str,
        secrets: Sequence[str],
        *,
        max_age_days: int = DEFAULT_MAX_AGE_DAYS,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.scheme = SrsScheme(domain, secrets, max_age_days=max_age_days, now=now)

    def apply(self, draft: Draft) -> None:
        envelope = draft.envelope
        recipients: list[str] = []
        for rcpt in envelope.recipients:
            try:
                target = self.scheme.reverse(rcpt) if self.scheme.is_srs(rcpt) else rcpt
            except InvalidSrsAddress as e:
                log.info(
                    "{queue_id}: refused: {reason} SRS address {address}",
                    queue_id=draft.queue_id,
                    reason=e.reason,
                    address=e.address,
                )
                raise Refusal(INVALID, f"{e.reason} SRS address") from e
            if target not in recipients:
                recipients.append(target)
        envelope.recipients = recipients
