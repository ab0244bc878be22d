"""Tests for dcrouter.router.DcRouter: building from options, binding, start/stop order, TLS material, logs.

The order tests use the real reactor on 127.0.0.1 (a listening port is paused by not reading, which only a
real reactor shows); everything else runs on MemoryReactorClock and never touches the network.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import stat
import tempfile
from typing import Any

from cryptography import x509
from twisted.application.service import IService
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from dcrouter import DcRouter
from dcrouter.config import ConfigError, ConfigResult, load_options
from dcrouter.config.tls import SharedTlsConfig, TlsConfig
from dcrouter.interfaces import QueueUnavailable
from dcrouter.mail.envelope import Envelope
from dcrouter.mail.spooled import SpooledMessage
from dcrouter.net.certfiles import generate_self_signed
from dcrouter.net.listen import format_address
from dcrouter.queue.disk import DiskQueue
from dcrouter.queue.memory import MemoryQueue
from dcrouter.router import StartupError, smtp_tls_config
from dcrouter.smtp.protocol import ESMTPServerFactory
from dcrouter.smtp.service import describe_listener
from tests.test_net_listen import PortsReactor


def smtp_options(test: SynchronousTestCase, **smtp: Any) -> dict[str, Any]:
    """A small valid configuration: MX 2525, submission 2587, implicit TLS 2465, a memory queue.

    A memory queue makes its own spool directory, removed only when it is saved, and many routers here are
    never started or stopped: for the rest of the test, temporary directories go under its own."""
    temporary = os.path.abspath(test.mktemp())
    os.makedirs(temporary)
    test.patch(tempfile, "tempdir", temporary)
    config: dict[str, Any] = {
        "ports": [2525, 2587, 2465],
        "bindAddress": "127.0.0.1",
        "hostname": "mx.test",
        "implicitTlsPorts": [2465],
        "submissionPorts": [2587, 2465],
        "queueStorage": "memory",
        "tls": write_tls(test),
        "domainConfigs": [{"domains": ["example.test"], "targetIPs": ["127.0.0.1"]}],
    }
    config.update(smtp)
    return {"smtpConfig": config}


#: A well-formed scrypt hash (of no password anyone knows): these tests never authenticate.
A_HASH = "scrypt$10$8$1$AAAAAAAAAAAAAAAAAAAAAA==$" + "A" * 43 + "="

#: One MX port and nothing else (no implicit TLS, no submission port).
MX_ONLY: dict[str, Any] = {"ports": [2525], "implicitTlsPorts": [], "submissionPorts": []}


def past_validation(options: dict[str, Any], **smtp: Any) -> ConfigResult:
    """Validated ``options`` with smtpConfig fields then replaced: what a file edited after --check, or an
    embedding program's own DcRouterOptions, may hold. The router must still refuse it clearly."""
    result = load_options(options)
    assert result.options.smtp_config is not None
    changed = dataclasses.replace(result.options.smtp_config, **smtp)
    return ConfigResult(dataclasses.replace(result.options, smtp_config=changed), result.warnings)


def write_tls(test: SynchronousTestCase) -> dict[str, str]:
    directory = os.path.abspath(test.mktemp())
    os.makedirs(directory)
    cert, key = generate_self_signed("mx.test")
    paths = {"certPath": os.path.join(directory, "cert.pem"), "keyPath": os.path.join(directory, "key.pem")}
    for name, data in (("certPath", cert), ("keyPath", key)):
        with open(paths[name], "wb") as handle:
            handle.write(data)
    return paths


def with_ports(options: dict[str, Any], ports: list[int]) -> ConfigResult:
    """Validated options whose SMTP ports are then replaced, past validation, by ``ports`` (port 0 included:
    the loader refuses it, tests want the kernel to choose)."""
    return past_validation(options, ports=ports, implicit_tls_ports=[], submission_ports=[])


class CapturedLog:
    """Formatted text of every log event while installed."""

    def __init__(self, test: SynchronousTestCase) -> None:
        from twisted.logger import formatEvent

        self.lines: list[str] = []
        self._observer = lambda event: self.lines.append(formatEvent(event))
        globalLogPublisher.addObserver(self._observer)
        test.addCleanup(globalLogPublisher.removeObserver, self._observer)

    def text(self) -> str:
        return "\n".join(self.lines)


class OptionsTests(SynchronousTestCase):
    def test_mapping_is_validated(self) -> None:
        bad = {"smtpConfig": {"ports": [99999]}}
        error = self.assertRaises(ConfigError, DcRouter, bad, reactor=MemoryReactorClock())
        self.assertIn("smtpConfig.ports[0]", str(error))

    def test_accepts_mapping_result_and_options(self) -> None:
        mapping = smtp_options(self)
        result = load_options(mapping)
        for given in (mapping, result, result.options):
            router = DcRouter(given, reactor=MemoryReactorClock())
            self.assertEqual(router.options, result.options)
            self.assertTrue(IService.providedBy(router))

    def test_other_types_refused(self) -> None:
        self.assertRaises(TypeError, DcRouter, ["smtpConfig"], reactor=MemoryReactorClock())

    def test_no_smtp_config_serves_nothing(self) -> None:
        router = DcRouter({}, reactor=MemoryReactorClock())
        self.assertIsNone(router.queue)
        router.privilegedStartService()
        router.startService()
        self.successResultOf(router.when_ready())
        self.successResultOf(router.stopService())

    def test_queue_storage_selects_backend(self) -> None:
        memory = DcRouter(smtp_options(self), reactor=MemoryReactorClock())
        self.assertIsInstance(memory.queue, MemoryQueue)
        path = os.path.abspath(self.mktemp())
        disk = DcRouter(
            smtp_options(self, queueStorage="disk", persistentPath=path), reactor=MemoryReactorClock()
        )
        self.assertIsInstance(disk.queue, DiskQueue)

    def test_authenticator_only_with_users(self) -> None:
        self.assertIsNone(DcRouter(smtp_options(self), reactor=MemoryReactorClock()).authenticator)
        users = {"users": [{"username": "u", "password": A_HASH}]}
        router = DcRouter(smtp_options(self, auth=users), reactor=MemoryReactorClock())
        self.assertIsNotNone(router.authenticator)


class RecipientVerificationTests(SynchronousTestCase):
    def domain(self, **keys: Any) -> list[dict[str, Any]]:
        entry: dict[str, Any] = {"domains": ["example.test"], "targetIPs": ["127.0.0.1"]}
        entry.update(keys)
        return [entry]

    def test_only_when_some_entry_asks_for_it(self) -> None:
        self.assertIsNone(DcRouter(smtp_options(self), reactor=MemoryReactorClock()).verifier)
        listed = smtp_options(self, domainConfigs=self.domain(verifyRecipients="list", recipients=["a"]))
        router = DcRouter(listed, reactor=MemoryReactorClock())
        self.assertIsNotNone(router.verifier)

    def test_callout_connections_closed_at_stop(self) -> None:
        options = smtp_options(self, domainConfigs=self.domain(verifyRecipients="callout"))
        router = DcRouter(options, reactor=MemoryReactorClock())
        assert router.verifier is not None
        closed: list[bool] = []

        async def close() -> None:
            closed.append(True)

        self.patch(router.verifier, "close", close)
        router.privilegedStartService()
        router.startService()
        self.successResultOf(router.stopService())
        self.assertEqual(closed, [True])

    def test_recipients_file_gone_since_the_check(self) -> None:
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as handle:
            handle.write("alice\n")
        domains = self.domain(verifyRecipients="list", recipientsFile=path)
        result = load_options(smtp_options(self, domainConfigs=domains))
        os.remove(path)
        error = self.assertRaises(StartupError, DcRouter, result, reactor=MemoryReactorClock())
        self.assertIn("smtpConfig.domainConfigs: recipient verification:", str(error))
        self.assertIn(path, str(error))


class TlsSelectionTests(SynchronousTestCase):
    def test_smtp_tls_wins(self) -> None:
        result = load_options(smtp_options(self))
        own = result.options.smtp_config.tls  # type: ignore[union-attr]
        shared = SharedTlsConfig(cert_path="/shared/cert.pem", key_path="/shared/key.pem")
        options = dataclasses.replace(result.options, tls=shared)
        self.assertEqual(smtp_tls_config(options), own)

    def test_shared_tls_is_the_fallback_keeping_smtp_settings(self) -> None:
        result = load_options(smtp_options(self, tls={"minVersion": "TLSv1.3"}, **MX_ONLY))
        shared = SharedTlsConfig(cert_path="/shared/cert.pem", key_path="/shared/key.pem")
        options = dataclasses.replace(result.options, tls=shared)
        self.assertEqual(
            smtp_tls_config(options),
            TlsConfig(cert_path="/shared/cert.pem", key_path="/shared/key.pem", min_version="TLSv1.3"),
        )

    def test_none_without_certificate(self) -> None:
        result = load_options(smtp_options(self, tls=None, **MX_ONLY))
        self.assertIsNone(smtp_tls_config(result.options))


class DescribeTests(SynchronousTestCase):
    def test_roles(self) -> None:
        smtp = load_options(smtp_options(self)).options.smtp_config
        assert smtp is not None
        self.assertEqual(describe_listener(smtp, 2525, True, False), "mx, STARTTLS")
        self.assertEqual(describe_listener(smtp, 2525, True, True), "mx, STARTTLS, AUTH offered")
        self.assertEqual(describe_listener(smtp, 2525, False, False), "mx, no TLS")
        self.assertEqual(describe_listener(smtp, 2587, True, True), "submission, STARTTLS, AUTH required")
        self.assertEqual(describe_listener(smtp, 2465, True, True), "submission, implicit TLS, AUTH required")

    def test_format_address(self) -> None:
        self.assertEqual(format_address("127.0.0.1", 25), "127.0.0.1:25")
        self.assertEqual(format_address("::1", 25), "[::1]:25")


class BindingTests(SynchronousTestCase):
    """Binding on a MemoryReactorClock: which ports, on which address, with which factory."""

    def test_binds_every_port_in_privileged_start(self) -> None:
        clock = MemoryReactorClock()
        router = DcRouter(smtp_options(self), reactor=clock)
        self.assertEqual(clock.tcpServers, [])
        router.privilegedStartService()
        self.assertEqual(
            [(port, interface) for port, _, _, interface in clock.tcpServers],
            [(2525, "127.0.0.1"), (2587, "127.0.0.1"), (2465, "127.0.0.1")],
        )
        self.assertEqual(router.smtp_ports, {2525: 2525, 2587: 2587, 2465: 2465})
        factories = {port: factory for port, factory, _, _ in clock.tcpServers}
        self.assertIsInstance(factories[2525], ESMTPServerFactory)
        self.assertIsNotNone(factories[2525].tls_options)  # STARTTLS offered
        self.assertIsInstance(factories[2465], TLSMemoryBIOFactory)  # TLS from the first byte
        self.assertIsInstance(factories[2465].wrappedFactory, ESMTPServerFactory)
        # One policy and one queue for the whole router: connection counts span the ports.
        self.assertIs(factories[2525].policy, factories[2587].policy)
        assert router.queue is not None
        self.assertEqual(factories[2525].spool_directory, router.queue.spool_directory)

    def test_start_without_privileged_start_binds(self) -> None:
        """Embedded use may call startService alone; it binds then, once."""
        clock = MemoryReactorClock()
        router = DcRouter(smtp_options(self), reactor=clock)
        router.startService()
        self.addCleanup(router.stopService)
        self.successResultOf(router.when_ready())
        self.assertEqual(len(clock.tcpServers), 3)

    def test_minimal_configuration_starts_with_generated_certificate(self) -> None:
        """A hostname and one domainConfigs entry: ports 25/587/465 are defaults, 465 (implicit TLS) and 587
        (AUTH after STARTTLS) need a certificate the file does not name. One is generated under
        persistentPath on first start, logged as a warning, and reused by the next start."""
        captured = CapturedLog(self)
        persistent = os.path.abspath(self.mktemp())
        minimal = {
            "smtpConfig": {
                "hostname": "mx.example.com",
                "persistentPath": persistent,
                "domainConfigs": [{"domains": ["example.com"], "targetIPs": ["127.0.0.1"]}],
            }
        }
        clock = MemoryReactorClock()
        router = DcRouter(minimal, reactor=clock)
        router.privilegedStartService()
        self.assertEqual([port for port, _, _, _ in clock.tcpServers], [25, 587, 465])
        factories = {port: factory for port, factory, _, _ in clock.tcpServers}
        self.assertIsInstance(factories[465], TLSMemoryBIOFactory)
        self.assertIsNotNone(factories[25].tls_options)  # STARTTLS offered with the generated certificate
        cert_path = os.path.join(persistent, "tls", "cert.pem")
        key_path = os.path.join(persistent, "tls", "key.pem")
        self.assertEqual(stat.S_IMODE(os.stat(key_path).st_mode), 0o600)
        self.assertIn(
            f"generated a self-signed certificate for mx.example.com at {cert_path}", captured.text()
        )
        self.assertTrue(any(w.startswith("smtpConfig.tls: not set") for w in router.warnings))
        with open(cert_path, "rb") as handle:
            first = handle.read()
        again = DcRouter(minimal, reactor=MemoryReactorClock())
        again.privilegedStartService()
        with open(cert_path, "rb") as handle:
            self.assertEqual(handle.read(), first)

    def test_memory_queue_generates_certificate_in_memory(self) -> None:
        """A memory queue keeps nothing on disk, its certificate neither: persistentPath is not written."""
        persistent = os.path.abspath(self.mktemp())
        options = past_validation(smtp_options(self, persistentPath=persistent), tls=None)
        router = DcRouter(options, reactor=MemoryReactorClock())
        router.privilegedStartService()
        self.assertFalse(os.path.exists(persistent))
        self.assertIsNotNone(router.certificates.default)

    def test_missing_certificate_named(self) -> None:
        missing = os.path.join(os.path.abspath(self.mktemp()), "cert.pem")
        tls = TlsConfig(cert_path=missing, key_path=missing + ".key")
        router = DcRouter(past_validation(smtp_options(self), tls=tls), reactor=MemoryReactorClock())
        error = self.assertRaises(StartupError, router.privilegedStartService)
        self.assertIn(missing, str(error))

    def test_self_signed_generated_with_private_key(self) -> None:
        directory = os.path.join(os.path.abspath(self.mktemp()), "var", "tls")
        tls = {
            "certPath": os.path.join(directory, "cert.pem"),
            "keyPath": os.path.join(directory, "key.pem"),
            "selfSigned": True,
        }
        clock = MemoryReactorClock()
        router = DcRouter(smtp_options(self, tls=tls), reactor=clock)
        router.privilegedStartService()
        self.assertEqual(stat.S_IMODE(os.stat(tls["keyPath"]).st_mode), 0o600)
        with open(tls["certPath"], "rb") as handle:
            self.assertIn(b"BEGIN CERTIFICATE", handle.read())

        def pair_state() -> tuple[int, bytes]:
            mtime = os.stat(tls["certPath"]).st_mtime_ns
            with open(tls["keyPath"], "rb") as handle:
                return mtime, handle.read()

        # A second start reuses the pair rather than replacing it.
        before = pair_state()
        DcRouter(smtp_options(self, tls=tls), reactor=MemoryReactorClock()).privilegedStartService()
        self.assertEqual(before, pair_state())

    def test_self_signed_names_the_bind_address(self) -> None:
        """The generated certificate names bindAddress (and the hostname), so that a client verifying by IP
        accepts it; one generated for another address earlier is kept, with a warning."""
        directory = os.path.join(os.path.abspath(self.mktemp()), "tls")
        tls = {
            "certPath": os.path.join(directory, "cert.pem"),
            "keyPath": os.path.join(directory, "key.pem"),
            "selfSigned": True,
        }
        DcRouter(
            smtp_options(self, tls=tls, bindAddress="127.0.0.21"), reactor=MemoryReactorClock()
        ).privilegedStartService()
        with open(tls["certPath"], "rb") as handle:
            certificate = x509.load_pem_x509_certificate(handle.read())
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.DNSName), ["mx.test"])
        self.assertIn(ipaddress.ip_address("127.0.0.21"), san.get_values_for_type(x509.IPAddress))

        captured = CapturedLog(self)
        DcRouter(
            smtp_options(self, tls=tls, bindAddress="127.0.0.22"), reactor=MemoryReactorClock()
        ).privilegedStartService()
        self.assertIn(f"self-signed certificate {tls['certPath']} does not name 127.0.0.22", captured.text())

    def test_self_signed_leaves_out_the_wildcard_address(self) -> None:
        directory = os.path.join(os.path.abspath(self.mktemp()), "tls")
        tls = {
            "certPath": os.path.join(directory, "cert.pem"),
            "keyPath": os.path.join(directory, "key.pem"),
            "selfSigned": True,
        }
        captured = CapturedLog(self)
        router = DcRouter(smtp_options(self, tls=tls, bindAddress="0.0.0.0"), reactor=MemoryReactorClock())
        router.privilegedStartService()
        DcRouter(
            smtp_options(self, tls=tls, bindAddress="0.0.0.0"), reactor=MemoryReactorClock()
        ).privilegedStartService()
        with open(tls["certPath"], "rb") as handle:
            certificate = x509.load_pem_x509_certificate(handle.read())
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(
            san.get_values_for_type(x509.IPAddress),
            [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")],
        )
        self.assertNotIn("does not name", captured.text())

    def test_logs_listeners(self) -> None:
        captured = CapturedLog(self)
        users = {"users": [{"username": "u", "password": A_HASH}]}
        router = DcRouter(smtp_options(self, auth=users), reactor=MemoryReactorClock())
        router.privilegedStartService()
        router.startService()
        self.addCleanup(router.stopService)
        self.successResultOf(router.when_ready())
        text = captured.text()
        self.assertIn("SMTP listening on 127.0.0.1:2525 (mx, STARTTLS, AUTH offered)", text)
        self.assertIn("SMTP listening on 127.0.0.1:2587 (submission, STARTTLS, AUTH required)", text)
        self.assertIn("SMTP listening on 127.0.0.1:2465 (submission, implicit TLS, AUTH required)", text)

    def test_delivery_paused_queues_without_delivering(self) -> None:
        captured = CapturedLog(self)
        router = DcRouter(smtp_options(self, delivery={"paused": True}), reactor=MemoryReactorClock())
        router.privilegedStartService()
        router.startService()
        self.addCleanup(router.stopService)
        self.successResultOf(router.when_ready())
        assert router.delivery is not None
        self.assertEqual(router.delivery.get_delivery_stats()["paused"], 1)
        self.assertIn("delivery is paused (smtpConfig.delivery.paused)", captured.text())
        unpaused = DcRouter(smtp_options(self), reactor=MemoryReactorClock())
        assert unpaused.delivery is not None
        self.assertEqual(unpaused.delivery.get_delivery_stats()["paused"], 0)

    def test_stop_saves_queue_and_stops_threads(self) -> None:
        router = DcRouter(smtp_options(self), reactor=MemoryReactorClock())
        router.privilegedStartService()
        router.startService()
        self.successResultOf(router.when_ready())
        self.assertTrue(router.threadpool.started)
        self.successResultOf(router.stopService())
        self.assertFalse(router.threadpool.started)
        self.assertFalse(router.running)
        # save() closed the queue: the processor can enqueue nothing more.
        assert router.processor is not None
        processed = router.processor.process(Envelope("a@example.test"), SpooledMessage(3, data=b"abc"))
        self.assertIsInstance(self.failureResultOf(processed).value, QueueUnavailable)


class BindFailureTests(SynchronousTestCase):
    """A port that cannot be bound stops start-up with StartupError and one critical line naming it, and
    leaves nothing bound, the proxy's ports included."""

    PROXY = {"smartProxyConfig": {"bindAddress": "127.0.0.1", "fromPort": 8443, "targetIP": "127.0.0.1"}}

    def test_proxy_port_in_use(self) -> None:
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        router = DcRouter(self.PROXY, reactor=PortsReactor(taken=(8443,)))
        error = self.assertRaises(StartupError, router.privilegedStartService)
        message = "cannot listen for the proxy on 127.0.0.1:8443: [Errno 98] Address already in use"
        self.assertEqual(str(error), message)
        critical = [formatEvent(event) for event in events if event["log_level"] == LogLevel.critical]
        self.assertEqual(critical, [message])

    def test_smtp_port_in_use_releases_the_proxy_ports_too(self) -> None:
        reactor = PortsReactor(taken=(2587,))
        router = DcRouter({**self.PROXY, **smtp_options(self)}, reactor=reactor)
        error = self.assertRaises(StartupError, router.privilegedStartService)
        self.assertEqual(
            str(error), "cannot listen for SMTP on 127.0.0.1:2587: [Errno 98] Address already in use"
        )
        self.assertEqual(
            reactor.log,
            ["8443 bound", "8443 paused", "2525 bound", "2525 paused", "2525 closed", "8443 closed"],
        )
        self.assertEqual(router.smtp_ports, {})


class GatedQueue(MemoryQueue):
    """A memory queue whose load() waits for the test, and whose save() runs a check the test chooses."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.loaded: Deferred[dict[str, int]] = Deferred()
        self.on_save: Any = None

    def load(self) -> Deferred:
        return self.loaded.addCallback(lambda _: super(GatedQueue, self).load())

    def save(self) -> Deferred:
        check = Deferred.fromCoroutine(self.on_save()) if self.on_save else Deferred.fromCoroutine(_nothing())
        return check.addCallback(lambda _: super(GatedQueue, self).save())


async def _nothing() -> None:
    return None


class OrderTests(TestCase):
    """Start and stop order on the real reactor, one port chosen by the kernel on 127.0.0.1."""

    def router(self, queue: MemoryQueue) -> DcRouter:
        options = with_ports(smtp_options(self, **MX_ONLY), [0])
        router = DcRouter(options, reactor=reactor, queue=queue)
        return router

    def test_accepts_only_after_queue_loaded(self) -> Deferred[None]:
        queue = GatedQueue(clock=reactor)
        router = self.router(queue)
        router.privilegedStartService()
        router.startService()
        self.addCleanup(router.stopService)
        assert router.smtp is not None
        (listener,) = router.smtp.listeners
        # Bound (the kernel chose a port), but not accepting while the queue loads.
        self.assertNotEqual(router.smtp_ports[0], 0)
        self.assertNotIn(listener.listening, reactor.getReaders())
        ready = router.when_ready()
        self.assertNoResult(ready)
        queue.loaded.callback(None)
        self.assertIn(listener.listening, reactor.getReaders())
        return ready

    def test_listeners_stop_before_queue_saves(self) -> Deferred[None]:
        queue = GatedQueue(clock=reactor)
        queue.loaded.callback(None)
        router = self.router(queue)
        router.privilegedStartService()
        router.startService()
        port = router.smtp_ports[0]
        seen: list[str] = []

        async def port_closed_at_save() -> None:
            endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
            try:
                connected = await endpoint.connect(Factory.forProtocol(Protocol))
            except ConnectionRefusedError:
                seen.append("refused")
            else:
                connected.transport.abortConnection()
                seen.append("accepted")

        queue.on_save = port_closed_at_save

        async def go() -> None:
            await router.when_ready()
            await router.stopService()
            self.assertEqual(seen, ["refused"])

        return Deferred.fromCoroutine(go())

    def test_port_in_use_names_address_and_port(self) -> None:
        blocker = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        self.addCleanup(blocker.stopListening)
        taken = blocker.getHost().port
        options = with_ports(smtp_options(self, **MX_ONLY), [0, taken])
        router = DcRouter(options, reactor=reactor)
        error = self.assertRaises(StartupError, router.privilegedStartService)
        self.assertIn(f"127.0.0.1:{taken}", str(error))
        # The port bound before the failure was released again.
        self.assertEqual(router.smtp_ports, {})


class GracefulStopTests(SynchronousTestCase):
    """Stopping with a client in the middle of DATA: ingress drains first, so the queue and delivery are still
    up when its message ends; they stop only once the session is gone."""

    def test_queue_and_delivery_outlive_a_transaction_in_flight(self) -> None:
        clock = MemoryReactorClock()
        options = smtp_options(self, delivery={"paused": True}, **MX_ONLY)
        router = DcRouter(options, reactor=clock)
        router.privilegedStartService()
        router.startService()
        self.successResultOf(router.when_ready())
        assert router.queue is not None and router.delivery is not None
        (factory,) = [factory for port, factory, _, _ in clock.tcpServers if port == 2525]
        protocol = factory.buildProtocol(None)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 40000))
        protocol.makeConnection(transport)
        protocol.dataReceived(
            b"EHLO client.test\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n"
            b"Subject: in flight\r\n"
        )
        transport.clear()

        stopping = router.stopService()
        self.assertNoResult(stopping)
        self.assertTrue(router.delivery.running)
        protocol.dataReceived(b"\r\nbody\r\n.\r\n")
        reply, shutting_down = transport.value().decode().splitlines()
        self.assertRegex(reply, r"^250 2\.0\.0 Ok: queued as [0-9A-F]{20}$")
        self.assertEqual(shutting_down, "421 4.3.2 mx.test Service shutting down, try again later")
        item = self.successResultOf(router.queue.get(reply.split()[-1]))
        self.assertEqual(item.envelope.recipients, ["b@example.test"])
        self.assertNoResult(stopping)

        protocol.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(stopping)
        self.assertFalse(router.delivery.running)
        self.assertFalse(router.threadpool.started)
