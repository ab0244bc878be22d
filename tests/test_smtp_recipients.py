"""Recipient lists (dcrouter.smtp.recipients): entry syntax and matching, recipients files and their
re-reading when they change, on a Clock with the thread hop run when the test says."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial import unittest

from dcrouter.mail.address import Address, parse_rcpt_argument
from dcrouter.mail.recipients import RecipientTable, parse_recipients_file
from dcrouter.smtp import recipients as recipients_module
from dcrouter.smtp.recipients import FILE_CHECK_INTERVAL, RecipientsFile

DOMAINS = ["example.test", "*.corp.test", "bücher.test"]


def rcpt(text: str) -> Address:
    """An address as the SMTP parser makes it from RCPT TO:<text>."""
    address, _ = parse_rcpt_argument(f"TO:<{text}>", utf8=True)
    return address


class TableTests(unittest.SynchronousTestCase):
    def table(self, *entries: str) -> RecipientTable:
        return RecipientTable(entries, DOMAINS)

    def assertKnows(self, table: RecipientTable, *addresses: str) -> None:
        for text in addresses:
            self.assertTrue(table.knows(rcpt(text)), text)

    def assertUnknown(self, table: RecipientTable, *addresses: str) -> None:
        for text in addresses:
            self.assertFalse(table.knows(rcpt(text)), text)

    def test_exact_address(self) -> None:
        table = self.table("alice@example.test")
        self.assertKnows(table, "alice@example.test", "Alice@EXAMPLE.test")
        self.assertUnknown(table, "bob@example.test", "alice@a.corp.test", "alice+x@example.test")

    def test_local_part_at_every_domain_of_the_entry(self) -> None:
        table = self.table("bob")
        self.assertKnows(table, "bob@example.test", "BOB@a.corp.test", "bob@b.a.corp.test")
        self.assertUnknown(table, "bobby@example.test")

    def test_catch_all(self) -> None:
        for entry in ("@x.corp.test", "*@x.corp.test"):
            table = self.table(entry)
            self.assertKnows(table, "anyone@x.corp.test", "Else@X.corp.test")
            self.assertUnknown(table, "anyone@y.corp.test", "anyone@example.test")

    def test_wildcards_in_local_parts(self) -> None:
        table = self.table("sales-*@example.test", "alice+*", "*-bounces@a.corp.test")
        self.assertKnows(table, "sales-eu@example.test", "sales-@example.test", "Alice+Tag@a.corp.test")
        self.assertKnows(table, "list-bounces@a.corp.test")
        self.assertUnknown(table, "sales@example.test", "sales-eu@a.corp.test", "alice@example.test")
        self.assertUnknown(table, "list-bounces@b.corp.test", "xalice+y@example.test")
        self.assertKnows(self.table("*"), "whoever@example.test")

    def test_other_characters_are_literal(self) -> None:
        table = self.table("a.b?c@example.test")
        self.assertKnows(table, "a.b?c@example.test")
        self.assertUnknown(table, "aXbxc@example.test", "a.bc@example.test")

    def test_internationalised_domain_and_quoted_local_part(self) -> None:
        table = self.table("jörg@xn--bcher-kva.test", '"john smith"@example.test')
        self.assertKnows(table, "jörg@bücher.test", '"john smith"@example.test')

    def test_bad_entries(self) -> None:
        for entry, reason in [
            ("", "empty entry"),
            ("a b@example.test", "must be quoted"),
            ("a@other.test", "other.test is not one of this entry's domains"),
            ("a@corp.test", "corp.test is not one of this entry's domains"),
            ("a@*.corp.test", "name an exact domain"),
            ("a@exa mple.test", "is not a domain name"),
            ("a\n@example.test", "control characters"),
        ]:
            with self.subTest(entry=entry), self.assertRaises(ValueError) as caught:
                self.table("good@example.test", entry)
            self.assertIn(reason, str(caught.exception))

    def test_size(self) -> None:
        self.assertEqual(len(self.table("a", "b@example.test", "@x.corp.test", "c*")), 4)


class FileFormatTests(unittest.SynchronousTestCase):
    def test_comments_blank_lines_and_postfix_tables(self) -> None:
        data = b"# staff\n\nalice@example.test OK\n  bob\tREJECT is ignored too\n#carol@example.test\n"
        table = parse_recipients_file(data, "r.txt", DOMAINS)
        self.assertEqual(len(table), 2)
        self.assertTrue(table.knows(rcpt("bob@a.corp.test")))
        self.assertFalse(table.knows(rcpt("carol@example.test")))

    def test_bad_line_is_named(self) -> None:
        with self.assertRaises(ValueError) as caught:
            parse_recipients_file(b"alice\n\nbob@elsewhere.test\n", "r.txt", DOMAINS)
        self.assertEqual(
            str(caught.exception),
            "r.txt:3: 'bob@elsewhere.test': elsewhere.test is not one of this entry's domains",
        )

    def test_not_utf8(self) -> None:
        with self.assertRaises(ValueError) as caught:
            parse_recipients_file(b"j\xf6rg\n", "r.txt", DOMAINS)
        self.assertIn("r.txt: not UTF-8", str(caught.exception))


class HeldThreads:
    """``defer_to_thread`` for tests: the work runs when ``run()`` is called (or at once with ``hold=False``),
    on the test's thread."""

    def __init__(self, hold: bool = True) -> None:
        self.hold = hold
        self.calls = 0
        self._held: list[tuple[Callable[[], Any], Deferred[Any]]] = []

    def __call__(self, work: Callable[[], Any]) -> Deferred[Any]:
        self.calls += 1
        if not self.hold:
            return maybeDeferred(work)
        waiting: Deferred[Any] = Deferred()
        self._held.append((work, waiting))
        return waiting

    def run(self) -> None:
        held, self._held = self._held, []
        for work, waiting in held:
            maybeDeferred(work).chainDeferred(waiting)


class RecipientsFileTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.path = os.path.abspath(self.mktemp())
        self.write("alice@example.test\n")
        self.threads = HeldThreads()
        self.file = RecipientsFile(self.path, DOMAINS, clock=self.clock, defer_to_thread=self.threads)
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def write(self, text: str, replace: bool = False) -> None:
        """Write the file, in place or (``replace``) as a new file renamed over it, as editors do."""
        target = self.path + ".new" if replace else self.path
        with open(target, "w", encoding="utf-8") as handle:
            handle.write(text)
        if replace:
            os.replace(target, self.path)
        # The next version must differ in its signature even within one clock tick of the file system.
        stat = os.stat(self.path)
        self.version = getattr(self, "version", 0) + 1
        os.utime(self.path, ns=(stat.st_atime_ns, stat.st_mtime_ns + self.version * 1_000_000_000))

    def knows(self, text: str) -> bool:
        answer = self.file.knows(rcpt(text))
        if isinstance(answer, Deferred):
            self.threads.run()
            return bool(self.successResultOf(answer))
        return answer

    def test_lookups_between_checks_need_no_thread(self) -> None:
        self.assertIs(self.file.knows(rcpt("alice@example.test")), True)
        self.assertIs(self.file.knows(rcpt("bob@example.test")), False)
        self.assertEqual(self.threads.calls, 0)

    def test_a_change_is_seen_after_the_check_interval(self) -> None:
        self.write("bob@example.test\n")
        self.assertFalse(self.knows("bob@example.test"))  # not looked at yet
        self.clock.advance(FILE_CHECK_INTERVAL)
        self.assertTrue(self.knows("bob@example.test"))
        self.assertFalse(self.knows("alice@example.test"))
        self.assertEqual(self.threads.calls, 1)
        reloads = [formatEvent(e) for e in self.events if "reloaded" in formatEvent(e)]
        self.assertEqual(reloads, [f"recipients file {self.path} reloaded: 1 entries"])

    def test_replacement_by_rename_is_seen(self) -> None:
        self.write("carol\n", replace=True)
        self.clock.advance(FILE_CHECK_INTERVAL)
        self.assertTrue(self.knows("carol@a.corp.test"))

    def test_unchanged_file_is_not_read_again(self) -> None:
        reads: list[str] = []
        original = recipients_module.read_recipients_file
        self.patch(
            recipients_module,
            "read_recipients_file",
            lambda path, domains: reads.append(path) or original(path, domains),
        )
        for _ in range(3):
            self.clock.advance(FILE_CHECK_INTERVAL)
            self.assertTrue(self.knows("alice@example.test"))
        self.assertEqual((self.threads.calls, reads), (3, []))

    def test_lookups_during_a_check_share_it(self) -> None:
        self.write("bob@example.test\n")
        self.clock.advance(FILE_CHECK_INTERVAL)
        first = self.file.knows(rcpt("bob@example.test"))
        second = self.file.knows(rcpt("alice@example.test"))
        assert isinstance(first, Deferred) and isinstance(second, Deferred)
        self.assertNoResult(first)
        self.assertEqual(self.threads.calls, 1)
        self.threads.run()
        self.assertEqual((self.successResultOf(first), self.successResultOf(second)), (True, False))
        self.assertIs(self.file.knows(rcpt("bob@example.test")), True)  # checked: at once again

    def test_broken_version_keeps_the_last_good_table(self) -> None:
        self.write("bob@elsewhere.test\n")
        for _ in range(3):
            self.clock.advance(FILE_CHECK_INTERVAL)
            self.assertTrue(self.knows("alice@example.test"))
        errors = [formatEvent(e) for e in self.events if e["log_level"] == LogLevel.error]
        self.assertEqual(len(errors), 1, errors)  # once per broken version, not once per check
        self.assertIn("previous version stays in use", errors[0])
        self.assertIn(f"{self.path}:1:", errors[0])
        self.write("bob@example.test\n")
        self.clock.advance(FILE_CHECK_INTERVAL)
        self.assertTrue(self.knows("bob@example.test"))

    def test_missing_file_keeps_the_last_good_table(self) -> None:
        os.remove(self.path)
        for _ in range(2):
            self.clock.advance(FILE_CHECK_INTERVAL)
            self.assertTrue(self.knows("alice@example.test"))
        errors = [formatEvent(e) for e in self.events if e["log_level"] == LogLevel.error]
        self.assertEqual(len(errors), 1, errors)
        self.write("dave\n")
        self.clock.advance(FILE_CHECK_INTERVAL)
        self.assertTrue(self.knows("dave@example.test"))

    def test_unreadable_at_start_is_an_error(self) -> None:
        with self.assertRaises(OSError):
            RecipientsFile(self.path + ".missing", DOMAINS, clock=self.clock, defer_to_thread=self.threads)
        self.write("x@elsewhere.test\n")
        with self.assertRaises(ValueError):
            RecipientsFile(self.path, DOMAINS, clock=self.clock, defer_to_thread=self.threads)
