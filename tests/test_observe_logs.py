"""JSON logs (logFormat = "json"): the record's correlation ids, twistd taking the router's observer, and the
mail path's log lines carrying the session and queue ids."""

from __future__ import annotations

import io
import json
import os
from typing import Any

from twisted.application.service import Application
from twisted.logger import (
    ILogObserver,
    Logger,
    LogLevel,
    LogPublisher,
    globalLogPublisher,
    textFileLogObserver,
)
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from dcrouter import tap
from dcrouter.log import JsonLinesObserver, TextLinesObserver, twistd_json_observer, twistd_text_observer
from tests.smtp_fixtures import PASSWORD, connect
from tests.test_smtp_protocol import MAIL, MESSAGE, RCPT


class JsonRecordTests(SynchronousTestCase):
    def test_correlation_ids_at_the_top(self) -> None:
        out = io.StringIO()
        log = Logger(namespace="dcrouter.test", observer=LogPublisher(JsonLinesObserver(out)))
        log.info("{queue_id} queued", queue_id="Q1", session_id="S1", size=10)
        log.info("no ids here", queue_id=None)
        first, second = (json.loads(line) for line in out.getvalue().splitlines())
        self.assertEqual((first["queueId"], first["sessionId"], first["message"]), ("Q1", "S1", "Q1 queued"))
        self.assertEqual(first["fields"]["size"], 10)
        self.assertNotIn("queueId", second)
        self.assertNotIn("sessionId", second)

    def test_where_twistd_would_write(self) -> None:
        path = os.path.abspath(self.mktemp())
        to_file = twistd_json_observer({"logfile": path, "nodaemon": True})
        to_file({"log_format": "written", "log_level": LogLevel.info, "log_time": 0.0, "log_namespace": "x"})
        with open(path) as written:
            self.assertEqual(json.loads(written.read())["message"], "written")
        self.assertIs(
            twistd_json_observer({"logfile": None, "nodaemon": True})._out, __import__("sys").stdout
        )


class TwistdTests(SynchronousTestCase):
    """makeService with logFormat json hands twistd's Application a JSON observer, as twistd's logger looks
    for one there when no --logger is given (twisted.application.app.AppLogger.start)."""

    def make(self, log_format: str) -> tuple[Any, Application]:
        path = os.path.abspath(self.mktemp()) + ".json"
        with open(path, "w") as handle:
            smtp = {"ports": [2525], "implicitTlsPorts": [], "submissionPorts": [], "queueStorage": "memory"}
            json.dump({"logFormat": log_format, "smtpConfig": smtp}, handle)
        options = tap.Options()
        options.parseOptions(["--config", path])
        options.parent = {"logfile": os.path.abspath(self.mktemp()), "nodaemon": False}  # twistd's own
        router = tap.makeService(options)
        application = Application("dcrouter")
        router.setServiceParent(application)
        return router, application

    def test_json_observer_for_the_application(self) -> None:
        _, application = self.make("json")
        self.assertIsInstance(application.getComponent(ILogObserver), JsonLinesObserver)

    def test_text_leaves_twistd_alone(self) -> None:
        _, application = self.make("text")  # to a log file: twistd's own observer (rotation, SIGUSR1)
        self.assertIsNone(application.getComponent(ILogObserver))

    def test_text_to_standard_output(self) -> None:
        import sys

        observer = twistd_text_observer({"logfile": None, "nodaemon": True})
        assert observer is not None
        self.assertIs(observer._outFile, sys.stdout)
        self.assertIsInstance(twistd_text_observer({"logfile": "-", "nodaemon": True}), TextLinesObserver)
        self.assertIsNone(twistd_text_observer({"logfile": None, "nodaemon": True, "syslog": True}))
        self.assertIsNone(twistd_text_observer({"logfile": "x.log", "nodaemon": True}))
        self.assertIsNone(twistd_text_observer({"logfile": None, "nodaemon": False}))
        self.assertIsNone(twistd_text_observer(None))


def _failure() -> Failure:
    try:
        raise ValueError("boom")
    except ValueError:
        return Failure()


class TextLinesTests(SynchronousTestCase):
    """The text observer writes exactly what twistd's textFileLogObserver writes, event for event."""

    EVENTS: list[dict[str, Any]] = [
        {
            "log_format": "{queue_id} queued from {peer!r} ({n:>4})",
            "queue_id": "Q1",
            "peer": "127.0.0.1",
            "n": 7,
        },
        {"log_format": "two\nlines {x}", "x": "a\nb"},
        {"log_format": "attr {e.args[0]} item {d[k]}", "e": ValueError("v"), "d": {"k": "w"}},
        {"log_format": "called {f()}", "f": lambda: "yes"},
        {"log_format": "missing {nothing}"},
        {"log_format": "positional {0}"},
        {"log_format": ""},
        {"log_format": None},
        {"log_format": b"bytes {x}", "x": 1},
        {"log_format": "failed {x}", "x": 1, "log_failure": _failure()},
        {"log_format": "legacy", "log_system": "-"},
        {"log_format": "no level {x}", "x": 2, "log_level": None},
        {"log_format": "no time"},
        {"log_format": "int time", "log_time": 5},
        {"log_format": "rounds up", "log_time": 1_700_000_000.9999997},
        {"log_format": "no namespace", "log_namespace": None},
        {"log_format": "bad spec {x:d}", "x": "s"},
    ]

    def test_same_text_as_twistd(self) -> None:
        times = [1_700_000_000.25, 1_700_000_000.75, 1_700_000_001.5, 1_700_003_600.0]
        for index, template in enumerate(self.EVENTS):
            for when in times:
                event = {"log_namespace": "dcrouter.test", "log_level": LogLevel.info, "log_time": when}
                event.update(template)
                if event["log_namespace"] is None:
                    del event["log_namespace"]
                ours, theirs = io.StringIO(), io.StringIO()
                observer = TextLinesObserver(ours)
                observer(dict(event))
                textFileLogObserver(theirs)(dict(event))
                self.assertEqual(ours.getvalue(), theirs.getvalue(), (index, when))
                if index == 0:  # a plain line takes the short way (its time prefix is kept)
                    self.assertIn("Q1 queued from '127.0.0.1' (   7)", ours.getvalue())
                    self.assertEqual(observer._second, int(when))

    def test_time_prefix_follows_the_second(self) -> None:
        out = io.StringIO()
        observer = TextLinesObserver(out)
        for when in (100.1, 100.9, 101.0, 99.5):
            observer({"log_format": "t", "log_namespace": "n", "log_level": LogLevel.info, "log_time": when})
        theirs = io.StringIO()
        for when in (100.1, 100.9, 101.0, 99.5):
            textFileLogObserver(theirs)(
                {"log_format": "t", "log_namespace": "n", "log_level": LogLevel.info, "log_time": when}
            )
        self.assertEqual(out.getvalue(), theirs.getvalue())
        self.assertEqual(len({line.split(" ")[0] for line in out.getvalue().splitlines()}), 3)


class MailPathIdsTests(SynchronousTestCase):
    """Every line an SMTP session logs carries its session id; those about a message its queue id."""

    def test_session_and_queue_ids(self) -> None:
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        server = connect()
        server.exchange(b"EHLO c\r\n" + MAIL + RCPT + b"DATA\r\n" + MESSAGE + b"QUIT\r\n")
        server.protocol.connectionLost()
        smtp = [e for e in events if str(e.get("log_namespace", "")).startswith("dcrouter.smtp")]
        self.assertGreaterEqual(len(smtp), 3)  # connection, queued, disconnected
        session_id = server.protocol.session.session_id
        self.assertEqual({e.get("session_id") for e in smtp}, {session_id})
        queued = [e for e in smtp if "from=<" in e.get("log_format", "")]
        self.assertEqual([e["queue_id"] for e in queued], [server.queue.items[0].id])
        self.assertNotIn(PASSWORD, repr(events))

    def test_auth_lines_carry_the_session_id(self) -> None:
        import base64

        from dcrouter.config.auth import AuthConfig
        from tests.smtp_fixtures import make_config

        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        server = connect(make_config(auth=AuthConfig(failure_delay=0, allow_insecure=True)))
        server.exchange(b"EHLO c\r\n")
        for password in (b"wrong", PASSWORD.encode()):
            server.exchange(b"AUTH PLAIN " + base64.b64encode(b"\0alice\0" + password) + b"\r\n")
        auth = [e for e in events if e.get("log_namespace") == "dcrouter.smtp.auth"]
        self.assertEqual(len(auth), 2)  # the failure and the success
        self.assertEqual({e["session_id"] for e in auth}, {server.protocol.session.session_id})
        self.assertNotIn(PASSWORD, repr(events))


class ClientTransactionIdsTests(SynchronousTestCase):
    """The outbound client's lines during a transaction name the message being sent."""

    def test_queue_id_on_the_transactions_lines(self) -> None:
        from twisted.internet.testing import EventLoggingObserver

        from dcrouter.log import levels, set_level
        from tests.test_delivery_client import ClientTestCase, run

        set_level("debug", "dcrouter.delivery.client")
        self.addCleanup(levels.clearLogLevels)
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        case = ClientTestCase()
        case.setUp()
        case.ready()
        done = run(
            case.client.send("a@sender.test", ["x@example.org"], io.BytesIO(b"x\r\n"), 3, queue_id="Q42")
        )
        case.server(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n250 2.0.0 Ok\r\n")
        self.successResultOf(done)
        during = [e for e in events if "MAIL FROM" in str(e.get("command", "")) or e.get("text") == "Ok"]
        self.assertTrue(during)
        self.assertEqual({e["queue_id"] for e in during}, {"Q42"})
        self.assertIsNone(case.client.queue_id)  # not carried over to the next use of the connection


class EventLogTests(SynchronousTestCase):
    """events.log: the chosen event types as log lines, with their correlation ids."""

    def test_selected_events_are_logged(self) -> None:
        from twisted.internet.task import Clock

        from dcrouter.config import load_options
        from dcrouter.events import EventBus
        from dcrouter.observe.metrics import RouterMetrics
        from dcrouter.observe.service import ObserveService

        logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        bus = EventBus()
        service = ObserveService(
            bus=bus,
            metrics=RouterMetrics(),
            reactor=Clock(),  # type: ignore[arg-type]
            metrics_config=None,
            events_config=load_options({"events": {"log": ["security.*"]}}).options.events,
        )
        service.startService()
        self.addCleanup(service.stopService)
        bus.emit("security.relay_refused", queue_id="Q1", session_id="S1", peer="192.0.2.1", code=554)
        bus.emit("message.queued", queue_id="Q1")
        lines = [e for e in logged if e.get("log_namespace") == "dcrouter.events"]
        self.assertEqual([e["event_type"] for e in lines], ["security.relay_refused"])
        out = io.StringIO()
        JsonLinesObserver(out)(lines[0])
        record = json.loads(out.getvalue())
        self.assertEqual((record["queueId"], record["sessionId"]), ("Q1", "S1"))
        self.assertEqual(record["fields"]["event"], {"peer": "192.0.2.1", "code": 554})
