"""Host and port forms in configuration: ``IP``, ``IPv4:port``, ``[IPv6]:port``."""

from __future__ import annotations

import ipaddress


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def split_dns_server(value: str) -> tuple[str, int]:
    """``(ip, port)`` of an ``mtaConfig.dnsServers`` entry: ``IP``, ``IPv4:port`` or ``[IPv6]:port`` (port 53
    when none is given). Raises ValueError with the reason; host names are refused (resolving the
    resolver's name would need a resolver)."""
    host, port_text = value, ""
    if value.startswith("["):
        host, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"{value!r}: expected '[IPv6]:port'")
        port_text = rest[1:] if rest else ""
        if not port_text and rest:
            raise ValueError(f"{value!r}: empty port")
        if ":" not in host:
            raise ValueError(f"{value!r}: brackets are for IPv6 addresses")
    elif value.count(":") == 1:
        host, _, port_text = value.partition(":")
        if not port_text:
            raise ValueError(f"{value!r}: empty port")
    if not _is_ip(host):
        raise ValueError(f"{value!r}: not an IP address (write IP, IP:port or [IPv6]:port)")
    if not port_text:
        return host, 53
    if not port_text.isascii() or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{value!r}: not a port number (1-65535): {port_text!r}")
    return host, int(port_text)
