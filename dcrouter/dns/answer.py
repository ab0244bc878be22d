"""The answer to one DNS query, as an authoritative-only server gives it.

- A name in none of the zones, a class other than IN, or a zone transfer: ``REFUSED``, whatever the RD bit
  says. The server is never a resolver, so it cannot be used as an open one.
- A name that does not exist: ``NXDOMAIN`` with the zone's SOA in the authority section (RFC 2308); a
  name that exists without records of the type asked for: ``NOERROR`` with no answer and the SOA (NODATA).
  An empty non-terminal (``_domainkey.example.com`` when only ``s1._domainkey.example.com`` exists) is
  NODATA (RFC 8020).
- A CNAME answers every type but CNAME, followed by the records of its target when the target is ours.
- ``ANY`` gets one synthesised ``HINFO "RFC8482" ""`` record (RFC 8482 §4.2): it exists to amplify, and no
  client of this server needs it.
- Over UDP an answer larger than 512 octets, or than the client's EDNS buffer size (capped at
  :data:`EDNS_PAYLOAD`), is sent empty with the TC bit, so the client asks again over TCP (RFC 1035 §4.2.1,
  RFC 6891 §7). The server never sends a datagram larger than the query asked for.
- Responses are never answered (a forged "query" that is really a response gets nothing), and other opcodes
  get ``NOTIMP``, a query without exactly one question ``FORMERR``.
"""

from __future__ import annotations

from typing import Any

from twisted.names import dns

from dcrouter.dns.zone import ZoneSet

#: The largest UDP response sent to an EDNS client, whatever buffer it offers: the DNS flag day 2020
#: figure, below any path MTU, so answers are never fragmented (fragments are a spoofing vector).
EDNS_PAYLOAD = 1232

#: The largest UDP response to a client without EDNS (RFC 1035 §4.2.1).
PLAIN_PAYLOAD = 512

#: CNAMEs followed inside the zones before giving up (a loop in the configuration ends here).
MAX_CNAME_CHAIN = 8

#: TTL of the RFC 8482 HINFO record.
ANY_TTL = 3600

_REFUSED_TYPES = frozenset({dns.AXFR, dns.IXFR, dns.MAILA, dns.MAILB})


def _edns(query: dns.Message) -> dns.RRHeader | None:
    return next((rr for rr in query.additional if rr.type == dns.OPT), None)


def udp_limit(query: dns.Message) -> int:
    """How large a UDP response to ``query`` may be."""
    opt = _edns(query)
    if opt is None:
        return PLAIN_PAYLOAD
    return max(PLAIN_PAYLOAD, min(int(opt.cls), EDNS_PAYLOAD))


def _response(query: dns.Message, rcode: int, auth: bool = False) -> dns.Message:
    response = dns.Message(
        id=query.id, answer=1, opCode=query.opCode, recDes=query.recDes, recAv=0, auth=auth, rCode=rcode
    )
    response.maxSize = 0  # never cut inside a record; truncation is decided below, whole sections at a time
    response.queries = list(query.queries)
    if _edns(query) is not None:
        # EDNS was offered: say ours (RFC 6891 §6.1.1: a responder that understands OPT includes one).
        # twisted.names has no public OPT writer for plain Messages; _OPTHeader encodes like an RRHeader.
        response.additional = [dns._OPTHeader(udpPayloadSize=EDNS_PAYLOAD)]  # type: ignore[list-item]
    return response


def _header(name: bytes, record: Any, ttl: int | None = None) -> dns.RRHeader:
    return dns.RRHeader(
        name=name,
        type=record.TYPE,
        cls=dns.IN,
        ttl=record.ttl if ttl is None else ttl,
        payload=record,
        auth=True,
    )


def _normalised(name: bytes) -> str | None:
    try:
        text = name.decode("ascii")
    except UnicodeDecodeError:
        return None
    return text.rstrip(".").lower()


def respond(zones: ZoneSet, query: dns.Message, *, udp: bool) -> dns.Message | None:
    """The response to ``query`` (see the module docstring); None when nothing must be sent (``query`` is
    itself a response)."""
    if query.answer:
        return None
    if query.opCode != dns.OP_QUERY:
        return _response(query, dns.ENOTIMP)
    if len(query.queries) != 1:
        return _response(query, dns.EFORMAT)
    response = _lookup(zones, query)
    if udp and len(response.toStr()) > udp_limit(query):
        response.answers, response.authority = [], []
        response.additional = [rr for rr in response.additional if rr.type == dns.OPT]
        response.trunc = 1
    return response


def _lookup(zones: ZoneSet, query: dns.Message) -> dns.Message:
    question = query.queries[0]
    qname = question.name.name
    name = _normalised(qname)
    zone = zones.zone_for(name) if name is not None else None
    if name is None or zone is None or question.cls != dns.IN or question.type in _REFUSED_TYPES:
        return _response(query, dns.EREFUSED)
    response = _response(query, dns.OK, auth=True)
    soa = zone.soa
    negative = _header(zone.origin.encode("ascii"), soa, ttl=min(soa.ttl, soa.minimum))
    records = zones.records_at(zone, name)
    if not records:
        if not zone.has_below(name):
            response.rCode = dns.ENAME
        response.authority = [negative]
        return response
    if question.type == dns.ALL_RECORDS:
        response.answers = [_header(qname, dns.Record_HINFO(b"RFC8482", b"", ttl=ANY_TTL))]
        return response
    owner = qname
    for _ in range(MAX_CNAME_CHAIN):
        matching = [r for r in records if question.type == r.TYPE]
        if matching:
            response.answers.extend(_header(owner, r) for r in matching)
            return response
        cname = next((r for r in records if r.TYPE == dns.CNAME), None)
        if cname is None:
            break
        response.answers.append(_header(owner, cname))
        owner = cname.name.name
        target = _normalised(owner)
        target_zone = zones.zone_for(target) if target is not None else None
        if target is None or target_zone is None:
            return response  # the client resolves the rest elsewhere
        records = zones.records_at(target_zone, target)
        if not records:
            return response
    if not response.answers:
        response.authority = [negative]
    return response
