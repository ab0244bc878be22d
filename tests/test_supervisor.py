"""The workers' supervisor (dcrouter.supervisor) on a Clock: workers started with the sockets, a dead worker
restarted with back-off, signals forwarded, a stop that waits for every worker. Real processes through
twistd: tests/integration/test_workers_twistd.py."""

from __future__ import annotations

import json
import socket
from typing import Any

from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from dcrouter import supervisor as sup
from dcrouter.config import ConfigError, load_options
from dcrouter.config.options import resolve_workers
from dcrouter.net.listen import ListenError, inherit, listen_paused
from dcrouter.router import DcRouter
from dcrouter.supervisor import SOCKETS_ENV, WORKER_ENV, Supervisor, listen_addresses, worker_sockets


class FakeProcess:
    """The transport spawn returns: records the signals sent."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[str] = []

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


class Spawner:
    def __init__(self) -> None:
        self.started: list[tuple[Any, list[str], dict[str, str], dict[int, Any], FakeProcess]] = []

    def __call__(self, proto: Any, argv: list[str], env: dict[str, str], fds: dict[int, Any]) -> FakeProcess:
        process = FakeProcess(1000 + len(self.started))
        self.started.append((proto, argv, env, fds, process))
        return process

    def end(self, index: int, reason: Failure) -> None:
        """The latest process of worker ``index`` ends."""
        for proto, *_rest, _process in reversed(self.started):
            if proto.index == index:
                proto.processEnded(reason)
                return
        raise AssertionError(f"no worker {index}")


class FakeReactor(Clock):
    def callFromThread(self, f: Any, *args: Any) -> None:
        f(*args)


def killed() -> Failure:
    return Failure(ProcessTerminated(signal=9))


class SupervisorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = FakeReactor()
        self.spawn = Spawner()
        self.supervisor = Supervisor(
            "/etc/dcrouter.toml",
            2,
            [("127.0.0.1", 0)],
            reactor=self.reactor,
            spawn=self.spawn,
            environ={"PATH": "/usr/bin"},
            install_signals=False,
        )
        self.supervisor.privilegedStartService()
        self.addCleanup(self.supervisor.close_sockets)
        self.supervisor.startService()

    def test_workers_get_their_index_and_the_sockets(self) -> None:
        self.assertEqual(len(self.spawn.started), 2)
        sock = self.supervisor.sockets[("127.0.0.1", 0)]
        for index, (_proto, argv, env, fds, _process) in enumerate(self.spawn.started):
            self.assertEqual(env[WORKER_ENV], str(index))
            self.assertEqual(env["PATH"], "/usr/bin")
            self.assertEqual(json.loads(env[SOCKETS_ENV]), [["127.0.0.1", 0, sock.fileno()]])
            self.assertEqual(fds[sock.fileno()], sock.fileno())
            self.assertEqual(fds[0], "w")
            self.assertEqual(argv[-2:], ["--config", "/etc/dcrouter.toml"])
            self.assertIn("dcrouter", argv)
            self.assertEqual(worker_sockets(env), (index, {("127.0.0.1", 0): sock.fileno()}))
        # The socket is really listening: a client connects to it (the kernel completes the handshake).
        client = socket.create_connection(sock.getsockname()[:2], timeout=5)
        client.close()

    def test_dead_worker_restarted_with_backoff(self) -> None:
        delays = []
        for _ in range(5):
            self.spawn.end(1, killed())
            self.assertNotIn(1, self.supervisor.workers)
            delay = self.reactor.getDelayedCalls()[0].getTime() - self.reactor.seconds()
            delays.append(delay)
            self.reactor.advance(delay)
            self.assertIn(1, self.supervisor.workers)
        self.assertEqual(delays, [0.5, 1.0, 2.0, 4.0, 8.0])
        self.assertEqual(len(self.spawn.started), 2 + 5)
        self.assertEqual(self.spawn.started[-1][2][WORKER_ENV], "1")
        # Worker 0 was never touched.
        self.assertEqual(self.supervisor.workers[0].pid, 1000)

    def test_backoff_capped_and_reset_after_a_stable_run(self) -> None:
        for _ in range(12):
            self.spawn.end(0, killed())
            self.reactor.advance(self.supervisor.restart_delay(0))
        self.assertEqual(self.supervisor.restart_delay(0), sup.RESTART_DELAY_MAX)
        self.reactor.advance(sup.STABLE_AFTER)
        self.spawn.end(0, killed())
        self.assertEqual(self.supervisor.restart_delay(0), sup.RESTART_DELAY)

    def test_sighup_forwarded_to_every_worker(self) -> None:
        self.supervisor._sighup(1, None)
        self.assertEqual([p.signals for *_x, p in self.spawn.started], [["HUP"], ["HUP"]])

    def test_stop_sends_term_and_waits_for_every_worker(self) -> None:
        stopped = self.supervisor.stopService()
        self.assertEqual([p.signals for *_x, p in self.spawn.started], [["TERM"], ["TERM"]])
        self.assertNoResult(stopped)
        self.spawn.end(0, Failure(ProcessDone(0)))
        self.assertNoResult(stopped)
        self.reactor.advance(60)  # no restart while stopping
        self.assertEqual(len(self.spawn.started), 2)
        self.spawn.end(1, Failure(ProcessDone(0)))
        self.successResultOf(stopped)
        self.assertEqual(self.supervisor.sockets, {})
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_stop_kills_a_worker_that_does_not_drain(self) -> None:
        stopped = self.supervisor.stopService()
        self.spawn.end(0, Failure(ProcessDone(0)))
        self.reactor.advance(sup.STOP_TIMEOUT)
        self.assertEqual(self.spawn.started[1][4].signals, ["TERM", "KILL"])
        self.spawn.end(1, killed())
        self.successResultOf(stopped)

    def test_stop_cancels_a_pending_restart(self) -> None:
        self.spawn.end(1, killed())
        stopped = self.supervisor.stopService()
        self.spawn.end(0, Failure(ProcessDone(0)))
        self.successResultOf(stopped)
        self.reactor.advance(60)
        self.assertEqual(len(self.spawn.started), 2)

    def test_output_lines_logged(self) -> None:
        proto = self.spawn.started[1][0]
        with capturedLogs() as events:
            proto.childDataReceived(1, b"first line\nsecond ")
            proto.childDataReceived(2, b"on stderr\n")
            proto.childDataReceived(1, b"half\n")
        lines = [(e["index"], e["line"]) for e in events if "line" in e]
        self.assertEqual(lines, [(1, "first line"), (1, "on stderr"), (1, "second half")])


class SocketTests(SynchronousTestCase):
    def test_port_taken(self) -> None:
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        self.addCleanup(taken.close)
        port = taken.getsockname()[1]
        supervisor = Supervisor("x", 2, [("127.0.0.1", 0), ("127.0.0.1", port)], reactor=Clock(),
                                spawn=Spawner(), install_signals=False)  # fmt: skip
        error = self.assertRaises(ListenError, supervisor.privilegedStartService)
        self.assertIn(f"127.0.0.1:{port}", str(error))
        self.assertEqual(supervisor.sockets, {})

    def test_not_a_worker(self) -> None:
        self.assertIsNone(worker_sockets({}))


class ConfigTests(SynchronousTestCase):
    def smtp(self, queue: str) -> dict[str, Any]:
        config: dict[str, Any] = {
            "hostname": "mx.test",
            "ports": [2525, 2526],
            "bindAddress": "127.0.0.1",
            "implicitTlsPorts": [],
            "submissionPorts": [],
            "queueStorage": queue,
        }
        if queue == "redis":
            config["redisUrl"] = "redis://127.0.0.1:1/0"
        return config

    def test_default_is_one(self) -> None:
        self.assertEqual(load_options({"smtpConfig": self.smtp("disk")}).options.workers, 1)

    def test_workers_refuse_the_memory_queue(self) -> None:
        error = self.assertRaises(
            ConfigError, load_options, {"workers": 2, "smtpConfig": self.smtp("memory")}
        )
        self.assertEqual(len(error.errors), 1)
        self.assertIn("workers: workers > 1 needs a queue the workers can share", error.errors[0])
        self.assertIn('the "memory" queue lives inside one process', error.errors[0])

    def test_workers_take_the_disk_queue(self) -> None:
        options = load_options({"workers": 2, "smtpConfig": self.smtp("disk")}).options
        self.assertEqual(options.workers, 2)

    def test_bad_values(self) -> None:
        for value in (0, -1, "all", 1.5, True):
            error = self.assertRaises(
                ConfigError, load_options, {"workers": value, "smtpConfig": self.smtp("redis")}
            )
            self.assertTrue(error.errors[0].startswith("workers: "), error.errors)

    def test_auto_and_redis(self) -> None:
        options = load_options({"workers": "auto", "smtpConfig": self.smtp("redis")}).options
        self.assertEqual(options.workers, "auto")
        self.assertGreaterEqual(resolve_workers(options.workers), 1)
        self.assertEqual(listen_addresses(options), [("127.0.0.1", 2525), ("127.0.0.1", 2526)])


class AdoptTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.addCleanup(inherit, {})

    def test_inherited_socket_adopted_not_bound(self) -> None:
        inherit({("127.0.0.1", 25): 7, ("::1", 25): 8})
        reactor = MemoryReactor()
        factory = Factory()
        listen_paused(reactor, [(25, factory)], interface="127.0.0.1", what="SMTP")
        listen_paused(reactor, [(25, factory)], interface="::1", what="SMTP")
        self.assertEqual(reactor.adoptedPorts, [(7, socket.AF_INET, factory), (8, socket.AF_INET6, factory)])
        self.assertEqual(reactor.tcpServers, [])

    def test_not_a_worker_binds_as_before(self) -> None:
        inherit({})
        reactor = MemoryReactor()
        listen_paused(reactor, [(587, Factory())], interface="127.0.0.1", what="SMTP")
        self.assertEqual(reactor.adoptedPorts, [])
        self.assertEqual([server[0] for server in reactor.tcpServers], [587])

    def test_worker_refuses_a_shared_port_it_did_not_inherit(self) -> None:
        inherit({("127.0.0.1", 25): 7})
        reactor = MemoryReactor()
        error = self.assertRaises(
            ListenError, listen_paused, reactor, [(25, Factory()), (2525, Factory())],
            interface="127.0.0.1", what="SMTP",
        )  # fmt: skip
        self.assertIn("127.0.0.1:2525", str(error))
        self.assertIn("restart to add it", str(error))
        # The API (worker 0's own port) binds as before.
        listen_paused(reactor, [(8025, Factory())], interface="127.0.0.1", what="the management API")
        self.assertEqual([server[0] for server in reactor.tcpServers], [8025])


class RunOnceTests(SynchronousTestCase):
    """The services that must run once are built in worker 0 only."""

    def router(self, worker: int) -> DcRouter:
        from tests.test_dns import CONFIG as DNS_CONFIG
        from tests.test_router import smtp_options

        options = {
            "smtpConfig": smtp_options(self)["smtpConfig"],
            "apiConfig": {"enabled": True, "port": 0},
            "metricsConfig": {"enabled": True, "port": 9125},
            "dnsServerConfig": DNS_CONFIG["dnsServerConfig"],
        }
        return DcRouter(options, reactor=MemoryReactorClock(), worker=worker)

    def test_worker_0_runs_api_metrics_and_dns(self) -> None:
        router = self.router(0)
        self.assertIsNotNone(router.api)
        self.assertIsNotNone(router.dns)
        self.assertIsNotNone(router.observe.metrics_config)
        self.assertIsNotNone(router.delivery)

    def test_other_workers_serve_and_deliver_only(self) -> None:
        router = self.router(1)
        self.assertIsNone(router.api)
        self.assertIsNone(router.dns)
        self.assertIsNone(router.observe.metrics_config)
        self.assertIsNotNone(router.smtp)
        self.assertIsNotNone(router.delivery)
