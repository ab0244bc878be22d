"""The zones as zone-file text (RFC 1035 §5), for ``dcrouter dns-records``: what the server publishes,
each record with where it comes from."""

from __future__ import annotations

import socket
from typing import Any

from twisted.names import dns

from dcrouter.dns.zone import ZoneSet


def _quoted(data: bytes) -> str:
    text = data.decode("utf-8", "replace").replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def rdata_text(record: Any) -> str:
    """``record``'s data as a zone file writes it."""
    kind = record.TYPE
    if kind == dns.A:
        return str(record.dottedQuad())
    if kind == dns.AAAA:
        return socket.inet_ntop(socket.AF_INET6, record.address)
    if kind == dns.MX:
        return f"{record.preference} {record.name.name.decode()}."
    if kind in (dns.NS, dns.CNAME):
        return f"{record.name.name.decode()}."
    if kind == dns.TXT:
        return " ".join(_quoted(piece) for piece in record.data)
    if kind == dns.SOA:
        return (
            f"{record.mname.name.decode()}. {record.rname.name.decode()}. {record.serial} {record.refresh} "
            f"{record.retry} {record.expire} {record.minimum}"
        )
    raise ValueError(f"no zone-file form for record type {kind}")


def zone_file(zones: ZoneSet) -> str:
    """Every zone of ``zones``: an ``$ORIGIN`` line, then one line per record with its source as a comment
    (SOA first, then names in order)."""
    lines: list[str] = []
    for zone in zones:
        lines.append(f"$ORIGIN {zone.origin}.")
        ordered = sorted(
            zone.records, key=lambda r: (r.record.TYPE != dns.SOA, r.name != zone.origin, r.name, r.type_name)
        )
        for entry in ordered:
            lines.append(
                f"{entry.name}. {entry.record.ttl} IN {entry.type_name} {rdata_text(entry.record)} "
                f"; {entry.source}"
            )
        lines.append("")
    return "\n".join(lines)
