"""Tests for dcrouter.tap: options, --check, makeService (nothing listens), and twistd running the plugin."""

from __future__ import annotations

import io
import json
import os
import signal
import sys
from typing import Any

from twisted.application.service import IService, IServiceMaker
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import getPlugins
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase, TestCase

from dcrouter import tap
from dcrouter.config import load_file
from tests.integration import CHECKOUT, TwistdProcess

EXAMPLE_TOML = os.path.join(CHECKOUT, "etc", "dcrouter.example.toml")
EXAMPLE_JSON = os.path.join(CHECKOUT, "etc", "dcrouter.example.json")

#: Two mistakes in one file: both must be reported, each by its key path.
BAD_CONFIG = {
    "smtpConfig": {
        "ports": [2525, 70000],
        "maxMesageSize": 1000,
    }
}


def write_json(test: SynchronousTestCase, content: object, name: str = "dcrouter.json") -> str:
    directory = os.path.abspath(test.mktemp())
    os.makedirs(directory)
    path = os.path.join(directory, name)
    with open(path, "w") as handle:
        json.dump(content, handle)
    return path


class ExampleConfigTests(SynchronousTestCase):
    def test_toml_and_json_twins_load_equal(self) -> None:
        """etc/dcrouter.example.json is the same configuration as the TOML example."""
        toml_result = load_file(EXAMPLE_TOML)
        json_result = load_file(EXAMPLE_JSON)
        self.assertEqual(toml_result.options, json_result.options)
        self.assertEqual(toml_result.warnings, json_result.warnings)

    def test_example_is_the_quick_start(self) -> None:
        """The example serves what the README promises: three local ports with their roles, a disk queue under
        var/, a self-signed certificate under var/, a hashed demo user and example.test."""
        smtp = load_file(EXAMPLE_TOML).options.smtp_config
        assert smtp is not None and smtp.tls is not None
        self.assertEqual((smtp.bind_address, smtp.ports), ("127.0.0.1", [2525, 2587, 2465]))
        self.assertEqual(smtp.implicit_tls_ports, [2465])
        self.assertIn(2587, smtp.submission_ports)
        self.assertNotIn(2525, smtp.submission_ports)
        self.assertEqual((smtp.queue_storage, smtp.persistent_path), ("disk", "var/queue"))
        self.assertEqual(
            (smtp.tls.cert_path, smtp.tls.key_path, smtp.tls.self_signed),
            ("var/tls/cert.pem", "var/tls/key.pem", True),
        )
        self.assertTrue(smtp.auth.users[0].password.startswith("scrypt$"))
        self.assertEqual(smtp.domain_configs[0].domains, ["example.test"])

    def test_demo_password_is_documented(self) -> None:
        """The comment next to the demo user names the password its hash was made from."""
        from dcrouter.passwords import verify_password

        with open(EXAMPLE_TOML) as handle:
            text = handle.read()
        self.assertIn('password is "demo-password"', text)
        smtp = load_file(EXAMPLE_TOML).options.smtp_config
        assert smtp is not None
        stored = smtp.auth.users[0].password
        self.assertTrue(verify_password(stored, "demo-password"))


class OptionsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.out = io.StringIO()
        self.err = io.StringIO()
        self.patch(sys, "stdout", self.out)
        self.patch(sys, "stderr", self.err)

    def test_defaults(self) -> None:
        options = tap.Options()
        options.parseOptions([])
        self.assertEqual(options["config"], tap.DEFAULT_CONFIG)
        self.assertFalse(options["check"])

    def test_config_long_and_short(self) -> None:
        for argv in (["--config", "x.toml"], ["-c", "x.toml"], ["--config=x.toml"]):
            options = tap.Options()
            options.parseOptions(argv)
            self.assertEqual(options["config"], "x.toml")

    def test_unknown_option(self) -> None:
        self.assertRaises(UsageError, tap.Options().parseOptions, ["--conifg", "x.toml"])

    def test_help_documents_options(self) -> None:
        text = str(tap.Options())
        for fragment in ("--config", "-c", "--check", "exit", "TOML or JSON", tap.DEFAULT_CONFIG):
            self.assertIn(fragment, text)

    def test_help_describes_smtp_and_the_proxy(self) -> None:
        """`twistd dcrouter --help` says what dcrouter runs: the gateway and the proxy, and where twistd's own
        options go (after `dcrouter` they are refused)."""
        text = " ".join(str(tap.Options()).split())
        for fragment in ("smtpConfig", "SMTP", "smartProxyConfig", "proxy", "SNI", "docs/proxy.md"):
            self.assertIn(fragment, text)
        self.assertIn("twistd --logfile /var/log/dcrouter.log --pidfile /run/dcrouter.pid dcrouter", text)

    def test_check_valid_exits_zero(self) -> None:
        options = tap.Options()
        with self.assertRaises(SystemExit) as raised:
            options.parseOptions(["--config", EXAMPLE_TOML, "--check"])
        self.assertEqual(raised.exception.code, 0)
        self.assertIn("OK", self.out.getvalue())
        # The example's one warning (no defaultServer) is shown, not swallowed.
        for warning in load_file(EXAMPLE_TOML).warnings:
            self.assertIn(warning, self.err.getvalue())

    def test_check_invalid_prints_every_error(self) -> None:
        path = write_json(self, BAD_CONFIG)
        options = tap.Options()
        with self.assertRaises(SystemExit) as raised:
            options.parseOptions(["--config", path, "--check"])
        self.assertEqual(raised.exception.code, 1)
        errors = self.err.getvalue()
        self.assertIn("smtpConfig.ports[1]", errors)
        self.assertIn("smtpConfig.maxMesageSize", errors)
        self.assertIn("maxMessageSize", errors)  # the closest known key is suggested
        self.assertEqual(self.out.getvalue(), "")

    def test_check_invalid_also_prints_every_warning(self) -> None:
        """Warnings found beside errors are shown too (the docs promise every error and warning): a plain-text
        password and a duration that looks like seconds, next to five errors."""
        path = write_json(
            self,
            {
                "smtpConfig": {
                    "ports": [2525, 70000],
                    "maxMesageSize": 1,
                    "hostname": "bad host",
                    "defaultPort": 0,
                    "relayNetworks": ["10.1.2.3/8"],
                    "socketTimeout": 500,
                    "auth": {"users": [{"username": "u", "password": "plain-text"}]},
                }
            },
        )
        self.assertEqual(tap.check(path, self.out, self.err), 1)
        lines = self.err.getvalue().splitlines()
        self.assertEqual(len([line for line in lines if line.startswith("error: ")]), 5, lines)
        self.assertIn(
            "warning: smtpConfig.auth.users[0].password: stored in plain text; use a hash from "
            "'dcrouter hash-password'",
            lines,
        )
        self.assertIn(
            "warning: smtpConfig.socketTimeout: 500 ms is less than a second; durations are in milliseconds",
            lines,
        )
        self.assertEqual(lines[-1], f"{path}: not valid, 5 error(s), 2 warning(s)")
        self.assertNotIn("plain-text", self.err.getvalue())

    def test_check_missing_file(self) -> None:
        missing = os.path.join(self.mktemp(), "nowhere.toml")
        self.assertEqual(tap.check(missing, self.out, self.err), 1)
        self.assertIn("nowhere.toml", self.err.getvalue())


class MakeServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.err = io.StringIO()
        self.patch(sys, "stderr", self.err)

    def config_file(self, **smtp: object) -> str:
        directory = os.path.abspath(self.mktemp())
        smtp_config = {
            "ports": [2525],
            "bindAddress": "127.0.0.1",
            "hostname": "mx.test",
            "implicitTlsPorts": [],
            "submissionPorts": [],
            "queueStorage": "disk",
            "persistentPath": os.path.join(directory, "queue"),
            "domainConfigs": [{"domains": ["example.test"], "targetIPs": ["127.0.0.1"]}],
        }
        smtp_config.update(smtp)
        return write_json(self, {"smtpConfig": smtp_config})

    def test_make_service_builds_router_without_listening(self) -> None:
        from dcrouter.router import DcRouter

        options = tap.Options()
        options.parseOptions(["--config", self.config_file()])
        service = tap.makeService(options)
        self.assertIsInstance(service, DcRouter)
        self.assertTrue(IService.providedBy(service))
        self.assertFalse(service.running)
        self.assertEqual(service.smtp_ports, {})  # nothing bound until twistd starts the service
        self.assertEqual(service.options.smtp_config.ports, [2525])  # type: ignore[union-attr]

    def test_make_service_runs_on_the_reactor_given(self) -> None:
        """makeService(options, reactor) as in Twisted's own taps: the router binds on that reactor."""
        options = tap.Options()
        options.parseOptions(["--config", self.config_file()])
        previous = signal.getsignal(signal.SIGHUP)
        self.addCleanup(signal.signal, signal.SIGHUP, previous)  # privilegedStartService installs the handler
        memory = MemoryReactorClock()
        service = tap.makeService(options, reactor=memory)
        self.assertEqual(memory.tcpServers, [])
        service.privilegedStartService()
        self.assertEqual(
            [(port, interface) for port, _, _, interface in memory.tcpServers], [(2525, "127.0.0.1")]
        )
        self.assertEqual(service.smtp_ports, {2525: 2525})

    def test_make_service_prints_warnings(self) -> None:
        """Warnings reach the terminal before twistd starts logging (a plain-text password is one)."""
        path = self.config_file(auth={"users": [{"username": "u", "password": "plain-text"}]})
        options = tap.Options()
        options.parseOptions(["--config", path])
        tap.makeService(options)
        self.assertIn("warning: smtpConfig.auth.users[0].password", self.err.getvalue())
        self.assertNotIn("plain-text", self.err.getvalue())

    def test_make_service_refuses_invalid_file(self) -> None:
        options = tap.Options()
        options.parseOptions(["--config", write_json(self, BAD_CONFIG)])
        with self.assertRaises(SystemExit) as raised:
            tap.makeService(options)
        self.assertEqual(raised.exception.code, 1)
        self.assertIn("smtpConfig.ports[1]", self.err.getvalue())
        self.assertIn("smtpConfig.maxMesageSize", self.err.getvalue())

    def test_missing_default_config_points_at_the_example(self) -> None:
        if os.path.exists(tap.DEFAULT_CONFIG):
            self.skipTest(f"{tap.DEFAULT_CONFIG} exists on this machine")
        options = tap.Options()
        options.parseOptions([])
        self.assertRaises(SystemExit, tap.makeService, options)
        self.assertIn("--config etc/dcrouter.example.toml", self.err.getvalue())


class SighupTests(SynchronousTestCase):
    """SIGHUP under twistd: a handler that hands on_sighup to the reactor thread, which reloads the
    configuration file (tests/test_reload.py; the real signal to a real twistd is in
    tests/integration/test_shutdown_twistd.py and test_reload_twistd.py)."""

    def test_make_service_adds_the_handler(self) -> None:
        path = write_json(
            self,
            {
                "smtpConfig": {
                    "ports": [2525],
                    "hostname": "mx.test",
                    "queueStorage": "memory",
                    "implicitTlsPorts": [],
                    "submissionPorts": [],
                }
            },
        )
        self.patch(sys, "stderr", io.StringIO())
        options = tap.Options()
        options.parseOptions(["--config", path])
        service = tap.makeService(options)
        self.addCleanup(service.queue.save)  # never started: its memory queue's spool directory goes here
        self.assertIsInstance(service.getServiceNamed("sighup"), tap.SighupHandler)

    def test_handler_defers_to_the_reactor_and_logs(self) -> None:
        import signal

        from twisted.internet.testing import EventLoggingObserver
        from twisted.logger import formatEvent, globalLogPublisher

        previous = signal.getsignal(signal.SIGHUP)
        self.addCleanup(signal.signal, signal.SIGHUP, previous)
        calls: list[tuple[Any, ...]] = []

        class Reactor:
            def callFromThread(self, f: Any, *args: Any) -> None:
                calls.append((f, *args))

        router = object()
        handler = tap.SighupHandler(router, Reactor())  # type: ignore[arg-type]
        handler.privilegedStartService()
        installed = signal.getsignal(signal.SIGHUP)
        self.assertTrue(callable(installed))
        installed(signal.SIGHUP, None)  # type: ignore[operator]
        self.assertEqual(calls, [(tap.on_sighup, router)])
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        tap.on_sighup(router)  # type: ignore[arg-type]
        self.assertEqual(
            [formatEvent(e) for e in events],
            ["SIGHUP received, but this router has no configuration file to reload"],
        )


class PluginTests(SynchronousTestCase):
    def test_plugin_is_found(self) -> None:
        """twistd finds `dcrouter` among the IServiceMaker plugins and it points at dcrouter.tap."""
        makers = {maker.tapname: maker for maker in getPlugins(IServiceMaker)}
        self.assertIn("dcrouter", makers)
        self.assertIs(makers["dcrouter"].options, tap.Options)


class TwistdCheckTests(TestCase):
    """`twistd -n dcrouter --config F --check` in a real process: exit status and output."""

    timeout = 60

    async def run_check(self, path: str) -> TwistdProcess:
        cwd = self.mktemp()
        os.makedirs(cwd)
        process = TwistdProcess.spawn(reactor, ["-n", "dcrouter", "--config", path, "--check"], cwd)
        self.addCleanup(process.kill_on_cleanup)
        await process.ended
        return process

    def test_example_exits_zero(self) -> Deferred[None]:
        async def go() -> None:
            process = await self.run_check(EXAMPLE_TOML)
            self.assertEqual(process.exit_code, 0, process.output)
            self.assertIn(b"OK", process.output)

        return Deferred.fromCoroutine(go())

    def test_bad_file_exits_one_with_errors(self) -> Deferred[None]:
        async def go() -> None:
            process = await self.run_check(write_json(self, BAD_CONFIG))
            self.assertEqual(process.exit_code, 1, process.output)
            self.assertIn(b"smtpConfig.ports[1]", process.output)
            self.assertIn(b"smtpConfig.maxMesageSize", process.output)
            # --check never starts the service: nothing about listening.
            self.assertNotIn(b"listening", process.output)

        return Deferred.fromCoroutine(go())


class JsonLogTests(SynchronousTestCase):
    """dcrouter.log.json_observer, the factory for `twistd --logger dcrouter.log.json_observer`."""

    def test_event_as_one_json_line(self) -> None:
        from twisted.logger import Logger, LogLevel, LogPublisher

        from dcrouter.log import JsonLinesObserver

        out = io.StringIO()
        publisher = LogPublisher(JsonLinesObserver(out))
        logger = Logger(namespace="dcrouter.test", observer=publisher)
        logger.info("queued {queue_id} from {peer}", queue_id="ABC123", peer="127.0.0.1", factory=object())
        logger.debug("below the level: not written")
        try:
            raise ZeroDivisionError("division by zero")
        except ZeroDivisionError:
            logger.failure("it broke", level=LogLevel.error)
        first, second = (json.loads(line) for line in out.getvalue().splitlines())
        self.assertEqual(first["message"], "queued ABC123 from 127.0.0.1")
        self.assertEqual((first["level"], first["namespace"]), ("info", "dcrouter.test"))
        self.assertEqual(first["fields"], {"queue_id": "ABC123", "peer": "127.0.0.1"})
        self.assertTrue(first["time"].endswith("+00:00"))
        self.assertEqual(second["level"], "error")
        self.assertIn("ZeroDivisionError", second["traceback"])

    def test_factory_writes_to_stdout(self) -> None:
        from twisted.logger import LogLevel

        from dcrouter.log import json_observer

        out = io.StringIO()
        self.patch(sys, "stdout", out)
        json_observer()(
            {"log_format": "hello", "log_level": LogLevel.warn, "log_time": 0.0, "log_namespace": "x"}
        )
        self.assertEqual(json.loads(out.getvalue())["message"], "hello")
