"""DSNs (RFC 3464 in RFC 6522 multipart/report), checked by parsing them with Python's ``email`` package."""

from __future__ import annotations

import email
import email.message
import email.policy
import email.utils
import io

from twisted.trial.unittest import TestCase

from dcrouter.delivery.dsn import build_dsn, read_header_block, remote_host, status_of
from dcrouter.mail.envelope import Envelope
from dcrouter.queue.item import QueueItem

NOW = 1_700_000_000.0
ARRIVED = NOW - 3600

HEADERS = (
    b"Received: from client.example (client.example [192.0.2.7])\r\n"
    b"\tby mx.test with ESMTP id ABC; Tue, 14 Nov 2023 21:13:20 +0000\r\n"
    b"From: Alice <alice@example.com>\r\n"
    b"To: bob@example.net\r\n"
    b"Subject: quarterly figures\r\n"
    b"Message-ID: <orig-1@example.com>\r\n"
)
BODY = HEADERS + b"\r\nsecret body line\r\n--not a boundary\r\n"


def original(sender: str = "alice@example.com") -> QueueItem:
    return QueueItem(
        id="0123456789ABCDEF0123",
        envelope=Envelope(mail_from=sender, recipients=["bob@example.net", "carol@example.org"]),
        size=len(BODY),
        created_at=ARRIVED,
    )


def build(**changes: object) -> bytes:
    args: dict[str, object] = {
        "reporting_mta": "mx.test",
        "original": original(),
        "failed": [
            ("bob@example.net", "550 5.1.1 <bob@example.net>: No such user", "mx1.example.net:25"),
            ("carol@example.org", "451 4.4.7 Message expired; last error: 421 4.4.2 Timeout", ""),
        ],
        "action": "failed",
        "headers_of_original": HEADERS,
        "arrival_date": ARRIVED,
        "message_id": "0123456789ABCDEF0123B@mx.test",
        "now": NOW,
    }
    args.update(changes)
    return build_dsn(**args)  # type: ignore[arg-type]


def parse(data: bytes) -> email.message.Message:
    return email.message_from_bytes(data, policy=email.policy.compat32)


def check_wire_form(test: TestCase, data: bytes) -> None:
    """CRLF only, no line of 998 octets or more, 7-bit."""
    test.assertTrue(data.endswith(b"\r\n"))
    test.assertNotIn(b"\r\r", data)
    test.assertEqual(data.count(b"\n"), data.count(b"\r\n"))
    test.assertEqual(data.count(b"\r"), data.count(b"\r\n"))
    test.assertTrue(all(len(line) < 998 for line in data.split(b"\r\n")))
    test.assertTrue(data.isascii())


class BounceTests(TestCase):
    def test_top_level_fields(self) -> None:
        data = build()
        check_wire_form(self, data)
        msg = parse(data)
        self.assertEqual(msg["From"], "Mail Delivery System <MAILER-DAEMON@mx.test>")
        self.assertEqual(msg["To"], "<alice@example.com>")
        self.assertEqual(msg["Subject"], "Undelivered Mail Returned to Sender")
        self.assertEqual(msg["Auto-Submitted"], "auto-replied")
        self.assertEqual(msg["MIME-Version"], "1.0")
        self.assertEqual(msg["Message-ID"], "<0123456789ABCDEF0123B@mx.test>")
        self.assertEqual(email.utils.parsedate_to_datetime(msg["Date"]).timestamp(), NOW)
        self.assertEqual(msg.get_content_type(), "multipart/report")
        self.assertEqual(msg.get_param("report-type"), "delivery-status")
        self.assertEqual(
            [p.get_content_type() for p in msg.get_payload()],
            ["text/plain", "message/delivery-status", "text/rfc822-headers"],
        )
        self.assertEqual(msg.defects, [])

    def test_human_part_names_every_recipient_and_reason(self) -> None:
        human = parse(build()).get_payload()[0]
        text = human.get_payload(decode=True).decode("ascii")
        self.assertIn("mail system at host mx.test", text)
        self.assertIn("could not be delivered", text)
        self.assertIn("<bob@example.net>: 550 5.1.1 <bob@example.net>: No such user", text)
        self.assertIn("<carol@example.org>: 451 4.4.7 Message expired", text)
        self.assertIn("0123456789ABCDEF0123", text)

    def test_delivery_status_fields(self) -> None:
        status = parse(build()).get_payload()[1]
        per_message, bob, carol = status.get_payload()
        self.assertEqual(per_message["Reporting-MTA"], "dns; mx.test")
        self.assertEqual(email.utils.parsedate_to_datetime(per_message["Arrival-Date"]).timestamp(), ARRIVED)
        self.assertEqual(bob["Final-Recipient"], "rfc822; bob@example.net")
        self.assertEqual(bob["Action"], "failed")
        self.assertEqual(bob["Status"], "5.1.1")
        self.assertEqual(bob["Remote-MTA"], "dns; mx1.example.net")
        self.assertEqual(bob["Diagnostic-Code"], "smtp; 550 5.1.1 <bob@example.net>: No such user")
        self.assertEqual(email.utils.parsedate_to_datetime(bob["Last-Attempt-Date"]).timestamp(), NOW)
        self.assertEqual(carol["Final-Recipient"], "rfc822; carol@example.org")
        self.assertEqual(carol["Status"], "4.4.7")
        self.assertIsNone(carol["Remote-MTA"])  # nobody answered
        self.assertIsNone(carol["Will-Retry-Until"])

    def test_original_headers_only(self) -> None:
        data = build()
        part = parse(data).get_payload()[2]
        self.assertEqual(part.get_payload(decode=True), HEADERS)
        self.assertNotIn(b"secret body line", data)

    def test_long_diagnostic_is_folded(self) -> None:
        reply = "550 5.7.1 " + " ".join(["rejected-because-of-policy"] * 60)
        data = build(failed=[("bob@example.net", reply, "[2001:db8::1]:25")])
        check_wire_form(self, data)
        bob = parse(data).get_payload()[1].get_payload()[1]
        unfolded = " ".join(bob["Diagnostic-Code"].split())
        self.assertTrue(unfolded.startswith("smtp; 550 5.7.1 rejected-because-of-policy"))
        self.assertEqual(bob["Remote-MTA"], "dns; 2001:db8::1")

    def test_multiline_reply_and_control_characters_do_not_break_fields(self) -> None:
        data = build(failed=[("bob@example.net", "550-5.1.1 first\r\n550 5.1.1 second\x00", "")])
        check_wire_form(self, data)
        bob = parse(data).get_payload()[1].get_payload()[1]
        self.assertEqual(bob["Diagnostic-Code"], "smtp; 550-5.1.1 first 550 5.1.1 second")
        self.assertEqual(bob["Status"], "5.1.1")

    def test_non_ascii_is_encoded(self) -> None:
        headers = "Subject: Grüße\r\nFrom: jörg@example.com\r\n".encode()
        data = build(
            failed=[("björn@exämple.net", "550 5.1.1 Benutzer unbekannt: björn", "")],
            headers_of_original=headers,
        )
        check_wire_form(self, data)
        msg = parse(data)
        human, status, original_headers = msg.get_payload()
        self.assertEqual(human.get_content_charset(), "utf-8")
        self.assertEqual(human["Content-Transfer-Encoding"], "quoted-printable")
        self.assertIn(
            "<björn@exämple.net>: 550 5.1.1 Benutzer unbekannt: björn",
            human.get_payload(decode=True).decode("utf-8"),
        )
        rcpt = status.get_payload()[1]
        self.assertEqual(rcpt["Final-Recipient"], "utf-8; bj\\x{F6}rn@ex\\x{E4}mple.net")
        self.assertEqual(rcpt["Diagnostic-Code"], "smtp; 550 5.1.1 Benutzer unbekannt: bj?rn")
        self.assertEqual(original_headers["Content-Transfer-Encoding"], "quoted-printable")
        self.assertEqual(original_headers.get_payload(decode=True), headers)

    def test_status_without_enhanced_code(self) -> None:
        self.assertEqual(status_of("554 Transaction failed", "failed"), "5.0.0")
        self.assertEqual(status_of("421 Service not available", "delayed"), "4.0.0")
        self.assertEqual(status_of("Connection refused", "failed"), "5.0.0")
        self.assertEqual(status_of("Connection refused", "delayed"), "4.0.0")
        self.assertEqual(status_of("452-4.2.2 Mailbox full", "delayed"), "4.2.2")

    def test_same_input_same_bytes(self) -> None:
        self.assertEqual(build(), build())
        self.assertNotEqual(build(), build(message_id="other@mx.test"))

    def test_never_to_the_null_sender(self) -> None:
        self.assertRaises(ValueError, build, original=original(sender=""))

    def test_refuses_an_empty_report_and_unknown_actions(self) -> None:
        self.assertRaises(ValueError, build, failed=[])
        self.assertRaises(ValueError, build, action="relayed")


class DelayWarningTests(TestCase):
    def test_delayed(self) -> None:
        until = ARRIVED + 5 * 86400
        data = build(
            action="delayed",
            failed=[("bob@example.net", "451 4.2.2 Mailbox full", "mx1.example.net:25")],
            will_retry_until=until,
        )
        check_wire_form(self, data)
        msg = parse(data)
        self.assertEqual(msg["Subject"], "Delayed Mail (still being retried)")
        self.assertEqual(msg["Auto-Submitted"], "auto-replied")
        human, status, _ = msg.get_payload()
        self.assertIn("WARNING ONLY", human.get_payload(decode=True).decode("ascii"))
        bob = status.get_payload()[1]
        self.assertEqual(bob["Action"], "delayed")
        self.assertEqual(bob["Status"], "4.2.2")
        self.assertEqual(email.utils.parsedate_to_datetime(bob["Will-Retry-Until"]).timestamp(), until)


class HeaderBlockTests(TestCase):
    def test_stops_at_the_blank_line(self) -> None:
        self.assertEqual(read_header_block(io.BytesIO(BODY)), HEADERS)

    def test_lf_only_lines_become_crlf(self) -> None:
        self.assertEqual(read_header_block(io.BytesIO(b"A: 1\nB: 2\n\nbody\n")), b"A: 1\r\nB: 2\r\n")

    def test_bounded_and_cut_at_a_line(self) -> None:
        stream = io.BytesIO(b"".join(b"X-Filler-%03d: %s\r\n" % (i, b"y" * 80) for i in range(1000)))
        block = read_header_block(stream, limit=1000)
        self.assertLessEqual(len(block), 1000)
        self.assertTrue(block.endswith(b"\r\n"))
        self.assertEqual(block.count(b"\r\n"), 10)  # 97 octets per line
        self.assertLessEqual(stream.tell(), 1002)

    def test_a_message_without_body_separator(self) -> None:
        self.assertEqual(read_header_block(io.BytesIO(b"A: 1\r\nB: 2")), b"A: 1\r\n")

    def test_remote_host(self) -> None:
        self.assertEqual(remote_host("mx.example:25"), "mx.example")
        self.assertEqual(remote_host("[::1]:2525"), "::1")
        self.assertEqual(remote_host("192.0.2.1"), "192.0.2.1")
        self.assertEqual(remote_host(""), "")
