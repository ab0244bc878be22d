"""DNS for the verification libraries, which look records up synchronously from a worker thread: each
lookup is handed to a ``twisted.names`` resolver on the reactor (the one built from ``mtaConfig``, so the
configured resolvers are asked and never the C library's) and the thread waits for its answer.

What a caller may rely on:

- Only called from a thread that is not the reactor's (it would wait for itself): the checks run in the
  reactor's thread pool (:mod:`dcrouter.processing.verification.checks`).
- A name that does not exist, or has no record of the type, is an empty answer. A timeout, SERVFAIL, REFUSED
  or a malformed answer raises :class:`DnsTemporaryError`, and is remembered in ``failures`` so a library
  that swallows the exception (dkimpy turns it into a plain failure) can still be told apart.
- One verification makes at most :data:`MAX_LOOKUPS` lookups and spends at most ``time_limit`` seconds
  waiting for answers (each lookup also at most what the resolver allows, ``mtaConfig.dnsTimeout`` per
  attempt); past either, lookups fail at once as temporary failures. The thread never waits on the reactor
  beyond that limit, so a stopping reactor (which joins its pool's threads) is never kept waiting by a
  lookup it will no longer answer.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any, cast

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.interfaces import IReactorFromThreads
from twisted.names import dns, error
from twisted.names.error import DNSNameError
from twisted.python.failure import Failure

#: Lookups one message's verification may make (SPF allows 10 mechanisms with lookups, each MX up to 10
#: names; DKIM a key per signature; DMARC two records).
MAX_LOOKUPS = 120
#: Seconds one message's verification may wait for DNS answers in all.
TIME_LIMIT = 30.0

_TEMPORARY = (
    DeferredTimeoutError,
    error.DNSQueryTimeoutError,
    error.DNSServerError,
    error.DNSQueryRefusedError,
    error.DNSFormatError,
    error.DNSNotImplementedError,
    error.DNSUnknownError,
    error.ResolverError,
    OSError,
)

_LOOKUP = {
    "A": "lookupAddress",
    "AAAA": "lookupIPV6Address",
    "MX": "lookupMailExchange",
    "PTR": "lookupPointer",
    "TXT": "lookupText",
}


class DnsTemporaryError(Exception):
    """A lookup that did not get an answer (timeout, SERVFAIL, REFUSED): the result is ``temperror``."""


class BlockingDns:
    """The lookups of one verification, from a worker thread, through ``resolver`` on ``reactor``."""

    def __init__(
        self,
        resolver: Any,
        reactor: IReactorFromThreads,
        time_limit: float = TIME_LIMIT,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._resolver = resolver
        self._reactor = reactor
        self._monotonic = monotonic
        self._deadline = monotonic() + time_limit
        self.lookups = 0
        #: Names whose lookup failed temporarily, in order.
        self.failures: list[str] = []

    def records(self, name: str, qtype: str) -> list[dns.RRHeader]:
        """The answer section for ``name`` and ``qtype`` (``A``, ``AAAA``, ``MX``, ``PTR``, ``TXT``), CNAMEs
        included; empty for NXDOMAIN and NODATA."""
        name = name.rstrip(".")
        self.lookups += 1
        if self.lookups > MAX_LOOKUPS:
            self.failures.append(name)
            raise DnsTemporaryError(f"more than {MAX_LOOKUPS} DNS lookups for one message")
        method = getattr(self._resolver, _LOOKUP[qtype])
        try:
            answers, _authority, _additional = self._on_reactor(method, name)
        except DNSNameError:
            return []
        except DnsTemporaryError:
            self.failures.append(name)
            raise
        except _TEMPORARY as e:
            self.failures.append(name)
            raise DnsTemporaryError(f"{qtype} {name}: {type(e).__name__}") from None
        return list(answers)

    def _on_reactor(self, method: Callable[[str], Deferred[Any]], name: str) -> Any:
        """``method(name)`` run on the reactor; its result here, or its exception raised here. Waits until
        the deadline at most (then DnsTemporaryError; the lookup's late answer is dropped)."""
        remaining = self._deadline - self._monotonic()
        if remaining <= 0:
            raise DnsTemporaryError(f"{name}: over the verification's DNS time limit")
        done = threading.Event()
        outcome: list[Any] = []

        def finish(result: Any) -> None:
            outcome.append(result)
            done.set()

        self._reactor.callFromThread(lambda: maybeDeferred(method, name).addBoth(finish))
        if not done.wait(remaining):
            raise DnsTemporaryError(f"{name}: no answer within the verification's DNS time limit")
        result = outcome[0]
        if isinstance(result, Failure):
            result.raiseException()
        return result

    def txt(self, name: str) -> list[bytes]:
        """Every TXT record of ``name``, each one's strings joined (RFC 7208 §3.3, RFC 6376 §3.6.2.2)."""
        # The resolver's answer holds the records of the name, or of the target of its CNAME chain.
        return [
            b"".join(cast(dns.Record_TXT, rr.payload).data)
            for rr in self.records(name, "TXT")
            if rr.type == dns.TXT
        ]

    def dkim_txt(self, name: bytes | str, timeout: float = 5) -> bytes | None:
        """dkimpy's ``dnsfunc``: the first TXT record of ``name`` or None. A temporary failure raises
        dkimpy's own DnsTimeoutError (dkimpy reports the signature failed; ``failures`` keeps the truth)."""
        import dkim

        text = name.decode("ascii", "replace") if isinstance(name, bytes) else name
        try:
            found = self.txt(text)
        except DnsTemporaryError as e:
            raise dkim.DnsTimeoutError(str(e)) from None
        return found[0] if found else None

    def spf_lookup(self, name: str, qtype: str) -> list[tuple[tuple[str, str], Any]]:
        """pyspf's lookup shape: ``((name, type), value)`` pairs, CNAMEs as ``((name, "CNAME"), target)``."""
        out: list[tuple[tuple[str, str], Any]] = []
        for rr in self.records(name, qtype):
            owner = str(rr.name)
            payload: Any = rr.payload
            if rr.type == dns.CNAME:
                out.append(((owner, "CNAME"), str(payload.name)))
            elif rr.type == dns.A and qtype == "A":
                out.append(((owner, "A"), payload.dottedQuad()))
            elif rr.type == dns.AAAA and qtype == "AAAA":
                out.append(((owner, "AAAA"), socket.inet_ntop(socket.AF_INET6, payload.address)))
            elif rr.type == dns.MX and qtype == "MX":
                out.append(((owner, "MX"), (payload.preference, str(payload.name))))
            elif rr.type == dns.PTR and qtype == "PTR":
                out.append(((owner, "PTR"), str(payload.name)))
            elif rr.type == dns.TXT and qtype == "TXT":
                out.append(((owner, "TXT"), list(payload.data)))
        return out
