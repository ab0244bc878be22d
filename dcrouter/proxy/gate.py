"""What a request must pass on an HTTP route before it is forwarded or answered: the route's request rate
(``security.rateLimit``, through the traffic-control limiter) and then its credentials (``basicAuth`` or
``jwtAuth``). The rate comes first: it is cheap, and it bounds the password checks a client can cause.

:meth:`RequestGate.check` fires when the request may go on, and fails with an
:class:`~dcrouter.proxy.httpmessage.HttpError` carrying the answer otherwise (``429`` with ``Retry-After``,
``401`` with a challenge); the forwarder and the proxy's own answerer write it.
"""

from __future__ import annotations

import math
from typing import Any

from twisted.internet.defer import Deferred, succeed

from dcrouter.limits.limiter import ALLOWED, Charge, Limit, Limiter, Verdict
from dcrouter.proxy.basicauth import BasicAuth
from dcrouter.proxy.httpmessage import HttpError, RequestHead
from dcrouter.proxy.jwtauth import JwtAuth
from dcrouter.proxy.routes import RequestRateRule, request_of


class TooManyRequests(HttpError):
    """A ``429`` with ``Retry-After`` (whole seconds, at least 1) in ``extra``."""

    def __init__(self, reason: str, retry_after: float) -> None:
        super().__init__(429, reason)
        self.extra = (b"Retry-After: %d" % max(1, math.ceil(retry_after)),)


class RequestRate:
    """One route's ``security.rateLimit`` in ``limiter`` (limit named ``proxy.requests.<route>``)."""

    def __init__(self, route_name: str, rule: RequestRateRule, limiter: Limiter) -> None:
        self.rule = rule
        self.limiter = limiter
        what = rule.header_name if rule.key_by == "header" else rule.key_by
        self.limit = Limit(f"proxy.requests.{route_name}", f"requests to {route_name} per {what}", rule.rate)

    def key(self, head: RequestHead, client_ip: str) -> str:
        if self.rule.key_by == "ip":
            return client_ip
        if self.rule.key_by == "path":
            return request_of(head.target, ()).path
        assert self.rule.header_name is not None
        values = head.fields.get_all(self.rule.header_name.lower().encode("ascii"))
        return b",".join(values).decode("latin-1")

    def check(self, head: RequestHead, client_ip: str) -> Deferred[None]:
        verdict = self.limiter.check([Charge(self.limit, self.key(head, client_ip))])
        if isinstance(verdict, Deferred):
            return verdict.addCallback(self._decide)
        try:
            self._decide(verdict)
        except HttpError as error:
            failed: Deferred[None] = Deferred()
            failed.errback(error)
            return failed
        return succeed(None)

    def _decide(self, verdict: Verdict) -> None:
        if verdict is not ALLOWED and verdict.refused is not None:
            raise TooManyRequests(verdict.refused.description, verdict.retry_after)


class RequestGate:
    """The checks one route's requests pass, in order: the rate, then the credentials."""

    def __init__(self, rate: RequestRate | None, auth: BasicAuth | JwtAuth | None) -> None:
        self.rate = rate
        self.auth = auth

    def check(self, head: RequestHead, client_ip: str) -> Deferred[Any]:
        auth = self.auth
        checking: Deferred[Any] = self.rate.check(head, client_ip) if self.rate is not None else succeed(None)
        if auth is not None:
            checking.addCallback(lambda _: auth.check(head.fields.get(b"authorization")))
        return checking
