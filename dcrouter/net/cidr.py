"""Sets of IP networks with fast membership tests, for relay networks and the proxy's allow/block lists."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

_MAPPED_V4 = ipaddress.IPv6Network("::ffff:0:0/96")


class CidrSet:
    """A set of IPv4 and IPv6 networks; ``ip in cidrs`` tells whether an address lies in any of them.

    Entries are CIDRs (``10.0.0.0/8``, ``2001:db8::/32``) or bare addresses (``/32``, ``/128``); host bits
    must be zero (``10.0.0.1/8`` is refused as a likely typo). An IPv4-mapped IPv6 address
    (``::ffff:1.2.3.4``, as a dual-stack socket reports IPv4 peers) is matched against the IPv4 networks, and
    an IPv4-mapped network entry also matches the plain IPv4 addresses it covers. A lookup costs one set
    probe per distinct prefix length, not a scan over the entries.
    """

    def __init__(self, cidrs: Iterable[str]) -> None:
        """Raises ValueError naming the first invalid entry."""
        # version -> prefix length -> network addresses shifted right past their host bits
        self._tables: dict[int, dict[int, set[int]]] = {4: {}, 6: {}}
        self._count = 0
        for entry in cidrs:
            network = _parse_network(entry)
            self._add(network)
            if network.version == 6 and network.prefixlen >= 96 and network.subnet_of(_MAPPED_V4):
                low_bits = int(network.network_address) & 0xFFFFFFFF
                self._add(ipaddress.IPv4Network((low_bits, network.prefixlen - 96)))
            self._count += 1

    def _add(self, network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> None:
        shift = network.max_prefixlen - network.prefixlen
        table = self._tables[network.version].setdefault(network.prefixlen, set())
        table.add(int(network.network_address) >> shift)

    def __len__(self) -> int:
        """The number of entries given (duplicates included)."""
        return self._count

    def __contains__(self, ip: object) -> bool:
        """True when ``ip`` (a string such as a transport's peer host) is an address inside one of the
        networks. Anything that is not an IP address (a UNIX socket path, ``""``) is not contained."""
        if not isinstance(ip, str):
            return False
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        mapped = address.ipv4_mapped if address.version == 6 else None
        if mapped is not None and self._lookup(mapped):
            return True
        return self._lookup(address)

    def _lookup(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        value = int(address)
        bits = address.max_prefixlen
        for prefixlen, networks in self._tables[address.version].items():
            if value >> (bits - prefixlen) in networks:
                return True
        return False

    def __repr__(self) -> str:
        return f"<CidrSet of {self._count} networks>"


def _parse_network(entry: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if not isinstance(entry, str):
        raise ValueError(f"{entry!r}: not a CIDR string")
    try:
        return ipaddress.ip_network(entry.strip(), strict=True)
    except ValueError as exc:
        raise ValueError(f"{entry!r}: not an IP network ({exc})") from None
