"""dcrouter's loggers drop events below the configured level before any observer sees them."""

from __future__ import annotations

import importlib
import pkgutil

from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import Logger, LogLevel, globalLogPublisher
from twisted.trial.unittest import TestCase

import dcrouter
from dcrouter.log import enabled, levels, logger, set_level
from dcrouter.router import DcRouter


class LevelTests(TestCase):
    def setUp(self) -> None:
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.addCleanup(levels.clearLogLevels)

    def messages(self) -> list[str]:
        return [
            e["log_format"] for e in self.events if e.get("log_namespace", "").startswith("dcrouter.test")
        ]

    def test_debug_dropped_by_default(self) -> None:
        log = logger("dcrouter.test.a")
        log.debug("trace")
        log.info("fact")
        self.assertEqual(self.messages(), ["fact"])

    def test_level_per_namespace_and_children(self) -> None:
        set_level("debug", "dcrouter.test.a")
        logger("dcrouter.test.a.b").debug("child trace")
        logger("dcrouter.test.c").debug("other trace")
        self.assertEqual(self.messages(), ["child trace"])

    def test_enabled_follows_the_level_at_once(self) -> None:
        # What hot paths guard their debug events with: it agrees with the filter, including later changes.
        self.assertFalse(enabled("dcrouter.test.a"))
        self.assertTrue(enabled("dcrouter.test.a", LogLevel.info))
        set_level("debug", "dcrouter.test")
        self.assertTrue(enabled("dcrouter.test.a.b"))
        self.assertFalse(enabled("dcrouter.other"))
        set_level("warn", "dcrouter.test.a")
        self.assertFalse(enabled("dcrouter.test.a", LogLevel.info))
        self.assertTrue(enabled("dcrouter.test.a", LogLevel.error))
        levels.clearLogLevels()
        self.assertFalse(enabled("dcrouter.test.a"))

    def test_raising_the_level_silences_info(self) -> None:
        set_level(LogLevel.warn)
        log = logger("dcrouter.test.a")
        log.info("fact")
        log.warn("problem")
        self.assertEqual(self.messages(), ["problem"])

    def test_router_applies_log_level(self) -> None:
        options = {
            "logLevel": "error",
            "smtpConfig": {
                "ports": [2525],
                "hostname": "mx.test",
                "implicitTlsPorts": [],
                "submissionPorts": [],
                "queueStorage": "memory",
                "domainConfigs": [{"domains": ["a.test"], "targetIPs": ["127.0.0.1"]}],
            },
        }
        router = DcRouter(options, reactor=MemoryReactorClock())
        self.addCleanup(router.queue.save)  # never started: its memory queue's spool directory goes here
        log = logger("dcrouter.test.a")
        log.warn("problem")
        log.error("failure")
        self.assertEqual(self.messages(), ["failure"])


class NamespaceTests(TestCase):
    def test_every_module_logs_under_its_own_name(self) -> None:
        """A module's events carry its ``__name__``, so a level or a filter set for a package covers it."""
        named = {}
        for found in pkgutil.walk_packages(dcrouter.__path__, "dcrouter."):
            log = getattr(importlib.import_module(found.name), "log", None)
            if isinstance(log, Logger) and log.namespace != found.name:
                named[found.name] = log.namespace
        self.assertEqual(named, {})
