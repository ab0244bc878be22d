"""From a Route to the addresses to connect to: A/AAAA for configured targets, MX (RFC 5321 §5.1) otherwise.

Decisions a caller may rely on:

- Addresses of one host come IPv4 first, then IPv6, each in the order DNS gave them; an address reached
  through two names is listed once (under its first name).
- CNAMEs are followed (up to 8 links), within one answer or by asking again for the chain's last name.
- For an MX route: MX hosts in preference order, equal preferences in random order; no MX records means
  the domain itself (implicit MX); a lone null MX (RFC 7505, exchange ``.``) is :class:`NullMX`, and a null
  MX next to real MX records is ignored. NXDOMAIN for the domain is :class:`NoSuchDomain`. MX hosts whose
  names do not resolve are skipped; when none is left, the failure is temporary if any lookup failed
  temporarily, else permanent (:class:`NoSuchDomain`: the domain points at hosts that do not exist, as Exim
  decides too).
- For a route with targets: IP literals are used as they are; host names are resolved through DNS only (no
  /etc/hosts, as Postfix's default ``smtp_host_lookup = dns``). Targets are operator configuration, so failing
  to resolve all of them is always :class:`DnsTemporaryFailure`: mail waits for the fix instead of bouncing.
- An address literal as MX domain (``mx:[192.0.2.1]``) is refused: :class:`AddressLiteralRefused`.
"""

from __future__ import annotations

import functools
import ipaddress
import random
import socket
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, TimeoutError, gatherResults, succeed
from twisted.internet.interfaces import IResolver
from twisted.names import client, dns, error

from dcrouter.config.delivery import MtaConfig
from dcrouter.delivery.route import Route
from dcrouter.net.hostport import split_dns_server
from dcrouter.net.reactor import IRouterReactor
from dcrouter.net.targets import Target

_MAX_CNAME_LINKS = 8


class MxLookupError(Exception):
    """Base of the lookup failures; ``code`` and ``enhanced`` are the reply delivery reports for them."""

    code = 451
    enhanced = "4.4.3"


class NullMX(MxLookupError):
    """RFC 7505: the domain declares that it accepts no mail. Permanent."""

    code = 556
    enhanced = "5.1.10"


class NoSuchDomain(MxLookupError):
    """The domain does not exist (NXDOMAIN), or has no host that could receive mail. Permanent."""

    code = 550
    enhanced = "5.1.2"


class AddressLiteralRefused(NoSuchDomain):
    """A recipient at an address literal (``user@[192.0.2.1]``) with no defaultServer to relay it: dcrouter
    does not deliver to IPs named by clients. Permanent."""


class DnsTemporaryFailure(MxLookupError):
    """SERVFAIL, REFUSED, a timeout, no reachable resolver: try again later."""

    code = 451
    enhanced = "4.4.3"


class _HostFailure(Exception):
    def __init__(self, name: str, temporary: bool, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.temporary = temporary


def _describe(exc: BaseException) -> str:
    if isinstance(exc, error.DNSNameError):
        return "no such domain (NXDOMAIN)"
    if isinstance(exc, error.DNSServerError):
        return "DNS server failure (SERVFAIL)"
    if isinstance(exc, error.DNSQueryRefusedError):
        return "DNS query refused"
    if isinstance(exc, TimeoutError):
        return "DNS timeout"
    return f"DNS lookup failed ({type(exc).__name__}: {exc})"


def _text(name: dns.Name) -> str:
    return name.name.decode("ascii", "replace").lower().rstrip(".")


def _address(record: Any) -> str:
    family = socket.AF_INET if record.TYPE == dns.A else socket.AF_INET6
    return socket.inet_ntop(family, record.address)


class MxResolver:
    """Turns a Route into an ordered list of :class:`Target` (see the module docstring for the rules)."""

    def __init__(self, resolver: IResolver, *, rng: random.Random | None = None) -> None:
        """``rng`` orders MX hosts of equal preference (a seeded one makes tests repeatable)."""
        self._resolver = resolver
        self._rng = rng if rng is not None else random.Random()

    def targets(self, route: Route) -> Deferred[list[Target]]:
        """Deferred firing with a non-empty list of Targets, or failing with :class:`NullMX`,
        :class:`NoSuchDomain` (including :class:`AddressLiteralRefused`) or :class:`DnsTemporaryFailure`.
        Any other failure is a bug."""
        if route.mx_domain is not None:
            return Deferred.fromCoroutine(self._mx_targets(route.mx_domain, route.port))
        literal = _literal_targets(tuple(route.targets), route.port)
        if literal is not None:
            # Only IP literals (a smarthost by address): nothing to resolve, per message or ever.
            return succeed(list(literal))
        return Deferred.fromCoroutine(self._configured_targets(route.targets, route.port))

    async def _configured_targets(self, hosts: Sequence[str], port: int) -> list[Target]:
        resolved = await self._resolve_all(hosts)
        targets = _targets(resolved, port)
        if not targets:
            reasons = "; ".join(str(r) for _, r in resolved if isinstance(r, _HostFailure))
            raise DnsTemporaryFailure(f"no address for any target: {reasons or 'no A/AAAA records'}")
        return targets

    async def _mx_targets(self, domain: str, port: int) -> list[Target]:
        if domain.startswith("["):
            raise AddressLiteralRefused(
                f"{domain}: address literals are delivered only through defaultServer"
            )
        try:
            answers = await self._chase(self._resolver.lookupMailExchange, domain, dns.MX)
        except error.DNSNameError:
            raise NoSuchDomain(f"{domain}: no such domain (NXDOMAIN)") from None
        except Exception as exc:  # noqa: BLE001 - any other lookup failure (SERVFAIL, timeout) is temporary
            raise DnsTemporaryFailure(f"{domain}: MX lookup: {_describe(exc)}") from None
        hosts = self._mx_hosts(domain, answers)
        resolved = await self._resolve_all(hosts)
        targets = _targets(resolved, port)
        if targets:
            return targets
        failures = [r for _, r in resolved if isinstance(r, _HostFailure)]
        reasons = "; ".join(str(f) for f in failures) or "no A/AAAA records"
        if any(f.temporary for f in failures):
            raise DnsTemporaryFailure(f"{domain}: no usable mail host: {reasons}")
        if hosts == [domain]:
            raise NoSuchDomain(f"{domain}: no MX and no A/AAAA records")
        raise NoSuchDomain(f"{domain}: no MX host has an address: {reasons}")

    def _mx_hosts(self, domain: str, records: list[Any]) -> list[str]:
        """MX exchanges in preference order (ties shuffled); ``[domain]`` for implicit MX."""
        if not records:
            return [domain]
        real = [(r.preference, _text(r.name)) for r in records if _text(r.name)]
        if not real:
            raise NullMX(f"{domain}: the domain accepts no mail (null MX, RFC 7505)")
        by_preference: dict[int, list[str]] = {}
        for preference, host in real:
            group = by_preference.setdefault(preference, [])
            if host not in group:
                group.append(host)
        hosts: list[str] = []
        for preference in sorted(by_preference):
            group = by_preference[preference]
            self._rng.shuffle(group)
            hosts.extend(h for h in group if h not in hosts)
        return hosts

    async def _resolve_all(self, hosts: Sequence[str]) -> list[tuple[str, list[str] | _HostFailure]]:
        """Each host with its addresses or why it has none; lookups run concurrently."""
        lookups = [Deferred.fromCoroutine(self._host_addresses(host)) for host in hosts]
        results: list[list[str] | _HostFailure] = await gatherResults(lookups, consumeErrors=True)
        return list(zip(hosts, results, strict=True))

    async def _host_addresses(self, host: str) -> list[str] | _HostFailure:
        """IPv4 then IPv6 addresses of ``host`` (an IP literal is its own address); a failure is returned,
        not raised, so one bad MX host does not hide the others."""
        try:
            ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            return [host]
        queries = (self._resolver.lookupAddress, dns.A), (self._resolver.lookupIPV6Address, dns.AAAA)
        pending = [Deferred.fromCoroutine(self._chase(lookup, host, rtype)) for lookup, rtype in queries]
        found: list[str] = []
        failures: list[BaseException] = []
        for answer in pending:
            try:
                found.extend(_address(r) for r in await answer)
            except Exception as exc:  # noqa: BLE001 - every lookup failure is a reason to skip this host
                failures.append(exc)
        if found:
            # One family answering is enough; a broken AAAA answer (common) must not stop IPv4 delivery.
            return list(dict.fromkeys(found))
        temporary = [f for f in failures if not isinstance(f, error.DNSNameError)]
        if temporary:
            return _HostFailure(host, True, _describe(temporary[0]))
        if failures:
            return _HostFailure(host, False, _describe(failures[0]))
        return _HostFailure(host, False, "no A/AAAA records")

    async def _chase(self, lookup: Callable[..., Any], name: str, rtype: int) -> list[Any]:
        """The payloads of type ``rtype`` for ``name``, following CNAMEs inside each answer and, when an
        answer ends in a CNAME without the records, by asking again for the last name."""
        current = name.lower().rstrip(".")
        asked: set[str] = set()
        for _ in range(_MAX_CNAME_LINKS):
            asked.add(current)
            answers, _authority, _additional = await lookup(current)
            by_name: dict[str, list[Any]] = {}
            for header in answers:
                by_name.setdefault(_text(header.name), []).append(header.payload)
            for _link in range(_MAX_CNAME_LINKS):
                records = by_name.get(current, [])
                wanted = [r for r in records if rtype == r.TYPE]
                if wanted:
                    return wanted
                aliases = [r for r in records if r.TYPE == dns.CNAME]
                if not aliases:
                    break
                current = _text(aliases[0].name)
            if current in asked:
                return []
        raise error.DNSUnknownError(f"{name}: CNAME chain longer than {_MAX_CNAME_LINKS} links")


@functools.lru_cache(maxsize=256)
def _literal_targets(hosts: tuple[str, ...], port: int) -> tuple[Target, ...] | None:
    """The targets of configured ``hosts`` when every one is an IP literal (as :meth:`MxResolver.targets`
    would resolve them), else None."""
    if not hosts:
        return None
    for host in hosts:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return None
    return tuple(_targets([(host, [host]) for host in hosts], port))


def _targets(resolved: list[tuple[str, list[str] | _HostFailure]], port: int) -> list[Target]:
    seen: set[str] = set()
    targets: list[Target] = []
    for host, result in resolved:
        if isinstance(result, _HostFailure):
            continue
        for address in result:
            if address not in seen:
                seen.add(address)
                targets.append(Target(host=host, address=address, port=port))
    return targets


def make_resolver(
    mta: MtaConfig | None, reactor: IRouterReactor, resolv_conf: str = "/etc/resolv.conf"
) -> IResolver:
    """A ``twisted.names.client.Resolver`` asking ``mta.dnsServers`` in order (or the nameservers of
    ``resolv_conf``, read once: a change needs a restart), each query attempt waiting ``mta.dnsTimeout``;
    every server is tried twice before a lookup fails with a timeout.

    Why not Twisted's own resolv.conf handling: it re-reads the file on a timer that nothing stops, which
    would leave a timer running in an embedding program after the router stopped."""
    config = mta if mta is not None else MtaConfig()
    seconds = config.dns_timeout / 1000
    timeout = (seconds, seconds)
    if config.dns_servers:
        servers = [split_dns_server(s) for s in config.dns_servers]
    else:
        servers = system_nameservers(resolv_conf)
    return client.Resolver(servers=servers, timeout=timeout, reactor=reactor)


def system_nameservers(path: str) -> list[tuple[str, int]]:
    """The ``nameserver`` lines of a resolv.conf(5) file; ``127.0.0.1:53`` when there are none or the file
    cannot be read (what the C library does too)."""
    servers = []
    try:
        with open(path, encoding="utf-8", errors="replace") as conf:
            for line in conf:
                fields = line.split()
                if len(fields) >= 2 and fields[0] == "nameserver":
                    servers.append((fields[1], 53))
    except OSError:
        pass
    return servers or [("127.0.0.1", 53)]
