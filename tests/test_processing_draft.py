"""Draft.rewrite_body when the chain is cancelled (processingTimeout) while the rewrite runs in its thread:
no file may be left in the spool directory, whichever finishes first."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.trial.unittest import SynchronousTestCase

from dcrouter.mail.envelope import Envelope
from dcrouter.mail.headers import HeaderBlock
from dcrouter.mail.spooled import SpooledMessage
from dcrouter.processing.message import Draft

MESSAGE = b"Subject: s\r\n\r\nbody\r\n"


class CancelledRewriteTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.spool = os.path.abspath(self.mktemp())
        os.makedirs(self.spool)
        self.pending: list[Callable[[], Any]] = []

        def later(work: Callable[[], Any]) -> Deferred:
            # A thread pool that has not run the work yet.
            self.pending.append(work)
            return Deferred()

        source = SpooledMessage(len(MESSAGE), data=MESSAGE)
        self.draft = Draft(
            queue_id="Q1",
            envelope=Envelope("a@example.org", ["b@example.com"]),
            source=source,
            headers=HeaderBlock.parse(b"Subject: s\r\n"),
            body_offset=14,
            run_in_thread=later,
            spool_directory=self.spool,
        )

    def rewrite(self, headers: HeaderBlock, body_in: Any, body_out: Any) -> bool:
        body_out.write(body_in.read().upper())
        return True

    def test_discarded_before_the_thread_finishes(self) -> None:
        d = self.draft.rewrite_body(self.rewrite)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.draft.discard()
        self.pending.pop()()  # the thread finishes afterwards
        self.assertEqual(os.listdir(self.spool), [])

    def test_thread_finished_before_the_discard(self) -> None:
        d = self.draft.rewrite_body(self.rewrite)
        self.pending.pop()()  # the file is written; its result will never be delivered
        self.assertEqual(len(os.listdir(self.spool)), 1)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.draft.discard()
        self.assertEqual(os.listdir(self.spool), [])
