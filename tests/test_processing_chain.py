"""The processing chain (EmailProcessor) between the end of DATA and the reply, against a MemoryQueue.

Every stage runs inline (no thread pool) and every timer on a ``Clock`` passed as the processor's reactor.
Scanners here are collaborators that answer on script (a result, an error, or a Deferred the test fires);
transformations are the real ones. What is checked is what the client is told (the Refusal's reply), what the
queue holds (envelope, ``head``, ``body_offset``, status) and the bytes delivery will compose from it.
"""

from __future__ import annotations

import os
import random
import threading
import zipfile
from typing import Any

from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from dcrouter.config.load import load_options
from dcrouter.interfaces import IMessageAcceptor, IScanner, QueueFull, QueueUnavailable
from dcrouter.mail.acceptance import LOCAL_ERROR, QUEUE_FULL, Accepted, Disposition
from dcrouter.mail.dkimkeys import generate_private_key, private_key_pem
from dcrouter.mail.envelope import Envelope
from dcrouter.mail.headers import HeaderBlock
from dcrouter.mail.spooled import SpooledMessage
from dcrouter.processing import processor as processor_module
from dcrouter.processing.archive import WorkBudget
from dcrouter.processing.build import build_chain
from dcrouter.processing.message import Discarded, Draft, Refusal, ScannerUnavailable, ScanResult, Verdict
from dcrouter.processing.mime import MimeLimits
from dcrouter.processing.processor import INLINE_ARCHIVE_BYTES, INLINE_BYTES, EmailProcessor, ScannerStage
from dcrouter.processing.transforms.dkim import DkimSign
from dcrouter.processing.transforms.headers import (
    AddHeader,
    DomainHeaders,
    ModifyHeader,
    RemoveHeader,
    RewriteAddress,
)
from dcrouter.queue.files import message_reader
from dcrouter.queue.item import QueueItem, QueueItemStatus
from tests import mime_samples as samples
from tests.archive_samples import EXE, make_zip
from tests.results import MemoryQueueCase
from tests.smtp_fixtures import ControlledQueue, connect

START = MemoryQueueCase.START

HEAD = (
    b"Received: from client.example.net\r\n"
    b"\tby mx.example.com; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    b"From: Alice <alice@old.example>\r\n"
    b"To: bob@old.example, carol@keep.example\r\n"
    b"Cc: Dave <dave@old.example>\r\n"
    b"Subject: hello\r\n"
    b"X-Spam-Status: No, forged by the sender\r\n"
    b"x-spam-score: -100\r\n"
    b"X-Spam-Flag: NO\r\n"
    b"\r\n"
)
BODY = b"Hello Bob,\r\n\r\nX-Spam-Status: in the body, untouched\r\n\xff\xfe 8-bit\r\n.\r\n"
MESSAGE = HEAD + BODY

SPAM_HEADERS = (("X-Spam-Status", "Yes, score=7.0 required=5.0"), ("X-Spam-Score", "7.0"))


@implementer(IScanner)
class ScriptedScanner:
    """Answers every scan with ``answer``: a ScanResult, an exception to raise, or a callable giving either
    (or a Deferred). Records the drafts it was shown."""

    def __init__(self, answer: Any, name: str = "scripted") -> None:
        self.name = name
        self.answer = answer
        self.seen: list[Draft] = []

    def scan(self, message: Draft) -> Any:
        self.seen.append(message)
        answer = self.answer(message) if callable(self.answer) else self.answer
        if isinstance(answer, Exception):
            raise answer
        return answer


class HeldScanner:
    """A scanner whose verdicts the test gives: each scan returns a new unfired Deferred (with a canceller
    that records the cancellation)."""

    name = "held"

    def __init__(self) -> None:
        self.waiting: list[Deferred] = []
        self.cancelled = 0

    def scan(self, message: Draft) -> Deferred:
        d: Deferred = Deferred(self._cancel)
        self.waiting.append(d)
        return d

    def _cancel(self, d: Deferred) -> None:
        self.cancelled += 1


def verdict(kind: Verdict, reason: str = "", **kwargs: Any) -> ScanResult:
    return ScanResult("scripted", kind, reason, **kwargs)


class ChainCase(MemoryQueueCase):
    def setUp(self) -> None:
        super().setUp()
        self.notified: list[QueueItem] = []

    def processor(self, **kwargs: Any) -> EmailProcessor:
        kwargs.setdefault("reactor", self.clock)
        kwargs.setdefault("threadpool", None)
        processor = EmailProcessor(self.queue, self.clock.seconds, **kwargs)
        processor.on_queued = self.notified.append
        return processor

    def envelope(self, *recipients: str, sender: str = "alice@old.example") -> Envelope:
        return Envelope(
            mail_from=sender,
            recipients=list(recipients or ["bob@old.example"]),
            helo="client.example.net",
            peer_host="192.0.2.7",
            peer_port=40000,
            received_at=self.clock.seconds(),
        )

    def spooled(self, data: bytes = MESSAGE) -> SpooledMessage:
        """A message spilled to disk by ingress: a file in the queue's spool directory."""
        path = os.path.join(self.spool, f"spool-{len(os.listdir(self.spool))}")
        with open(path, "xb") as f:
            f.write(data)
        return SpooledMessage(len(data), path=path)

    def process(
        self, processor: EmailProcessor, data: bytes | SpooledMessage = MESSAGE, **kwargs: Any
    ) -> Deferred:
        envelope = kwargs.pop("envelope", None) or self.envelope()
        message = data if isinstance(data, SpooledMessage) else SpooledMessage(len(data), data=data)
        return processor.process(envelope, message, **kwargs)

    def queued(
        self, processor: EmailProcessor, data: bytes | SpooledMessage = MESSAGE, **kw: Any
    ) -> QueueItem:
        item: QueueItem = self.successResultOf(self.process(processor, data, **kw))
        return item

    def queued_local(self, processor: EmailProcessor) -> QueueItem:
        """The gateway's own mail (a DSN) queued through ``submit_local``."""
        message = SpooledMessage(len(MESSAGE), data=MESSAGE)
        item: QueueItem = self.successResultOf(
            processor.submit_local(self.envelope(), message, "DSN0000000000000001", priority=0)
        )
        return item

    def refusal(self, d: Deferred) -> Refusal:
        failure = self.failureResultOf(d, Refusal)
        error: Refusal = failure.value
        return error

    def composed(self, item: QueueItem) -> bytes:
        """The message as delivery relays it: the stored body behind the item's head."""
        stream = self.successResultOf(self.queue.open_body(item.id))
        with message_reader(item.head, stream, item.body_offset) as reader:
            data: bytes = reader.read()
        return data

    def stored_body(self, item: QueueItem) -> bytes:
        with self.successResultOf(self.queue.open_body(item.id)) as stream:
            data: bytes = stream.read()
        return data

    def count(self) -> int:
        n: int = self.successResultOf(self.queue.get_item_count())
        return n

    def spool_files(self) -> list[str]:
        return sorted(os.listdir(self.spool))


class FastPathTests(ChainCase):
    def test_no_stages_queues_as_received(self) -> None:
        processor = self.processor()
        item = self.queued(processor, queue_id="FAST1")
        self.assertEqual((item.id, item.head, item.body_offset, item.size), ("FAST1", None, 0, len(MESSAGE)))
        self.assertEqual(self.stored_body(item), MESSAGE)
        self.assertEqual(self.composed(item), MESSAGE)
        self.assertEqual(item.status, QueueItemStatus.QUEUED)
        self.assertEqual((item.created_at, item.next_attempt_at), (START, START))
        self.assertEqual([i.id for i in self.notified], ["FAST1"])
        self.assertEqual(processor.active, 0)

    def test_stages_that_change_nothing_keep_the_received_bytes(self) -> None:
        clean = ScriptedScanner(verdict(Verdict.CLEAN))
        processor = self.processor(
            scanners=[ScannerStage(clean, "reject")],
            transformations=[RemoveHeader("X-Not-There"), ModifyHeader("Subject", "nomatch", "x")],
        )
        item = self.queued(processor)
        self.assertIsNone(item.head)
        self.assertEqual(item.body_offset, 0)
        self.assertEqual(self.composed(item), MESSAGE)
        self.assertEqual(len(clean.seen), 1)
        self.assertEqual(processor.stats["processed"], 1)

    def test_scanner_sees_the_received_message_and_the_envelope_copy(self) -> None:
        clean = ScriptedScanner(verdict(Verdict.CLEAN))
        envelope = self.envelope("bob@old.example")
        self.queued(self.processor(scanners=[ScannerStage(clean)]), envelope=envelope)
        [draft] = clean.seen
        self.assertEqual(draft.headers.get("Subject"), "hello")
        self.assertEqual(draft.body_offset, len(HEAD))
        self.assertEqual(draft.envelope, envelope)
        self.assertIsNot(draft.envelope, envelope)
        self.assertIsNot(draft.envelope.recipients, envelope.recipients)
        self.assertIsNotNone(draft.info)


class TagTests(ChainCase):
    def test_tag_adds_headers_and_removes_forged_ones(self) -> None:
        spam = ScriptedScanner(verdict(Verdict.SPAM, "score 7.0", score=7.0, headers=SPAM_HEADERS))
        item = self.queued(self.processor(scanners=[ScannerStage(spam, "tag")]))
        head = HeaderBlock.parse(item.head[:-2])
        self.assertEqual(head.get_all("X-Spam-Status"), ["Yes, score=7.0 required=5.0"])
        self.assertEqual(head.get_all("X-Spam-Score"), ["7.0"])
        self.assertEqual(head.names()[-2:], ["X-Spam-Status", "X-Spam-Score"])
        # A field the scanner does not write is the sender's business, left as it came.
        self.assertEqual(head.get_all("X-Spam-Flag"), ["NO"])
        self.assertEqual(item.body_offset, len(HEAD))
        self.assertEqual(item.status, QueueItemStatus.QUEUED)
        expected = (
            HEAD.replace(b"X-Spam-Status: No, forged by the sender\r\nx-spam-score: -100\r\n", b"")[:-2]
            + b"X-Spam-Status: Yes, score=7.0 required=5.0\r\nX-Spam-Score: 7.0\r\n\r\n"
            + BODY
        )
        self.assertEqual(self.composed(item), expected)
        self.assertEqual(item.size, len(expected))

    def test_clean_result_is_tagged_too(self) -> None:
        clean = ScriptedScanner(verdict(Verdict.CLEAN, headers=(("X-Spam-Status", "No, score=0.1"),)))
        item = self.queued(self.processor(scanners=[ScannerStage(clean, "tag", subject_prefix="[SPAM] ")]))
        head = HeaderBlock.parse(item.head[:-2])
        self.assertEqual(head.get_all("X-Spam-Status"), ["No, score=0.1"])
        self.assertEqual(head.get_all("x-spam-score"), ["-100"])
        self.assertEqual(head.get("Subject"), "hello")

    def test_subject_prefix(self) -> None:
        spam = ScriptedScanner(verdict(Verdict.SPAM, score=9.0, headers=SPAM_HEADERS))
        stage = ScannerStage(spam, "tag", subject_prefix="[SPAM] ")
        item = self.queued(self.processor(scanners=[stage]))
        self.assertEqual(HeaderBlock.parse(item.head[:-2]).get_all("Subject"), ["[SPAM] hello"])
        self.assertIn(b"Subject: [SPAM] hello\r\n", item.head)
        # Already marked: not marked twice.
        again = self.queued(self.processor(scanners=[stage]), HEAD.replace(b"hello", b"[SPAM] hello") + BODY)
        self.assertEqual(HeaderBlock.parse(again.head[:-2]).get_all("Subject"), ["[SPAM] hello"])
        # No Subject at all: one is added.
        bare = self.queued(self.processor(scanners=[stage]), b"From: a@old.example\r\n\r\nbody\r\n")
        self.assertEqual(HeaderBlock.parse(bare.head[:-2]).get_all("Subject"), ["[SPAM]"])

    def test_scanner_headers_cannot_inject(self) -> None:
        # A plugin's finding may hold CR/LF/NUL: written on one line, never as a field of its own.
        bad = ScriptedScanner(
            verdict(Verdict.SPAM, headers=(("X-Spam-Status", "Yes\r\nBcc: victim@example.org\x00"),))
        )
        item = self.queued(self.processor(scanners=[ScannerStage(bad, "tag", subject_prefix="[S\r\n] ")]))
        head = HeaderBlock.parse(item.head[:-2])
        self.assertEqual(head.get_all("Bcc"), [])
        self.assertEqual(head.get_all("X-Spam-Status"), ["Yes  Bcc: victim@example.org"])
        self.assertEqual(head.get_all("Subject"), ["[S  ] hello"])

    def test_clean_result_tagged_whatever_the_action(self) -> None:
        clean = ScriptedScanner(verdict(Verdict.CLEAN, headers=(("X-Virus-Status", "Clean"),)))
        item = self.queued(self.processor(scanners=[ScannerStage(clean, "reject")]))
        self.assertEqual(HeaderBlock.parse(item.head[:-2]).get_all("X-Virus-Status"), ["Clean"])


class RejectTests(ChainCase):
    CASES = (
        (verdict(Verdict.SPAM, "BAYES_99", score=7.0), 550, "5.7.1", "Message refused as spam (score 7.0)"),
        (verdict(Verdict.SPAM, "BAYES_99"), 550, "5.7.1", "Message refused as spam (BAYES_99)"),
        (
            verdict(Verdict.VIRUS, "Eicar-Signature"),
            554,
            "5.7.1",
            "Message refused: virus found (Eicar-Signature)",
        ),
        (
            verdict(Verdict.BLOCKED, "invoice.pdf.exe"),
            550,
            "5.7.1",
            "Message refused by policy (invoice.pdf.exe)",
        ),
        (
            verdict(Verdict.UNSCANNABLE, "zip bomb"),
            554,
            "5.7.1",
            "Message refused: it cannot be scanned (zip bomb)",
        ),
    )

    def test_reply_per_verdict(self) -> None:
        for result, code, enhanced, text in self.CASES:
            with self.subTest(verdict=result.verdict):
                processor = self.processor(scanners=[ScannerStage(ScriptedScanner(result), "reject")])
                message = self.spooled()
                refusal = self.refusal(self.process(processor, message))
                self.assertEqual(
                    (refusal.reply.code, refusal.reply.enhanced, refusal.reply.text), (code, enhanced, text)
                )
                self.assertEqual(refusal.reason, result.reason)
                self.assertEqual(self.count(), 0)
                self.assertEqual(self.spool_files(), [])
                self.assertIsNone(message.path)
                self.assertEqual(processor.stats["refused"], 1)
                self.assertEqual(processor.active, 0)
        self.assertEqual(self.notified, [])

    def test_reason_is_made_safe_for_the_reply(self) -> None:
        result = verdict(Verdict.VIRUS, "Evil\r\n250 2.0.0 Ok\x00" + "x" * 200)
        processor = self.processor(scanners=[ScannerStage(ScriptedScanner(result))])
        text = self.refusal(self.process(processor)).reply.text
        assert isinstance(text, str)
        self.assertTrue(text.startswith("Message refused: virus found (Evil??250 2.0.0 Ok?xxx"))
        self.assertTrue(text.isascii() and text.isprintable())
        self.assertLess(len(text), 160)

    def test_later_stages_do_not_run_after_a_refusal(self) -> None:
        after = ScriptedScanner(verdict(Verdict.CLEAN))
        processor = self.processor(
            scanners=[ScannerStage(ScriptedScanner(verdict(Verdict.VIRUS, "x"))), ScannerStage(after)],
            transformations=[AddHeader("X-Never", "1")],
        )
        self.refusal(self.process(processor))
        self.assertEqual(after.seen, [])

    def test_smtp_reply_is_the_refusal(self) -> None:
        server = connect()
        server.factory.acceptor.add_scanner(ScriptedScanner(verdict(Verdict.SPAM, score=12.5)))
        server.exchange(b"EHLO client.example\r\n")
        server.exchange(b"MAIL FROM:<sender@example.net>\r\nRCPT TO:<rcpt@example.org>\r\nDATA\r\n")
        reply = server.exchange(b"Subject: hi\r\n\r\nHello.\r\n.\r\n")
        self.assertEqual(reply, b"550 5.7.1 Message refused as spam (score 12.5)\r\n")
        self.assertEqual(server.queue.items, [])


class DiscardTests(ChainCase):
    def test_discard(self) -> None:
        processor = self.processor(
            scanners=[ScannerStage(ScriptedScanner(verdict(Verdict.VIRUS, "Eicar")), "discard")]
        )
        message = self.spooled()
        failure = self.failureResultOf(self.process(processor, message, queue_id="DROP1"), Discarded)
        self.assertEqual(failure.value.queue_id, "DROP1")
        self.assertIn("Eicar", failure.value.reason)
        self.assertEqual(self.count(), 0)
        self.assertEqual(self.spool_files(), [])
        self.assertEqual(self.notified, [])
        self.assertEqual(processor.stats["discarded"], 1)

    def test_smtp_answers_as_if_queued(self) -> None:
        server = connect()
        scanner = ScriptedScanner(verdict(Verdict.SPAM, score=30.0))
        server.factory.acceptor.add_scanner(ScannerStage(scanner, "discard"))
        server.exchange(b"EHLO client.example\r\n")
        server.exchange(b"MAIL FROM:<sender@example.net>\r\nRCPT TO:<rcpt@example.org>\r\nDATA\r\n")
        reply = server.exchange(b"Subject: hi\r\n\r\nHello.\r\n.\r\n")
        [draft] = scanner.seen
        self.assertEqual(reply, b"250 2.0.0 Ok: queued as %s\r\n" % draft.queue_id.encode())
        self.assertEqual(server.queue.items, [])


class QuarantineTests(ChainCase):
    def quarantine(self) -> tuple[EmailProcessor, QueueItem]:
        virus = ScriptedScanner(verdict(Verdict.VIRUS, "Eicar"), name="clamav")
        processor = self.processor(
            scanners=[ScannerStage(virus, "quarantine")], transformations=[AddHeader("X-Seen", "1")]
        )
        return processor, self.queued(processor, queue_id="QUAR1")

    def test_stored_never_handed_out(self) -> None:
        processor, item = self.quarantine()
        self.assertEqual(item.status, QueueItemStatus.QUARANTINED)
        self.assertEqual(item.last_error, "clamav: virus (Eicar)")
        # Transformations still ran: what is released is what would have been relayed.
        self.assertIn(b"X-Seen: 1\r\n", item.head)
        self.assertEqual(self.notified, [])
        self.assertEqual(processor.stats["quarantined"], 1)
        self.clock.advance(3600)
        self.assertEqual(self.successResultOf(self.queue.get_next(10)), [])
        listed = self.successResultOf(self.queue.get_by_status(QueueItemStatus.QUARANTINED))
        self.assertEqual([i.id for i in listed], ["QUAR1"])
        self.assertEqual(self.successResultOf(self.queue.get_by_status(QueueItemStatus.QUEUED)), [])

    def test_release_makes_it_deliverable(self) -> None:
        processor, item = self.quarantine()
        self.clock.advance(60)
        released = self.successResultOf(Deferred.fromCoroutine(processor.release("QUAR1")))
        self.assertEqual(released.status, QueueItemStatus.QUEUED)
        self.assertEqual(released.next_attempt_at, START + 60)
        self.assertIsNone(released.last_error)
        self.assertEqual([i.id for i in self.notified], ["QUAR1"])
        [claimed] = self.successResultOf(self.queue.get_next(10))
        self.assertEqual((claimed.id, claimed.head), ("QUAR1", item.head))
        self.assertEqual(self.composed(claimed), item.head + BODY)

    def test_release_of_what_is_not_quarantined(self) -> None:
        processor, _ = self.quarantine()
        self.queued(processor.__class__(self.queue, self.clock.seconds), queue_id="PLAIN")
        self.assertIsNone(self.successResultOf(Deferred.fromCoroutine(processor.release("NOPE"))))
        self.assertIsNone(self.successResultOf(Deferred.fromCoroutine(processor.release("PLAIN"))))
        self.assertIsNotNone(self.successResultOf(Deferred.fromCoroutine(processor.release("QUAR1"))))
        self.assertIsNone(self.successResultOf(Deferred.fromCoroutine(processor.release("QUAR1"))))


class ScannerErrorTests(ChainCase):
    def test_unavailable_tempfails(self) -> None:
        down = ScriptedScanner(ScannerUnavailable("clamd: connection refused"), name="clamav")
        message = self.spooled()
        refusal = self.refusal(self.process(self.processor(scanners=[ScannerStage(down)]), message))
        self.assertEqual((refusal.reply.code, refusal.reply.enhanced), (451, "4.7.0"))
        self.assertIn("clamav", str(refusal.reply.text))
        self.assertEqual((self.count(), self.spool_files()), (0, []))

    def test_unavailable_as_a_failed_deferred(self) -> None:
        down = ScriptedScanner(lambda draft: fail(ScannerUnavailable("timeout")))
        refusal = self.refusal(self.process(self.processor(scanners=[ScannerStage(down)])))
        self.assertEqual((refusal.reply.code, refusal.reply.enhanced), (451, "4.7.0"))

    def test_unavailable_accepted_when_configured(self) -> None:
        down = ScriptedScanner(ScannerUnavailable("clamd: connection refused"))
        after = ScriptedScanner(verdict(Verdict.CLEAN))
        processor = self.processor(scanners=[ScannerStage(down, on_error="accept"), ScannerStage(after)])
        item = self.queued(processor)
        self.assertEqual(item.status, QueueItemStatus.QUEUED)
        self.assertEqual(len(after.seen), 1)

    def test_unscannable_policies(self) -> None:
        result = verdict(Verdict.UNSCANNABLE, "too deep")
        tempfail = ScannerStage(ScriptedScanner(result), "reject", on_unscannable="tempfail")
        refusal = self.refusal(self.process(self.processor(scanners=[tempfail])))
        self.assertEqual((refusal.reply.code, refusal.reply.enhanced), (451, "4.7.0"))
        self.assertIn("too deep", str(refusal.reply.text))

        accept = ScannerStage(ScriptedScanner(result), "reject", on_unscannable="accept")
        self.assertEqual(self.queued(self.processor(scanners=[accept])).status, QueueItemStatus.QUEUED)

        action = ScannerStage(ScriptedScanner(result), "reject", on_unscannable="action")
        refusal = self.refusal(self.process(self.processor(scanners=[action])))
        self.assertEqual((refusal.reply.code, refusal.reply.enhanced), (554, "5.7.1"))

    def test_unexpected_scanner_error_is_a_local_error(self) -> None:
        broken = ScriptedScanner(RuntimeError("bug"))
        message = self.spooled()
        refusal = self.refusal(self.process(self.processor(scanners=[ScannerStage(broken)]), message))
        self.assertEqual((refusal.reply.code, refusal.reply.enhanced), (451, "4.3.0"))
        self.assertEqual(self.spool_files(), [])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class ParallelTests(ChainCase):
    def test_max_parallel(self) -> None:
        held = HeldScanner()
        processor = self.processor(scanners=[ScannerStage(held)], max_parallel=2)
        first = self.process(processor, queue_id="P1")
        second = self.process(processor, queue_id="P2")
        self.assertEqual(processor.active, 2)
        message = self.spooled()
        refusal = self.refusal(self.process(processor, message, queue_id="P3"))
        self.assertEqual((refusal.reply.code, refusal.reply.enhanced), (451, "4.3.2"))
        self.assertEqual(processor.stats["tempfailed"], 1)
        self.assertEqual(len(held.waiting), 2)  # the third never reached the scanner
        # Refused before the chain took the message: ingress still owns (and discards) its file.
        self.assertIsNotNone(message.path)

        held.waiting[0].callback(verdict(Verdict.CLEAN))
        self.assertEqual(self.successResultOf(first).id, "P1")
        self.assertEqual(processor.active, 1)
        fourth = self.process(processor, queue_id="P4")
        self.assertEqual(processor.active, 2)
        held.waiting[1].callback(verdict(Verdict.CLEAN))
        held.waiting[2].callback(verdict(Verdict.CLEAN))
        self.assertEqual([self.successResultOf(second).id, self.successResultOf(fourth).id], ["P2", "P4"])
        self.assertEqual(processor.active, 0)
        self.assertEqual(self.count(), 3)

    def test_refusals_release_their_slot(self) -> None:
        processor = self.processor(
            scanners=[ScannerStage(ScriptedScanner(verdict(Verdict.VIRUS, "x")))], max_parallel=1
        )
        for _ in range(3):
            self.assertEqual(self.refusal(self.process(processor)).reply.code, 554)
        self.assertEqual(processor.active, 0)

    def test_local_mail_is_never_counted(self) -> None:
        held = HeldScanner()
        processor = self.processor(scanners=[ScannerStage(held)], max_parallel=1)
        self.process(processor)
        self.assertEqual(self.queued_local(processor).head, None)
        self.assertEqual(processor.active, 1)


class TimeoutTests(ChainCase):
    def test_stage_timeout_is_scanner_unavailable(self) -> None:
        held = HeldScanner()
        processor = self.processor(scanners=[ScannerStage(held, timeout=2.0)], timeout=120.0)
        d = self.process(processor)
        self.clock.advance(1.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        refusal = self.refusal(d)
        self.assertEqual((refusal.reply.code, refusal.reply.enhanced), (451, "4.7.0"))
        self.assertEqual(held.cancelled, 1)

    def test_stage_timeout_with_on_error_accept(self) -> None:
        held = HeldScanner()
        stage = ScannerStage(held, timeout=2.0, on_error="accept")
        d = self.process(self.processor(scanners=[stage], timeout=120.0))
        self.clock.advance(2.0)
        self.assertEqual(self.successResultOf(d).status, QueueItemStatus.QUEUED)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_timeout(self) -> None:
        held = HeldScanner()
        processor = self.processor(scanners=[ScannerStage(held)], timeout=5.0)
        message = self.spooled()
        d = self.process(processor, message)
        self.clock.advance(4.9)
        self.assertNoResult(d)
        assert message.path is not None
        self.assertEqual(self.spool_files(), [os.path.basename(message.path)])
        self.clock.advance(0.1)
        refusal = self.refusal(d)
        self.assertEqual((refusal.reply.code, refusal.reply.enhanced), (451, "4.4.1"))
        self.assertEqual(refusal.reason, "processingTimeout")
        self.assertEqual(held.cancelled, 1)
        self.assertEqual(self.spool_files(), [])
        self.assertEqual(self.count(), 0)
        self.assertEqual(processor.active, 0)
        self.assertEqual(processor.stats["tempfailed"], 1)

    def test_no_timer_left_after_success(self) -> None:
        held = HeldScanner()
        processor = self.processor(scanners=[ScannerStage(held)], timeout=5.0)
        d = self.process(processor)
        held.waiting[0].callback(verdict(Verdict.CLEAN))
        self.assertEqual(self.successResultOf(d).status, QueueItemStatus.QUEUED)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(held.cancelled, 0)

    def test_update_options(self) -> None:
        held = HeldScanner()
        processor = self.processor(scanners=[ScannerStage(held)], timeout=5.0)
        processor.update_options(timeout=1.0, max_parallel=1)
        d = self.process(processor)
        self.assertEqual(self.refusal(self.process(processor)).reply.enhanced, "4.3.2")
        self.clock.advance(1.0)
        self.assertEqual(self.refusal(d).reply.enhanced, "4.4.1")


class HeaderOnlyChangeTests(ChainCase):
    def expected(self, *added: bytes) -> bytes:
        return HEAD[:-2] + b"".join(added) + b"\r\n" + BODY

    def test_head_kept_apart_body_not_copied(self) -> None:
        message = self.spooled()
        assert message.path is not None
        inode = os.stat(message.path).st_ino
        processor = self.processor(transformations=[AddHeader("X-Gateway", "mx.test")])
        item = self.queued(processor, message)
        self.assertEqual(item.head, HEAD[:-2] + b"X-Gateway: mx.test\r\n\r\n")
        self.assertEqual(item.body_offset, len(HEAD))
        self.assertEqual(item.size, len(self.expected(b"X-Gateway: mx.test\r\n")))
        # The stored body is the received file itself.
        self.assertEqual(self.stored_body(item), MESSAGE)
        with self.successResultOf(self.queue.open_body(item.id)) as stream:
            self.assertEqual(os.fstat(stream.fileno()).st_ino, inode)
        self.assertEqual(len(self.spool_files()), 1)
        self.assertEqual(self.composed(item), self.expected(b"X-Gateway: mx.test\r\n"))

    def test_in_memory_message(self) -> None:
        item = self.queued(self.processor(transformations=[AddHeader("X-A", "1"), AddHeader("X-B", "2")]))
        self.assertEqual(self.stored_body(item), MESSAGE)
        self.assertEqual(self.composed(item), self.expected(b"X-A: 1\r\n", b"X-B: 2\r\n"))

    def test_header_too_large(self) -> None:
        processor = self.processor(
            transformations=[AddHeader("X-A", "1")], limits=MimeLimits(max_header_bytes=100)
        )
        message = self.spooled()
        refusal = self.refusal(self.process(processor, message))
        self.assertEqual((refusal.reply.code, refusal.reply.enhanced), (552, "5.3.4"))
        self.assertEqual((self.count(), self.spool_files()), (0, []))

    def test_not_a_header_block(self) -> None:
        data = b"This is not a header\r\nFrom: nor this\r\n\r\nbody\r\n"
        item = self.queued(self.processor(transformations=[AddHeader("X-A", "1")]), data)
        self.assertEqual((item.head, item.body_offset), (b"X-A: 1\r\n\r\n", 0))
        self.assertEqual(self.composed(item), b"X-A: 1\r\n\r\n" + data)

    def test_message_starting_with_an_empty_line(self) -> None:
        data = b"\r\nno headers at all\r\n"
        item = self.queued(self.processor(transformations=[AddHeader("X-A", "1")]), data)
        self.assertEqual(self.composed(item), b"X-A: 1\r\n\r\nno headers at all\r\n")

    def test_headers_only_message(self) -> None:
        data = b"From: a@old.example\r\nSubject: s\r\n"
        item = self.queued(self.processor(transformations=[AddHeader("X-A", "1")]), data)
        self.assertEqual(self.composed(item), data + b"X-A: 1\r\n\r\n")
        self.assertEqual(item.size, len(data) + len(b"X-A: 1\r\n\r\n"))

    def test_remove_and_modify(self) -> None:
        processor = self.processor(
            transformations=[
                RemoveHeader("received"),
                ModifyHeader("Subject", r"^hello$", "goodbye"),
            ]
        )
        item = self.queued(processor)
        expected = HEAD.replace(
            b"Received: from client.example.net\r\n\tby mx.example.com; Mon, 1 Jan 2024 00:00:00 +0000\r\n",
            b"",
        ).replace(b"Subject: hello", b"Subject: goodbye")
        self.assertEqual(self.composed(item), expected + BODY)

    def test_modify_cannot_inject(self) -> None:
        item = self.queued(
            self.processor(transformations=[ModifyHeader("Subject", "hello", "a\r\nBcc: x@y")])
        )
        self.assertIsNone(item.head)
        self.assertEqual(self.composed(item), MESSAGE)

    def test_local_skips_every_stage(self) -> None:
        reject = ScriptedScanner(verdict(Verdict.VIRUS, "x"))
        processor = self.processor(scanners=[ScannerStage(reject)], transformations=[AddHeader("X-A", "1")])
        item = self.queued_local(processor)
        self.assertEqual((item.head, reject.seen), (None, []))
        self.assertEqual(self.composed(item), MESSAGE)


class EnvelopeRewriteTests(ChainCase):
    def test_envelope_and_address_fields(self) -> None:
        rewrite = RewriteAddress({"@old.example": "@new.example", "carol@keep.example": "c@new.example"})
        envelope = self.envelope(
            "bob@old.example", "bob@new.example", "carol@keep.example", "z@other.example"
        )
        item = self.queued(self.processor(transformations=[rewrite]), envelope=envelope)
        self.assertEqual(item.envelope.mail_from, "alice@new.example")
        self.assertEqual(item.envelope.recipients, ["bob@new.example", "c@new.example", "z@other.example"])
        # The caller's envelope is not the processor's to change.
        self.assertEqual(envelope.mail_from, "alice@old.example")
        self.assertEqual(len(envelope.recipients), 4)
        head = HeaderBlock.parse(item.head[:-2])
        self.assertEqual(head.get("From"), "Alice <alice@new.example>")
        self.assertEqual(head.get("To"), "bob@new.example, c@new.example")
        self.assertEqual(head.get("Cc"), "Dave <dave@new.example>")
        self.assertEqual(
            self.successResultOf(self.queue.get(item.id)).envelope.recipients, item.envelope.recipients
        )

    def test_8bit_display_name_keeps_its_address(self) -> None:
        data = "From: Jörg <joerg@old.example>\r\nSubject: s\r\n\r\nbody\r\n".encode()
        rewrite = RewriteAddress({"@old.example": "@new.example"}, scope="headers")
        item = self.queued(self.processor(transformations=[rewrite]), data)
        self.assertIn("From: Jörg <joerg@new.example>\r\n".encode(), item.head)

    def test_scope_envelope_only(self) -> None:
        rewrite = RewriteAddress({"@old.example": "@new.example"}, scope="envelope")
        item = self.queued(self.processor(transformations=[rewrite]))
        self.assertEqual(item.envelope.recipients, ["bob@new.example"])
        self.assertIsNone(item.head)

    def test_null_sender_stays_null(self) -> None:
        rewrite = RewriteAddress(pattern=r".*@old\.example", replacement="x@new.example", scope="envelope")
        item = self.queued(self.processor(transformations=[rewrite]), envelope=self.envelope(sender=""))
        self.assertEqual(item.envelope.mail_from, "")

    def test_invalid_result_refused(self) -> None:
        rewrite = RewriteAddress({"bob@old.example": "bob@new.example\r\nRCPT TO:<x@y>"})
        refusal = self.refusal(self.process(self.processor(transformations=[rewrite])))
        self.assertEqual(refusal.reply.code, 451)
        self.assertEqual(self.count(), 0)
        self.flushLoggedErrors()


class DomainHeadersTests(ChainCase):
    def test_per_recipient_domain(self) -> None:
        domains = DomainHeaders(
            [
                (["a.example"], [("X-Dom", "a"), ("X-Dom-Extra", "a2")]),
                (["*.b.example"], [("X-Dom", "b")]),
                (["c.example"], [("X-Dom", "c")]),
            ]
        )
        envelope = self.envelope("one@a.example", "two@A.example", "x@mx.b.example")
        item = self.queued(self.processor(transformations=[domains]), envelope=envelope)
        head = HeaderBlock.parse(item.head[:-2])
        self.assertEqual(head.get_all("X-Dom"), ["a", "b"])
        self.assertEqual(head.get_all("X-Dom-Extra"), ["a2"])

    def test_no_matching_domain_changes_nothing(self) -> None:
        domains = DomainHeaders([(["c.example"], [("X-Dom", "c")])])
        self.assertIsNone(self.queued(self.processor(transformations=[domains])).head)

    def test_add_header_domains(self) -> None:
        only_c = AddHeader("X-For-C", "1", domains=["c.example"])
        self.assertIsNone(self.queued(self.processor(transformations=[only_c])).head)
        item = self.queued(
            self.processor(transformations=[only_c]), envelope=self.envelope("bob@old.example", "x@c.example")
        )
        self.assertIn(b"X-For-C: 1\r\n", item.head)


class TemplateTests(ChainCase):
    def test_tracking_values(self) -> None:
        add = AddHeader(
            "X-Tracking",
            "{queueId} from {sender} via {hostname} peer {peer} at {date} {unknown} {}",
            hostname="mx.test",
            now=self.clock.seconds,
        )
        item = self.queued(self.processor(transformations=[add]), queue_id="TRACK1")
        self.assertEqual(
            HeaderBlock.parse(item.head[:-2]).get("X-Tracking"),
            "TRACK1 from alice@old.example via mx.test peer 192.0.2.7 at Tue, 14 Nov 2023 22:13:20 -0000"
            " {unknown} {}",
        )
        null = self.queued(
            self.processor(transformations=[AddHeader("X-Sender", "{sender}")]),
            envelope=self.envelope(sender=""),
        )
        self.assertIn(b"X-Sender: <>\r\n", null.head)

    def test_sender_cannot_inject(self) -> None:
        add = AddHeader("X-Sender", "{sender}")
        for sender in (
            "evil@example.net\r\nBcc: victim@example.org",
            "evil@x\nBcc: v@y",
            "e@x\rB: y",
            "e@x\x00",
        ):
            with self.subTest(sender=sender):
                d = self.process(self.processor(transformations=[add]), envelope=self.envelope(sender=sender))
                refusal = self.refusal(d)
                self.assertEqual((refusal.reply.code, refusal.reply.enhanced), (451, "4.3.0"))
                self.assertEqual(self.count(), 0)
        self.flushLoggedErrors()

    def test_long_sender_is_folded(self) -> None:
        sender = "a" * 30 + "@" + "b" * 20 + ".example"
        add = AddHeader("X-Envelope-From", "received for {sender} at {hostname}", hostname="mx.test")
        item = self.queued(self.processor(transformations=[add]), envelope=self.envelope(sender=sender))
        field = item.head[item.head.index(b"X-Envelope-From:") : -2]
        self.assertEqual(field, b"X-Envelope-From: received for\r\n " + sender.encode() + b" at mx.test\r\n")


ED25519_PEM = private_key_pem(generate_private_key("ed25519")).decode("ascii")


def raw_config(private_key: str, **smtp: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "smtpConfig": {
            "ports": [2525],
            "hostname": "mx.example.com",
            "domainConfigs": [
                {
                    "domains": ["example.com"],
                    "targetIPs": ["10.0.0.10"],
                    "addHeaders": True,
                    "headerInfo": [{"name": "X-Domain", "value": "example.com"}],
                    "signDkim": True,
                    "dkimOptions": {
                        "domainName": "example.com",
                        "keySelector": "sel",
                        "privateKey": private_key,
                    },
                },
                {"domains": ["other.example"], "targetIPs": ["10.0.0.11"]},
            ],
            "transformations": [
                {"type": "addHeader", "header": "X-Queue", "value": "{queueId}"},
                {"type": "rewriteAddress", "map": {"@old.example": "@example.com"}},
            ],
            "maxParallelProcessing": 7,
            "processingTimeout": 30_000,
        }
    }
    config["smtpConfig"].update(smtp)
    return config


class BuildChainTests(ChainCase):
    pem = ED25519_PEM

    def setUp(self) -> None:
        super().setUp()
        self.key_path = os.path.abspath(self.mktemp())
        with open(self.key_path, "w") as f:
            f.write(self.pem)

    def chain_processor(self, **smtp: Any) -> EmailProcessor:
        options = load_options(raw_config(self.key_path, **smtp)).options
        assert options.smtp_config is not None
        chain = build_chain(options.smtp_config, self.clock)
        return self.processor(**chain.options())

    def message(self) -> bytes:
        return b"From: Alice <alice@old.example>\r\nTo: bob@example.com\r\nSubject: s\r\n\r\nbody\r\n"

    def test_loaded_config(self) -> None:
        options = load_options(raw_config(self.key_path)).options
        assert options.smtp_config is not None
        chain = build_chain(options.smtp_config, self.clock)
        self.assertEqual((chain.max_parallel, chain.timeout), (7, 30.0))
        self.assertEqual(
            [t.name for t in chain.transformations], ["headerInfo", "addHeader", "rewriteAddress"]
        )
        [signer] = chain.signers
        self.assertIsInstance(signer, DkimSign)
        self.assertEqual(len(signer), 1)

        envelope = self.envelope("bob@example.com")
        item = self.queued(
            self.processor(**chain.options()), self.message(), envelope=envelope, queue_id="CFG1"
        )
        head = HeaderBlock.parse(item.head[:-2])
        self.assertEqual(head.names()[0], "DKIM-Signature")
        self.assertIn("d=example.com", head.get("DKIM-Signature"))
        self.assertIn("a=ed25519-sha256", head.get("DKIM-Signature"))
        self.assertEqual(head.get("X-Domain"), "example.com")
        self.assertEqual(head.get("X-Queue"), "CFG1")
        self.assertEqual(head.get("From"), "Alice <alice@example.com>")  # rewritten, then signed
        self.assertEqual(item.envelope.mail_from, "alice@example.com")

    def test_header_processing_off(self) -> None:
        processor = self.chain_processor(headerProcessing=False)
        item = self.queued(processor, self.message(), envelope=self.envelope("bob@example.com"))
        head = HeaderBlock.parse(item.head[:-2])
        self.assertIsNone(head.get("X-Domain"))
        self.assertIsNone(head.get("X-Queue"))
        # rewriteAddress is an address change, not header processing: it still runs, and signing too.
        self.assertEqual(head.get("From"), "Alice <alice@example.com>")
        self.assertEqual(head.names()[0], "DKIM-Signature")

    def test_dkim_signing_off(self) -> None:
        processor = self.chain_processor(dkimSigning=False)
        item = self.queued(processor, self.message(), envelope=self.envelope("bob@example.com"))
        head = HeaderBlock.parse(item.head[:-2])
        self.assertEqual(head.get_all("DKIM-Signature"), [])
        self.assertEqual(head.get("X-Domain"), "example.com")

    def test_not_signed_for_other_from_domains(self) -> None:
        processor = self.chain_processor(transformations=[])
        data = b"From: x@other.example\r\nSubject: s\r\n\r\nbody\r\n"
        item = self.queued(processor, data, envelope=self.envelope("bob@example.com"))
        self.assertEqual(self.composed(item), data[:-8] + b"X-Domain: example.com\r\n\r\nbody\r\n")


class InterfaceTests(TestCase):
    def test_scripted_scanner_is_an_iscanner(self) -> None:
        self.assertTrue(verifyObject(IScanner, ScriptedScanner(verdict(Verdict.CLEAN))))

    def test_processor_is_an_imessageacceptor(self) -> None:
        self.assertTrue(verifyObject(IMessageAcceptor, EmailProcessor(ControlledQueue(), Clock().seconds)))


class FailingQueue(ControlledQueue):
    """A queue whose every enqueue fails with ``error`` (after taking the message, as a real one may)."""

    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error

    def enqueue(self, item: QueueItem, message: SpooledMessage) -> Deferred[QueueItem]:
        super().enqueue(item, message)
        return fail(self.error)


class AcceptTests(ChainCase):
    """``accept`` (IMessageAcceptor): what ingress is told. Every refusal carries its reply, the queue's
    too, so ingress needs to know nothing of queues or of the chain."""

    def accept(self, processor: EmailProcessor, queue_id: str = "ACC1") -> Deferred[Accepted]:
        return processor.accept(self.envelope(), SpooledMessage(len(MESSAGE), data=MESSAGE), queue_id)

    def test_queued(self) -> None:
        accepted = self.successResultOf(self.accept(self.processor()))
        self.assertEqual(accepted, Accepted("ACC1", Disposition.QUEUED))
        self.assertEqual(self.count(), 1)

    def test_quarantined(self) -> None:
        virus = ScriptedScanner(verdict(Verdict.VIRUS, "Eicar"), name="clamav")
        accepted = self.successResultOf(
            self.accept(self.processor(scanners=[ScannerStage(virus, "quarantine")]))
        )
        self.assertEqual(accepted, Accepted("ACC1", Disposition.QUARANTINED, "clamav: virus (Eicar)"))

    def test_discarded(self) -> None:
        virus = ScriptedScanner(verdict(Verdict.VIRUS, "Eicar"))
        accepted = self.successResultOf(
            self.accept(self.processor(scanners=[ScannerStage(virus, "discard")]))
        )
        self.assertEqual((accepted.queue_id, accepted.disposition), ("ACC1", Disposition.DISCARDED))
        self.assertIn("Eicar", accepted.reason)
        self.assertEqual(self.count(), 0)

    def test_rejected_by_a_scanner(self) -> None:
        spam = ScriptedScanner(verdict(Verdict.SPAM, "spammy"))
        refusal = self.failureResultOf(
            self.accept(self.processor(scanners=[ScannerStage(spam, "reject")])), Refusal
        ).value
        self.assertEqual((refusal.reply.code, refusal.reply.enhanced, refusal.storage), (550, "5.7.1", False))

    def test_queue_full_is_452(self) -> None:
        processor = EmailProcessor(FailingQueue(QueueFull("maxQueueSize 10 reached")), self.clock.seconds)
        refusal = self.failureResultOf(self.accept(processor), Refusal).value
        self.assertEqual((refusal.reply, refusal.storage), (QUEUE_FULL, False))
        self.assertEqual(refusal.reason, "maxQueueSize 10 reached")

    def test_store_down_is_451_and_a_storage_refusal(self) -> None:
        for error in (QueueUnavailable("redis down"), OSError(28, "No space left on device")):
            processor = EmailProcessor(FailingQueue(error), self.clock.seconds)
            refusal = self.failureResultOf(self.accept(processor), Refusal).value
            self.assertEqual((refusal.reply, refusal.storage), (LOCAL_ERROR, True))

    def test_a_bug_is_not_a_refusal(self) -> None:
        processor = EmailProcessor(FailingQueue(KeyError("bug")), self.clock.seconds)
        self.failureResultOf(self.accept(processor), KeyError)


class ArchiveWorkOffTheReactorTests(MemoryQueueCase):
    """A small message is inspected on the reactor thread, unless its archives would decompress more than
    INLINE_ARCHIVE_BYTES: then it is inspected again, in the thread pool. A big one goes to the pool at
    once."""

    def setUp(self) -> None:
        super().setUp()
        self.pool = ThreadPool(1, 1, "test-archives")
        self.pool.start()
        self.addCleanup(self.pool.stop)
        #: (on the reactor thread, with a work budget) for each inspection
        self.inspections: list[tuple[bool, bool]] = []
        inspect = processor_module.inspect_message

        def spy(stream: Any, limits: MimeLimits, budget: WorkBudget | None = None) -> Any:
            on_reactor = threading.current_thread() is threading.main_thread()
            self.inspections.append((on_reactor, budget is not None))
            return inspect(stream, limits, budget=budget)

        self.patch(processor_module, "inspect_message", spy)

    def metadata(self, data: bytes) -> Deferred[Draft]:
        processor = EmailProcessor(
            self.queue, self.clock.seconds, reactor=global_reactor, threadpool=self.pool
        )
        envelope = Envelope("alice@example.org", ["bob@example.com"])
        message = SpooledMessage(len(data), data=data)
        return Deferred.fromCoroutine(processor.extract_metadata(envelope, message, "ID"))

    def archive_message(self, data: bytes, padding: int = 0) -> bytes:
        return samples.message(
            samples.headers(("Content-Type", 'multipart/mixed; boundary="b"')),
            samples.multipart(b"b", [samples.text_part("x" * padding), samples.attachment("docs.zip", data)]),
        )

    async def test_costly_archives_of_a_small_message_are_listed_in_the_pool(self) -> None:
        # 1.4 MB that deflate squeezes about 57 times: no bomb, but more than the inline budget to expand.
        noise = random.Random(1)
        sparse = b"".join(bytes([noise.randrange(256)]) + bytes(199) for _ in range(7000))
        inner = make_zip({"sparse.bin": sparse, "run.exe": EXE}, zipfile.ZIP_STORED)
        self.assertGreater(len(inner), INLINE_ARCHIVE_BYTES)
        data = self.archive_message(make_zip({"inner.zip": inner}))
        self.assertLess(len(data), INLINE_BYTES)
        draft = await self.metadata(data)
        self.assertEqual(self.inspections, [(True, True), (False, False)])
        assert draft.info is not None
        self.assertEqual(
            draft.info.parts[1].archive_names, ("inner.zip", "inner.zip/sparse.bin", "inner.zip/run.exe")
        )
        self.assertIsNone(draft.info.parts[1].archive_problem)

    async def test_cheap_archives_of_a_small_message_are_listed_inline(self) -> None:
        data = self.archive_message(make_zip({"inner.zip": make_zip({"run.exe": EXE})}))
        draft = await self.metadata(data)
        self.assertEqual(self.inspections, [(True, True)])
        assert draft.info is not None
        self.assertEqual(draft.info.parts[1].archive_names, ("inner.zip", "inner.zip/run.exe"))

    async def test_a_big_message_is_inspected_in_the_pool_without_a_budget(self) -> None:
        data = self.archive_message(make_zip({"run.exe": EXE}), padding=INLINE_BYTES)
        await self.metadata(data)
        self.assertEqual(self.inspections, [(False, False)])
