"""The ``rspamd`` spam engine: rspamd's HTTP protocol (``POST /checkv2`` to a normal worker, port 11333).

The message goes as the request body, streamed from the file; the envelope goes as request headers (``From``,
``Rcpt`` once per recipient, ``IP``, ``Helo``, ``User``, ``Queue-Id``) so rspamd's SPF and reputation rules
see what the SMTP session saw. rspamd answers JSON: ``score``, ``required_score``, ``action`` and
``symbols``. As with spamd, the verdict compares the score with the configured threshold, and the result
carries SpamAssassin-style tag fields, so downstream filters need not know which engine ran.
"""

from __future__ import annotations

import json
import math
from typing import Any

from treq.client import HTTPClient
from treq.content import collect
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.task import Cooperator
from twisted.web.client import Agent, FileBodyProducer, ResponseFailed
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IResponse
from zope.interface import implementer

from dcrouter.config.processing import ScannerConfig
from dcrouter.interfaces import IScanner
from dcrouter.net.reactor import IRouterReactor
from dcrouter.processing.message import Draft, ScannerUnavailable, ScanResult, Verdict
from dcrouter.processing.scanners.daemon import MAX_REPLY, DaemonScanner, within
from dcrouter.processing.scanners.spamd import SYMBOL_NAME, spam_result

DEFAULT_PORT = 11333
DEFAULT_MAX_SIZE = 1024 * 1024


@implementer(IAgentEndpointFactory)
class _UnixSocket:
    """Every request to rspamd's Unix socket, whatever the URL says."""

    def __init__(self, reactor: IRouterReactor, path: str, timeout: float) -> None:
        self._reactor = reactor
        self._path = path
        self._timeout = timeout

    def endpointForURI(self, uri: Any) -> UNIXClientEndpoint:
        return UNIXClientEndpoint(self._reactor, self._path, timeout=self._timeout)


def parse_reply(data: bytes) -> tuple[float, tuple[str, ...]]:
    """The score and the symbol names (sorted) of a /checkv2 JSON reply; a reply that is not JSON, or whose
    ``score`` is not a finite number, is ScannerUnavailable."""
    try:
        reply = json.loads(data)
    except ValueError as e:
        raise ScannerUnavailable(f"rspamd: reply is not JSON ({e})") from e
    if not isinstance(reply, dict):
        raise ScannerUnavailable("rspamd: reply is not a JSON object")
    score = reply.get("score")
    if isinstance(score, bool) or not isinstance(score, int | float) or not math.isfinite(score):
        raise ScannerUnavailable("rspamd: reply without a numeric score")
    symbols = reply.get("symbols")
    names = [name for name in symbols if SYMBOL_NAME.fullmatch(name)] if isinstance(symbols, dict) else []
    return float(score), tuple(sorted(names))


def envelope_headers(message: Draft) -> Headers:
    """The request headers that tell rspamd the SMTP envelope (values without CR/LF, as the envelope's)."""
    envelope = message.envelope
    fields = [("From", envelope.mail_from), ("Queue-Id", message.queue_id)]
    fields += [("Rcpt", recipient) for recipient in envelope.recipients]
    fields += [("IP", envelope.peer_host), ("Helo", envelope.helo), ("User", envelope.auth_user or "")]
    headers = Headers()
    for name, value in fields:
        if value or name == "From":  # From is sent even for the null sender
            headers.addRawHeader(name, value.replace("\r", "").replace("\n", "").encode("utf-8"))
    return headers


@implementer(IScanner)
class RspamdScanner(DaemonScanner):
    """An IScanner asking rspamd at ``config.host``/``config.port`` (default 11333) or ``config.socket``.
    ``agent`` replaces the HTTP agent (tests; a shared connection pool)."""

    daemon = "rspamd"
    default_port = DEFAULT_PORT
    default_max_size = DEFAULT_MAX_SIZE

    def __init__(self, config: ScannerConfig, reactor: IRouterReactor, agent: IAgent | None = None) -> None:
        super().__init__(config, reactor)
        seconds = max(config.timeout / 1000.0, 0.001)
        if agent is None:
            if config.socket is not None:
                agent = Agent.usingEndpointFactory(reactor, _UnixSocket(reactor, config.socket, seconds))
            else:
                agent = Agent(reactor, connectTimeout=seconds)
        if config.socket is not None:
            self._url = "http://localhost/checkv2"
        else:
            port = config.port if config.port is not None else DEFAULT_PORT
            host = f"[{config.host}]" if ":" in config.host else config.host
            self._url = f"http://{host}:{port}/checkv2"
        self._http = HTTPClient(agent)
        # The body is read on the reactor's schedule, not the global reactor's.
        self._cooperator = Cooperator(scheduler=lambda work: reactor.callLater(0, work))

    def scan(self, message: Draft) -> Deferred[ScanResult]:
        if message.source.size > self._max_size:
            return succeed(ScanResult(self.name, Verdict.CLEAN, reason="too large, not checked"))
        return within(self._check(message), self._config.timeout, self._reactor, self._where)

    async def _check(self, message: Draft) -> ScanResult:
        body = message.open_received()
        try:
            response: IResponse = await self._http.request(
                "POST",
                self._url,
                headers=envelope_headers(message),
                data=FileBodyProducer(body, self._cooperator),
                unbuffered=True,
                # treq types this with a private interface of three of IRouterReactor's parts.
                reactor=self._reactor,  # type: ignore[arg-type]
            )
            if response.code != 200:
                raise ScannerUnavailable(f"rspamd: HTTP {response.code}")
            chunks: list[bytes] = []

            def received(data: bytes) -> None:
                chunks.append(data)
                if sum(map(len, chunks)) > MAX_REPLY:
                    raise ScannerUnavailable(f"rspamd: reply longer than {MAX_REPLY} bytes")

            await collect(response, received)
        except ResponseFailed as e:
            reasons = ", ".join(reason.getErrorMessage() for reason in e.reasons)
            raise ScannerUnavailable(f"rspamd: {reasons or 'no response'}") from e
        finally:
            body.close()
        score, symbols = parse_reply(b"".join(chunks))
        return spam_result(self.name, score, self._config.threshold, symbols)
