"""The ``Received:`` trace field prepended to every accepted message (RFC 5321 §4.4, RFC 5322 §3.6.7)."""

from __future__ import annotations

import datetime
import email.utils
import functools
import ipaddress

#: Characters of the client's HELO argument that would change the structure of the field (comments, quoting,
#: folding) are replaced, so a hostile HELO can only ever be a harmless token.
_UNSAFE = str.maketrans(dict.fromkeys('()\\"[];<>', "_"))


def with_protocol(*, esmtp: bool, tls: bool, authenticated: bool, utf8: bool) -> str:
    """The ``with`` keyword: SMTP/ESMTP with the RFC 3848 ``S``/``A``/``SA`` suffixes, ``UTF8SMTP`` variants
    (RFC 6531 §3.7.3) for SMTPUTF8 transactions."""
    if not esmtp:
        return "SMTP"
    suffix = ("S" if tls else "") + ("A" if authenticated else "")
    base = "UTF8SMTP" if utf8 else "ESMTP"
    return base + suffix


@functools.lru_cache(maxsize=1024)  # a pure function of the peer's address, asked once per message
def address_literal(ip: str) -> str:
    """``[192.0.2.1]`` or ``[IPv6:2001:db8::1]`` (RFC 5321 §4.1.3); anything unparsable in brackets as is."""
    try:
        parsed = ipaddress.ip_address(ip)
    except ValueError:
        return f"[{ip.translate(_UNSAFE)}]"
    if parsed.version == 6:
        if parsed.ipv4_mapped is not None:
            return f"[{parsed.ipv4_mapped}]"
        return f"[IPv6:{parsed.compressed}]"
    return f"[{parsed}]"


def received_header(
    *,
    helo: str,
    peer_ip: str,
    hostname: str,
    protocol: str,
    queue_id: str,
    tls: str | None,
    recipients: list[str],
    when: float,
) -> bytes:
    """The complete field, folded, ending in CRLF, encoded UTF-8 (non-ASCII only in SMTPUTF8 transactions).

    ``for <rcpt>`` is given only for a single recipient (more would disclose Bcc recipients to each other);
    ``tls`` is shown as a comment after the protocol. Every physical line stays far below 998 octets as long
    as the HELO argument and the recipient fit a command line.
    """
    lines = [
        f"Received: from {helo.translate(_UNSAFE) or 'unknown'} ({address_literal(peer_ip)})",
        f"\tby {hostname} (dcrouter) with {protocol}" + (f" ({tls.translate(_UNSAFE)})" if tls else ""),
        f"\tid {queue_id}",
    ]
    date = _date(when)
    if len(recipients) == 1:
        lines.append(f"\tfor <{recipients[0]}>")
    lines[-1] += f"; {date}"
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


#: The last second :func:`_date` formatted, and its text (the date has no fraction of a second).
_last_date: list[tuple[int, str]] = [(-1, "")]


def _date(when: float) -> str:
    """RFC 5322 date-time of ``when`` in UTC, formatted once per second."""
    second = int(when)
    plain = when >= 0 and when - second < 0.999999  # else datetime may round it up into the next second
    if plain and second == _last_date[0][0]:
        return _last_date[0][1]
    text = email.utils.format_datetime(datetime.datetime.fromtimestamp(when, datetime.UTC))
    if plain:
        _last_date[0] = (second, text)
    return text
