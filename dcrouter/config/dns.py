"""The schema of ``dnsServerConfig``: the router's own authoritative DNS server (see docs/dns.md).

The seed types the block as smartdns' ``IDnsServerOptions``; its names are kept (``udpPort``,
``udpBindInterface``), its DNS-over-HTTPS and DNSSEC keys are refused as not built yet, and the zones and
their records are dcrouter's additions. Record data is written as in a zone file (``"10 mail.example.com"``
for an MX); :func:`record_data` parses it, for the configuration check and for the server alike.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any, Literal

from twisted.names import dns

from dcrouter.config import values
from dcrouter.config.schema import Report, block_check, checked, join, option
from dcrouter.net.domains import normalize_domain

RecordType = Literal["A", "AAAA", "MX", "TXT", "CNAME", "NS", "SOA"]

#: TTL of records that do not set one, and of generated records: five minutes.
DEFAULT_TTL = 300

#: Longest character-string in a TXT record (RFC 1035 §3.3); longer values are split into several.
TXT_STRING_MAX = 255


_SERVICE_LABEL = re.compile(r"_?[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")


def dns_name(value: str) -> str:
    """``value`` as the server compares names: :func:`normalize_domain`, except that labels may start with
    an underscore (``_dmarc``, ``_domainkey``, ``_acme-challenge``). Raises ValueError."""
    if "_" not in value:
        return normalize_domain(value)
    text = (value[:-1] if value.endswith(".") else value).lower()
    for label in text.split("."):
        if not _SERVICE_LABEL.match(label):
            raise ValueError(f"{value!r}: not a valid DNS label: {label!r}")
    if len(text) > 253:
        raise ValueError(f"{value!r}: longer than 253 octets")
    return text


def txt_strings(text: str) -> list[bytes]:
    """The character-strings of a TXT record: each value cut into pieces of at most 255 octets (a long DKIM
    key is one logical string that resolvers join back)."""
    data = text.encode("utf-8")
    return [data[i : i + TXT_STRING_MAX] for i in range(0, len(data), TXT_STRING_MAX)] or [b""]


def _host(value: str) -> str:
    if values.host_name(value) is not None:
        raise ValueError(f"not a host name: {value!r}")
    return normalize_domain(value)


def record_data(kind: str, value: str, ttl: int) -> Any:
    """The twisted.names record (``dns.Record_A`` ...) for ``value`` written as zone-file data of type
    ``kind``. Raises ValueError with the reason."""
    if kind == "TXT":
        return dns.Record_TXT(*txt_strings(value), ttl=ttl)
    if kind in ("A", "AAAA"):
        try:
            address = ipaddress.ip_address(value)
        except ValueError:
            raise ValueError(f"not an IP address: {value!r}") from None
        if (address.version == 4) != (kind == "A"):
            raise ValueError(
                f"{value!r} is an IPv{address.version} address; {kind} needs IPv{6 if kind == 'AAAA' else 4}"
            )
        return dns.Record_A(value, ttl=ttl) if kind == "A" else dns.Record_AAAA(value, ttl=ttl)
    if kind == "CNAME":
        return dns.Record_CNAME(_host(value), ttl=ttl)
    if kind == "NS":
        return dns.Record_NS(_host(value), ttl=ttl)
    fields = value.split()
    if kind == "MX":
        if len(fields) != 2 or not fields[0].isdigit() or int(fields[0]) > 65535:
            raise ValueError(f"an MX record is 'PREFERENCE HOST' (0-65535), not {value!r}")
        return dns.Record_MX(int(fields[0]), _host(fields[1]), ttl=ttl)
    if kind == "SOA":
        if len(fields) != 7 or not all(f.isdigit() and int(f) < 2**32 for f in fields[2:]):
            raise ValueError(
                f"an SOA record is 'MNAME RNAME SERIAL REFRESH RETRY EXPIRE MINIMUM', not {value!r}"
            )
        serial, refresh, retry, expire, minimum = (int(f) for f in fields[2:])
        return dns.Record_SOA(
            _host(fields[0]), _host(fields[1]), serial, refresh, retry, expire, minimum, ttl=ttl
        )
    raise ValueError(f"unknown record type {kind!r}")


@dataclass(frozen=True)
class DnsRecord:
    name: str = option(doc="Owner name, fully qualified (`www.example.com`); it must lie in one of `zones`.")
    type: RecordType = option(doc="Record type.")
    value: str = option(
        doc='Data as in a zone file: `"192.0.2.10"`, `"10 mail.example.com"` (MX), `"mail.example.com"` '
        '(CNAME, NS), `"MNAME RNAME SERIAL REFRESH RETRY EXPIRE MINIMUM"` (SOA, at a zone\'s apex); a TXT '
        "value over 255 octets is split into several strings."
    )
    ttl: int = option(DEFAULT_TTL, doc="Time to live in seconds.", check=values.non_negative)


@dataclass(frozen=True)
class MailRecordsConfig:
    mx: bool = option(
        True,
        doc="Publish `MX 10 <smtpConfig.hostname>` for every exact domain of `smtpConfig.domainConfigs` that "
        "lies in one of `zones` (and has no MX of its own in `records`).",
    )
    dkim: bool = option(
        True,
        doc="Publish `<selector>._domainkey.<domain> TXT` for every DKIM signing key (`dkimOptions`, "
        "`dkimSign` transformations, `arcSign`) whose domain lies in one of `zones`.",
    )
    spf: str | None = option(
        None,
        doc='SPF policy published as TXT at every domain that gets an MX above, e.g. `"v=spf1 mx -all"`.',
    )
    dmarc: str | None = option(
        None,
        doc="DMARC policy published as TXT at `_dmarc.<domain>` for the same domains, e.g. "
        '`"v=DMARC1; p=reject; rua=mailto:dmarc@example.com"`.',
    )
    ttl: int = option(
        DEFAULT_TTL, doc="Time to live of the generated records, in seconds.", check=values.non_negative
    )


def zone_of(name: str, zones: list[str]) -> str | None:
    """The most specific zone ``name`` lies in (both normalised), or None."""
    best = None
    for zone in zones:
        if (name == zone or name.endswith("." + zone)) and (best is None or len(zone) > len(best)):
            best = zone
    return best


@block_check("zones", "records", "nameservers")
def dns_records(config: DnsServerConfig, path: str, report: Report) -> None:
    """Each record parses, lies in a served zone, and fits with the records beside it (a CNAME stands
    alone, NS and SOA only at a zone's apex, one SOA per zone)."""
    zones = []
    for i, zone in enumerate(config.zones):
        try:
            zones.append(dns_name(zone))
        except ValueError as error:
            report.error(f"{join(path, 'zones')}[{i}]", str(error))
    kinds: dict[str, list[tuple[str, str]]] = {}
    for i, record in enumerate(config.records):
        where = f"{join(path, 'records')}[{i}]"
        try:
            name = dns_name(record.name)
        except ValueError as error:
            report.error(join(where, "name"), str(error))
            continue
        found = zone_of(name, zones)
        if found is None:
            report.error(join(where, "name"), f"{record.name!r} lies in none of {join(path, 'zones')}")
            continue
        zone = found
        try:
            record_data(record.type, record.value, record.ttl)
        except ValueError as error:
            report.error(join(where, "value"), str(error))
            continue
        if record.type in ("NS", "SOA") and name != zone:
            report.error(
                join(where, "type"),
                f"{record.type} records only at a zone's apex ({zone!r}); delegations are not served",
            )
        kinds.setdefault(name, []).append((record.type, where))
    for _name, entries in kinds.items():
        types = [kind for kind, _ in entries]
        if "CNAME" in types and len(types) > 1:
            where = next(w for k, w in entries if k == "CNAME")
            report.error(join(where, "type"), "a CNAME cannot share its name with other records (RFC 1034)")
        if types.count("SOA") > 1:
            report.error(join(entries[-1][1], "type"), "a zone has one SOA record")
    if any(name in zones for name, entries in kinds.items() for kind, _ in entries if kind == "CNAME"):
        report.error(join(path, "records"), "a CNAME cannot be at a zone's apex (it has SOA and NS)")


@checked(dns_records)
@dataclass(frozen=True)
class DnsServerConfig:
    zones: list[str] = option(
        addition=True,
        doc="The zones the server is authoritative for (`example.com`). Queries for any other name are "
        "refused (REFUSED): it is never a resolver.",
        check=values.all_of(values.not_empty, values.unique),
    )
    udp_port: int = option(
        53,
        doc="Port of the server, for UDP and TCP alike (TCP carries answers too big for a datagram).",
        check=values.port,
    )
    udp_bind_interface: str = option(
        "0.0.0.0", doc="Address the server listens on (UDP and TCP).", check=values.ip_address
    )
    nameservers: list[str] = option(
        factory=list,
        addition=True,
        doc="Host names of the zones' name servers: NS records at every zone's apex, the first one the SOA's "
        "MNAME. Not set: `smtpConfig.hostname`.",
        each=values.host_name,
    )
    hostmaster: str | None = option(
        None,
        addition=True,
        doc="The SOA's RNAME, the zone administrator's mailbox written as a name (`hostmaster.example.com`). "
        "Not set: `hostmaster.<zone>`.",
        check=values.host_name,
    )
    records: list[DnsRecord] = option(factory=list, addition=True, doc="Records served as they are written.")
    mail_records: MailRecordsConfig = option(
        factory=MailRecordsConfig,
        addition=True,
        doc="Records generated from the mail configuration: MX, DKIM keys, SPF and DMARC.",
    )
    https_port: int | None = option(None, unsupported="DNS over HTTPS is not built.")
    https_bind_interface: str | None = option(None, unsupported="DNS over HTTPS is not built.")
    https_key: str | None = option(None, unsupported="DNS over HTTPS is not built.")
    https_cert: str | None = option(None, unsupported="DNS over HTTPS is not built.")
    dnssec_zone: str | None = option(None, unsupported="DNSSEC signing is not built.")
