"""The zones the DNS server answers for, built from the configuration.

Records come from ``dnsServerConfig.records`` as written, plus what the mail configuration implies
(``mailRecords``): an MX for every exact ``smtpConfig.domainConfigs`` domain pointing at
``smtpConfig.hostname``, the public key of every DKIM signing key at ``<selector>._domainkey.<domain>``, and
SPF and DMARC policy TXT records for the MX domains. A configured record wins over a generated one of the same
name and type. Building reads DKIM key files: call it at start-up, not on every query.

TXT records that change while the server runs (ACME DNS-01 answers) come from a :class:`DynamicTxt` the
zone set consults on each lookup.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.names import dns

from dcrouter.config.dns import DnsServerConfig, dns_name, record_data, txt_strings, zone_of
from dcrouter.config.options import DcRouterOptions
from dcrouter.mail.dkimkeys import dns_txt_value, load_private_key, read_private_key

#: SOA timers of a generated SOA: refresh, retry, expire (seconds).
SOA_REFRESH, SOA_RETRY, SOA_EXPIRE = 3600, 600, 1_209_600

#: TTL of dynamic TXT records: validators must never see a cached, stale challenge answer.
DYNAMIC_TTL = 0


class DynamicTxt(Protocol):
    """TXT values published for a while (ACME DNS-01 key authorisation digests)."""

    def txt_values(self, name: str) -> list[str]:
        """The values to publish at ``name`` (normalised, no trailing dot) right now; usually none."""


@dataclass(frozen=True)
class ZoneRecord:
    """One record of a zone: its owner name (normalised), the twisted.names record, and where it came
    from (a key path, or what generated it), for ``dcrouter dns-records``."""

    name: str
    record: Any
    source: str

    @property
    def type_name(self) -> str:
        return dns.QUERY_TYPES.get(self.record.TYPE, str(self.record.TYPE))


@dataclass
class Zone:
    """The records of one zone: ``origin`` (normalised) and its records by owner name."""

    origin: str
    records: list[ZoneRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._by_name: dict[str, list[Any]] = {}
        for entry in self.records:
            self._by_name.setdefault(entry.name, []).append(entry.record)

    @property
    def soa(self) -> Any:
        return next(r for r in self._by_name[self.origin] if r.TYPE == dns.SOA)

    def at(self, name: str) -> list[Any]:
        return self._by_name.get(name, [])

    def has_below(self, name: str) -> bool:
        """Whether some name below ``name`` holds records (``name`` is then an empty non-terminal: NODATA,
        not NXDOMAIN, RFC 8020)."""
        suffix = "." + name
        return any(n.endswith(suffix) for n in self._by_name)


class ZoneSet:
    """Every zone the server answers for; ``dynamic`` adds TXT records at lookup time."""

    def __init__(self, zones: list[Zone], dynamic: DynamicTxt | None = None) -> None:
        self.zones = {zone.origin: zone for zone in zones}
        self.dynamic = dynamic

    def zone_for(self, name: str) -> Zone | None:
        origin = zone_of(name, list(self.zones))
        return None if origin is None else self.zones[origin]

    def records_at(self, zone: Zone, name: str) -> list[Any]:
        records = list(zone.at(name))
        if self.dynamic is not None:
            records.extend(
                dns.Record_TXT(*txt_strings(value), ttl=DYNAMIC_TTL)
                for value in self.dynamic.txt_values(name)
            )
        return records

    def __iter__(self) -> Iterator[Zone]:
        return iter(self.zones.values())


def _dkim_keys(options: DcRouterOptions) -> Iterator[tuple[str, str, str, str]]:
    """``(domain, selector, private key value, key path)`` of every DKIM key the mail configuration signs
    with."""
    smtp = options.smtp_config
    if smtp is None:
        return
    for i, entry in enumerate(smtp.domain_configs):
        if entry.dkim_options is not None:
            o = entry.dkim_options
            yield o.domain_name, o.key_selector, o.private_key, f"smtpConfig.domainConfigs[{i}].dkimOptions"
    for i, t in enumerate(smtp.transformations):
        if t.type == "dkimSign" and t.private_key and t.key_selector:
            for domain in [t.domain_name] if t.domain_name else t.domains:
                yield domain, t.key_selector, t.private_key, f"smtpConfig.transformations[{i}]"
    arc = smtp.verification.arc_sign
    if arc is not None and arc.private_key and arc.key_selector:
        yield arc.domain_name, arc.key_selector, arc.private_key, "smtpConfig.verification.arcSign"


def generated_records(options: DcRouterOptions, config: DnsServerConfig) -> list[ZoneRecord]:
    """The records ``mailRecords`` asks for (see the module docstring), for names in the served zones."""
    zones = [dns_name(z) for z in config.zones]
    mail = config.mail_records
    ttl = mail.ttl
    smtp = options.smtp_config
    found: list[ZoneRecord] = []
    if smtp is not None:
        mx_domains: list[tuple[str, str]] = []
        for i, entry in enumerate(smtp.domain_configs):
            for domain in entry.domains:
                if not domain.startswith("*.") and zone_of(dns_name(domain), zones) is not None:
                    mx_domains.append((dns_name(domain), f"smtpConfig.domainConfigs[{i}]"))
        for domain, source in dict(mx_domains).items():
            if mail.mx:
                target = dns_name(smtp.hostname)
                found.append(ZoneRecord(domain, dns.Record_MX(10, target, ttl=ttl), f"MX of {source}"))
            if mail.spf:
                spf = dns.Record_TXT(*txt_strings(mail.spf), ttl=ttl)
                found.append(ZoneRecord(domain, spf, "dnsServerConfig.mailRecords.spf"))
            if mail.dmarc:
                dmarc = dns.Record_TXT(*txt_strings(mail.dmarc), ttl=ttl)
                found.append(ZoneRecord(f"_dmarc.{domain}", dmarc, "dnsServerConfig.mailRecords.dmarc"))
    if mail.dkim:
        seen = set()
        for domain, selector, private_key, source in _dkim_keys(options):
            name = dns_name(f"{selector}._domainkey.{domain}")
            if name in seen or zone_of(name, zones) is None:
                continue
            seen.add(name)
            value = dns_txt_value(load_private_key(read_private_key(private_key)))
            found.append(
                ZoneRecord(name, dns.Record_TXT(*txt_strings(value), ttl=ttl), f"DKIM key of {source}")
            )
    return found


def build_zones(options: DcRouterOptions, *, serial: int, dynamic: DynamicTxt | None = None) -> ZoneSet:
    """The zones of ``options.dns_server_config`` (which must be set). ``serial`` is the SOA serial of zones
    whose SOA is generated (the server passes the time it built them). Raises DkimError (a ValueError) when a
    signing key cannot be read."""
    config = options.dns_server_config
    assert config is not None
    nameservers = [dns_name(n) for n in config.nameservers]
    if not nameservers:
        assert options.smtp_config is not None  # the configuration check requires one of the two
        nameservers = [dns_name(options.smtp_config.hostname)]
    configured = [
        ZoneRecord(dns_name(r.name), record_data(r.type, r.value, r.ttl), f"dnsServerConfig.records[{i}]")
        for i, r in enumerate(config.records)
    ]
    taken = {(r.name, r.record.TYPE) for r in configured}
    generated = [r for r in generated_records(options, config) if (r.name, r.record.TYPE) not in taken]
    # A generated MX next to a configured CNAME would break the CNAME's rule: the configured name wins.
    cnames = {r.name for r in configured if r.record.TYPE == dns.CNAME}
    generated = [r for r in generated if r.name not in cnames]
    zones: list[Zone] = []
    origins = [dns_name(z) for z in config.zones]
    for origin in origins:
        mine = [r for r in configured + generated if zone_of(r.name, origins) == origin]
        apex_types = {r.record.TYPE for r in mine if r.name == origin}
        apex: list[ZoneRecord] = []
        if dns.SOA not in apex_types:
            rname = dns_name(config.hostmaster) if config.hostmaster else f"hostmaster.{origin}"
            soa = dns.Record_SOA(
                nameservers[0],
                rname,
                serial,
                SOA_REFRESH,
                SOA_RETRY,
                SOA_EXPIRE,
                config.mail_records.ttl,
                ttl=config.mail_records.ttl,
            )
            apex.append(ZoneRecord(origin, soa, "generated SOA"))
        if dns.NS not in apex_types:
            apex.extend(
                ZoneRecord(
                    origin, dns.Record_NS(ns, ttl=config.mail_records.ttl), "dnsServerConfig.nameservers"
                )
                for ns in nameservers
            )
        zones.append(Zone(origin, apex + mine))
    return ZoneSet(zones, dynamic)
