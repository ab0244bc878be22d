"""The open-files limit raised at start-up (dcrouter.net.fdlimit), with injected getrlimit/setrlimit."""

from __future__ import annotations

import resource
from typing import Any

from twisted.trial.unittest import TestCase

from dcrouter.config import load_options
from dcrouter.net import fdlimit
from dcrouter.net.fdlimit import HEADROOM, apply_nofile, raise_nofile, wanted_descriptors

INF = resource.RLIM_INFINITY


class FakeLimits:
    """RLIMIT_NOFILE as the kernel keeps it: an unprivileged process may not raise its hard limit, and the
    soft limit may not exceed the hard one."""

    def __init__(self, soft: int, hard: int, root: bool = False, nr_open: int = 1 << 20) -> None:
        self.limits = (soft, hard)
        self.root = root
        self.nr_open = nr_open
        self.calls: list[tuple[int, int]] = []

    def getrlimit(self, which: int) -> tuple[int, int]:
        assert which == resource.RLIMIT_NOFILE
        return self.limits

    def setrlimit(self, which: int, limits: tuple[int, int]) -> None:
        assert which == resource.RLIMIT_NOFILE
        self.calls.append(limits)
        soft, hard = limits
        if hard != INF and soft > hard:
            raise ValueError("not allowed to raise maximum limit")
        if hard > self.limits[1] and not self.root:
            raise ValueError("not allowed to raise maximum limit")
        if hard > self.nr_open:
            raise OSError(1, "Operation not permitted")
        self.limits = limits

    def kwargs(self) -> dict[str, Any]:
        return {
            "getrlimit": self.getrlimit,
            "setrlimit": self.setrlimit,
            "is_root": self.root,
            "nr_open": lambda: self.nr_open,
        }


class RaiseTests(TestCase):
    def test_soft_raised_to_what_is_wanted(self) -> None:
        limits = FakeLimits(1024, 200_000)
        outcome = raise_nofile(110_000, **limits.kwargs())
        self.assertEqual(limits.limits, (110_000, 200_000))
        self.assertTrue(outcome.enough)
        self.assertEqual((outcome.before, outcome.after), ((1024, 200_000), (110_000, 200_000)))

    def test_never_lowered(self) -> None:
        limits = FakeLimits(500_000, 1_000_000)
        outcome = raise_nofile(2000, **limits.kwargs())
        self.assertEqual(limits.calls, [])
        self.assertTrue(outcome.enough)

    def test_unprivileged_stops_at_the_hard_limit(self) -> None:
        limits = FakeLimits(1024, 20_000)
        outcome = raise_nofile(110_000, **limits.kwargs())
        self.assertEqual(limits.limits, (20_000, 20_000))
        self.assertFalse(outcome.enough)
        self.assertIsNone(outcome.error)

    def test_root_raises_the_hard_limit_up_to_nr_open(self) -> None:
        limits = FakeLimits(1024, 20_000, root=True, nr_open=1 << 20)
        self.assertTrue(raise_nofile(110_000, **limits.kwargs()).enough)
        self.assertEqual(limits.limits, (110_000, 110_000))
        limits = FakeLimits(1024, 20_000, root=True, nr_open=50_000)
        outcome = raise_nofile(110_000, **limits.kwargs())
        self.assertEqual(limits.limits, (50_000, 50_000))
        self.assertFalse(outcome.enough)

    def test_refusal_reported_not_raised(self) -> None:
        limits = FakeLimits(1024, 20_000, root=True, nr_open=1 << 20)

        def refuse(which: int, new: tuple[int, int]) -> None:
            raise OSError(1, "Operation not permitted")

        outcome = raise_nofile(
            110_000, getrlimit=limits.getrlimit, setrlimit=refuse, is_root=True, nr_open=lambda: 1 << 20
        )
        self.assertEqual(outcome.after, (1024, 20_000))
        self.assertIn("Operation not permitted", outcome.error or "")
        self.assertFalse(outcome.enough)

    def test_unbounded_wants_the_hard_limit(self) -> None:
        limits = FakeLimits(1024, 65_536)
        outcome = raise_nofile(None, **limits.kwargs())
        self.assertEqual(limits.limits, (65_536, 65_536))
        self.assertTrue(outcome.enough)


class WantedTests(TestCase):
    def test_smtp_max_connections_plus_headroom(self) -> None:
        options = load_options({"smtpConfig": {"ports": [2525], "maxConnections": 100_000}}).options
        self.assertEqual(wanted_descriptors(options), 100_000 + 10_000 + HEADROOM)

    def test_proxy_caps_count_twice_and_an_uncapped_route_asks_everything(self) -> None:
        capped = {
            "smartProxyConfig": {
                "routes": [
                    {
                        "match": {"ports": [8443]},
                        "action": {"type": "forward", "target": {"host": "127.0.0.1", "port": 9000}},
                        "security": {"maxConnections": 500},
                    }
                ]
            }
        }
        options = load_options(capped).options
        self.assertEqual(wanted_descriptors(options), 1000 + 100 + HEADROOM)
        del capped["smartProxyConfig"]["routes"][0]["security"]
        self.assertIsNone(wanted_descriptors(load_options(capped).options))

    def test_logged_warning_when_it_falls_short(self) -> None:
        events: list[dict[str, Any]] = []
        from twisted.logger import globalLogPublisher

        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        options = load_options({"smtpConfig": {"ports": [2525], "maxConnections": 100_000}}).options
        limits = FakeLimits(1024, 20_000)
        apply_nofile(options, **limits.kwargs())
        [event] = [e for e in events if e.get("log_namespace") == fdlimit.__name__]
        self.assertEqual(event["log_level"].name, "warn")
        self.assertEqual((event["soft"], event["asked"]), (20_000, str(111_024)))
