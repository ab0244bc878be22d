"""Active health checks under load: a loop of requests through a real route to two twisted.web backends on
127.0.0.1 and 127.0.0.2 (the same port); one is killed and later restarted. Its checks take it out within
``fall * interval`` and bring it back after ``rise`` passes, and no request fails meanwhile: a connection a
dead backend refuses fails over to the other target at once, and once the checks hold it down nobody tries
it at all (docs/proxy.md, "Health checks")."""

from __future__ import annotations

import socket
from collections import Counter
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.ssl import CertificateOptions, PrivateCertificate
from twisted.internet.task import deferLater
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.resource import Resource
from twisted.web.server import Site

from dcrouter.events import CallableSink, Event, EventBus
from dcrouter.net.healthcheck import HealthCheckRule
from dcrouter.proxy.routes import BackendVerification, PortRange, ProxyRoute, ProxyTarget, RouteTable
from dcrouter.proxy.service import ProxyService
from dcrouter.proxy.session import ProxyContext, ProxySettings
from tests.ca import TestCA

A, B = "127.0.0.1", "127.0.0.2"


class Named(Resource):
    isLeaf = True

    def __init__(self, name: bytes) -> None:
        super().__init__()
        self.name = name

    def render_GET(self, request: Any) -> bytes:
        return self.name


def _shared_port() -> int:
    """A port free on both loopback addresses."""
    for _ in range(20):
        with socket.socket() as first:
            first.bind((A, 0))
            port = int(first.getsockname()[1])
            with socket.socket() as second:
                try:
                    second.bind((B, port))
                except OSError:
                    continue
        return port
    raise SkipTest("no port free on both 127.0.0.1 and 127.0.0.2")


class HealthUnderLoadTests(TestCase):
    timeout = 60

    def listen(self, address: str, port: int) -> IListeningPort:
        listening = reactor.listenTCP(port, Site(Named(address.encode())), interface=address)
        self.addCleanup(lambda: listening.stopListening() if listening.connected else None)
        return listening

    async def test_a_killed_backend_goes_out_and_a_restarted_one_comes_back(self) -> None:
        try:
            port = _shared_port()
        except OSError as error:
            raise SkipTest(f"127.0.0.2 is not usable here: {error}") from error
        self.listen(A, port)
        b = self.listen(B, port)
        rule = HealthCheckRule(kind="http", path="/health", interval=0.2, timeout=0.5, rise=2, fall=2)
        route = ProxyRoute(
            name="app",
            priority=0,
            ports=(PortRange(0, 0),),
            domains=(),
            client_ips=None,
            allow=None,
            block=None,
            target=ProxyTarget((A, B), port, health_check=rule),
            tls_mode="passthrough",
            max_connections=None,
            connection_timeout_ms=None,
            source="app",
        )
        events: list[Event] = []
        bus = EventBus()
        bus.subscribe(CallableSink(events.append), ["proxy.*"])
        service = ProxyService(
            [route],
            ProxySettings(),
            reactor=reactor,
            bind_address=A,
            ports=[0],
            drain_timeout=0.5,
            events=bus,
        )
        service.startService()
        self.addCleanup(service.stopService)
        url = f"http://{A}:{service.ports[0]}/".encode()
        # A new connection per request, so that every request is routed (and balanced) afresh.
        agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
        served: list[tuple[str, bytes]] = []
        failures: list[str] = []
        phase = ["both"]

        async def load(until: Deferred[None]) -> None:
            while not until.called:
                try:
                    response = await agent.request(b"GET", url)
                    body = await readBody(response)
                    served.append((phase[0], body))
                except Exception as error:  # noqa: BLE001 - every failure is counted, whatever it is
                    failures.append(f"{phase[0]}: {error!r}")

        async def pause(seconds: float) -> None:
            await deferLater(reactor, seconds, lambda: None)

        async def until(state: bool, within: float) -> float:
            """Seconds until the checks hold B ``state``; fails after ``within`` (a loaded machine's reactor
            turns late, so the window is generous; the quiet figure is fall or rise times the interval)."""
            started = reactor.seconds()
            while service.context.monitor.states()[("app", f"{B}:{port}")] is not state:
                self.assertLess(reactor.seconds() - started, within, f"B not {state} within {within} s")
                await pause(0.05)
            return reactor.seconds() - started

        stop: Deferred[None] = Deferred()
        loop = Deferred.fromCoroutine(load(stop))
        await pause(0.6)
        phase[0] = "killed"
        await b.stopListening()
        await until(False, 10.0)  # fall * interval (+ a timeout) on a quiet machine: the checks take B out
        phase[0] = "down"
        await pause(0.6)
        phase[0] = "restarted"
        self.listen(B, port)
        await until(True, 10.0)  # rise * interval: back in
        phase[0] = "back"
        for _ in range(100):  # until B has served a request again (a few turns; 5 s at most)
            await pause(0.05)
            if any(p == "back" and body == B.encode() for p, body in served):
                break
        stop.callback(None)
        await loop

        self.assertEqual(failures, [])
        by_phase = Counter((p, body) for p, body in served)
        self.assertGreater(by_phase[("both", b"127.0.0.2")], 0)
        self.assertGreater(by_phase[("both", b"127.0.0.1")], 0)
        # Held down: not one request reached (or was even tried at) B.
        self.assertEqual(by_phase[("down", b"127.0.0.2")], 0)
        self.assertGreater(by_phase[("down", b"127.0.0.1")], 0)
        self.assertGreater(by_phase[("back", b"127.0.0.2")], 0)
        self.assertEqual(
            [(e.type, e.fields["target"]) for e in events],
            [("proxy.target_down", f"{B}:{port}"), ("proxy.target_up", f"{B}:{port}")],
        )


class TlsCheckTests(TestCase):
    """``type = "tls"`` on a re-encrypting route verifies the backend as requests would be: a backend
    whose certificate does not chain to ``backendCaFile`` is taken out, one that does stays in."""

    timeout = 30

    async def check_state(self, trusted: TestCA, signer: TestCA) -> bool:
        cert, key = signer.issue("backend.test")
        loaded = PrivateCertificate.loadPEM(cert + key)
        options = CertificateOptions(privateKey=loaded.privateKey.original, certificate=loaded.original)
        listening = reactor.listenSSL(0, Site(Named(b"tls")), options, interface=A)
        self.addCleanup(listening.stopListening)
        ca_file = self.mktemp()
        with open(ca_file, "wb") as handle:
            handle.write(trusted.cert_pem)
        rule = HealthCheckRule(kind="tls", interval=0.1, timeout=1.0, rise=1, fall=2)
        route = ProxyRoute(
            name="tls",
            priority=0,
            ports=(PortRange(0, 0),),
            domains=(),
            client_ips=None,
            allow=None,
            block=None,
            target=ProxyTarget(
                (A,),
                int(listening.getHost().port),
                health_check=rule,
                verification=BackendVerification(ca_file=ca_file, server_name="backend.test"),
            ),
            tls_mode="terminate-and-reencrypt",
            max_connections=None,
            connection_timeout_ms=None,
            source="tls",
        )
        context = ProxyContext(RouteTable([route]), ProxySettings(), reactor)
        context.monitor.start()
        self.addCleanup(context.monitor.stop)
        await deferLater(reactor, 0.8, lambda: None)
        (up,) = context.monitor.states().values()
        return up

    async def test_an_unknown_ca_takes_the_target_out(self) -> None:
        self.assertFalse(await self.check_state(TestCA(), TestCA("another CA")))

    async def test_a_verified_backend_stays_in(self) -> None:
        ca = TestCA()
        self.assertTrue(await self.check_state(ca, ca))
