"""A real authoritative DNS server for tests (twisted.names), on 127.0.0.1 at a free port over UDP and TCP,
serving one zone given as records; and a "server" that never answers, for timeouts."""

from __future__ import annotations

from typing import Any

from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import DatagramProtocol
from twisted.names import authority, client, dns, server


class ZoneAuthority(authority.FileAuthority):
    """The records of ``origin``: ``(name, record)`` pairs, names absolute without the final dot."""

    def __init__(self, origin: str, records: list[tuple[str, Any]]) -> None:
        self._zone = (origin, records)
        super().__init__(None)

    def loadFile(self, filename: Any) -> None:
        origin, records = self._zone
        soa = dns.Record_SOA(
            mname=f"ns.{origin}", rname=f"hostmaster.{origin}", serial=1, minimum=60, expire=600, ttl=60
        )
        self.soa = (origin.encode(), soa)
        self.records = {origin.encode().lower(): [soa]}
        for name, record in records:
            self.records.setdefault(name.lower().encode(), []).append(record)


def txt(*strings: str) -> dns.Record_TXT:
    """A TXT record; a long string is split into 255-octet pieces, as a zone file would hold it."""
    pieces = []
    for text in strings:
        data = text.encode()
        pieces.extend([data[i : i + 255] for i in range(0, len(data), 255)] or [b""])
    return dns.Record_TXT(*pieces, ttl=60)


class ZoneServer:
    """``zone`` served on 127.0.0.1:``port`` (UDP and TCP); ``stop()`` returns a Deferred."""

    def __init__(self, reactor: Any, zone: ZoneAuthority) -> None:
        factory = server.DNSServerFactory(authorities=[zone])
        factory.noisy = False
        # A port free for UDP may be taken for TCP (another program's connection): then try another.
        for _attempt in range(20):
            udp: IListeningPort = reactor.listenUDP(
                0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1"
            )
            port = udp.getHost().port
            try:
                tcp: IListeningPort = reactor.listenTCP(port, factory, interface="127.0.0.1")
            except CannotListenError:
                udp.stopListening()
                continue
            self._udp, self._tcp, self.port = udp, tcp, port
            return
        raise RuntimeError("no port on 127.0.0.1 free for both UDP and TCP")

    def stop(self) -> Any:
        from twisted.internet.defer import gatherResults

        return gatherResults([self._udp.stopListening(), self._tcp.stopListening()])


class _Silent(DatagramProtocol):
    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        pass  # never answers: every query times out


class SilentServer:
    """A UDP port on 127.0.0.1 that swallows every query."""

    def __init__(self, reactor: Any) -> None:
        self._udp: IListeningPort = reactor.listenUDP(0, _Silent(), interface="127.0.0.1")
        self.port = self._udp.getHost().port

    def stop(self) -> Any:
        return self._udp.stopListening()


def resolver(reactor: Any, port: int, timeout: float = 2.0) -> client.Resolver:
    """A twisted.names client asking only 127.0.0.1:``port``, as mtaConfig's dnsServers would build it."""
    return client.Resolver(servers=[("127.0.0.1", port)], timeout=(timeout, timeout), reactor=reactor)
