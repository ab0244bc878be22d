"""For tests driven by a Clock: a loaded memory queue, and the outcome of a Deferred that has already fired.

Tests take a fired Deferred's outcome with trial's ``successResultOf``/``failureResultOf``; ``result_of`` is
left only for tests/test_delivery_manager.py until it moves to them too."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from dcrouter.queue.memory import MemoryQueue


def result_of(d: Deferred) -> Any:
    """The result of a Deferred that has fired (its Failure raised)."""
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


class MemoryQueueCase(TestCase):
    """A Clock at ``START`` and a loaded MemoryQueue whose spool directory is ``self.spool``."""

    START = 1_700_000_000.0

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(self.START)
        self.spool = os.path.abspath(self.mktemp())
        self.queue = MemoryQueue(clock=self.clock, spool_directory=self.spool)
        self.successResultOf(self.queue.load())
        self.addCleanup(self.queue.save)
