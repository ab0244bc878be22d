"""DATA: the line machine on its own (every chunking, smuggling, limits) and through the protocol (replies,
Received header, spool clean-up)."""

from __future__ import annotations

import itertools
import os

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from dcrouter.smtp.datastream import DataStream
from dcrouter.smtp.received import address_literal, with_protocol
from tests.smtp_fixtures import DATE, connect, make_config

START = b"EHLO client.example\r\nMAIL FROM:<sender@example.net>\r\nRCPT TO:<rcpt@example.org>\r\nDATA\r\n"
READY = b"354 End data with <CR><LF>.<CR><LF>\r\n"
BARE = b"550 5.6.0 Message refused: bare CR or LF in message text (RFC 5321 section 2.3.8)\r\n"
SMUGGLING = [b"\n.\r\n", b"\r\n.\n", b"\n.\n", b"\r.\r", b"\r.\r\n", b"\r\n.\r", b"\n.\r"]
LONG_LINE = b"554 5.6.0 Message refused: a %s line exceeds 998 octets (RFC 5322 section 2.1.1)\r\n"
NUL = b"550 5.6.0 Message refused: NUL character in message text\r\n"
#: Lines a downstream server that drops NUL octets would read as the end of data.
NUL_SMUGGLING = [b"\r\n\x00.\r\n", b"\r\n.\x00\r\n", b"\r\n\x00.\x00\r\n", b"\r\n\x00\x00.\r\n"]


def run(data: bytes, **limits: int) -> tuple[DataStream, bytes, bytes]:
    """Feed ``data`` in one piece; returns the stream, what it wrote, and what came after the end."""
    return run_split(data, [], **limits)


def run_split(data: bytes, cuts: list[int], **limits: int) -> tuple[DataStream, bytes, bytes]:
    """Feed ``data`` cut at the given positions; returns the stream, what it wrote, and what came after."""
    written: list[bytes] = []
    stream = DataStream(
        written.append,
        max_line_length=limits.get("max_line_length", 1000),
        max_message_size=limits.get("max_message_size", 1_000_000),
    )
    bounds = [0, *sorted({c for c in cuts if 0 < c < len(data)}), len(data)]
    for start, stop in itertools.pairwise(bounds):
        end = stream.feed(data[start:stop])
        if end >= 0:
            return stream, b"".join(written), data[start + end :]
    return stream, b"".join(written), b""


def _line_model(data: bytes, *, max_line: int) -> dict:
    """DATA read one line (up to and with its LF) at a time: a line starts after CRLF; ``.CRLF`` there ends
    the data and a leading dot there is removed; a line holding a CR other than its CRLF's, or ending without
    CRLF, is a bare line ending; headers end at the first empty line."""
    pos, at_bol, in_headers = 0, True, True
    out: list[bytes] = []
    found = {"bare": False, "nul": False, "too_long": False, "received": 0}
    while True:
        lf = data.index(b"\n", pos)
        line = data[pos : lf + 1]
        pos = lf + 1
        if at_bol and line == b".\r\n":
            return {"text": b"".join(out), "rest": data[pos:], **found}
        found["too_long"] = found["too_long"] or len(line) > max_line
        well_ended = line.endswith(b"\r\n")
        found["bare"] = found["bare"] or not well_ended or line.count(b"\r") != 1
        found["nul"] = found["nul"] or b"\x00" in line
        if at_bol and in_headers:
            if line == b"\r\n":
                in_headers = False
            elif line[:9].lower() == b"received:":
                found["received"] += 1
        if at_bol and line[:1] == b".":
            line = line[1:]
        out.append(line)
        at_bol = well_ended


class DataStreamTests(unittest.TestCase):
    def test_simple(self) -> None:
        stream, text, rest = run(b"Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n")
        self.assertTrue(stream.done)
        self.assertEqual(text, b"Subject: x\r\n\r\nbody\r\n")
        self.assertEqual(rest, b"QUIT\r\n")
        self.assertEqual(stream.size, len(text))
        self.assertFalse(stream.damaged)

    def test_dot_unstuffing(self) -> None:
        data = b".leading\r\nSubject: x\r\n\r\n..\r\n.x\r\n...y\r\nz.\r\n.\r\n"
        _stream, text, _ = run(data)
        self.assertEqual(text, b"leading\r\nSubject: x\r\n\r\n.\r\nx\r\n..y\r\nz.\r\n")

    def test_immediate_end(self) -> None:
        stream, text, rest = run(b".\r\nNOOP\r\n")
        self.assertEqual((stream.done, text, rest), (True, b"", b"NOOP\r\n"))

    def test_end_after_empty_body(self) -> None:
        _stream, text, rest = run(b"Subject: x\r\n\r\n.\r\n")
        self.assertEqual((text, rest), (b"Subject: x\r\n\r\n", b""))

    def test_not_done_without_terminator(self) -> None:
        stream, _text, _ = run(b"Subject: x\r\n\r\nbody\r\n.")
        self.assertFalse(stream.done)

    def test_every_two_way_split(self) -> None:
        data = b".a\r\nReceived: x\r\nB: y\r\n\r\n..z\r\n\r\n..\r\n\r\n.\r\nNEXT"
        whole = run(data)
        self.assertEqual(whole[1], b"a\r\nReceived: x\r\nB: y\r\n\r\n.z\r\n\r\n.\r\n\r\n")
        for cut in range(1, len(data)):
            stream, text, rest = run_split(data, [cut])
            self.assertEqual((text, rest, stream.received_count), (whole[1], b"NEXT", 1), cut)

    def test_byte_by_byte(self) -> None:
        data = b"A: b\r\n\r\n.x\r\n" + b"y" * 50 + b"\r\n.\r\nNEXT"
        _stream, text, rest = run_split(data, list(range(len(data))))
        self.assertEqual((text, rest), (b"A: b\r\n\r\nx\r\n" + b"y" * 50 + b"\r\n", b"NEXT"))

    @settings(max_examples=200, deadline=None)
    @given(
        st.lists(
            st.sampled_from([b"a", b".", b"\r\n", b"\r", b"\n", b"Received: x", b"\r\n.", b"x" * 7, b"\x00"]),
            max_size=40,
        ),
        st.lists(st.integers(min_value=1, max_value=400), max_size=8),
    )
    def test_chunking_never_matters(self, parts: list[bytes], cuts: list[int]) -> None:
        data = b"".join(parts) + b"\r\n.\r\nNEXT"
        expected = run(data, max_line_length=20)
        stream, text, rest = run_split(data, cuts, max_line_length=20)
        self.assertEqual(rest, expected[2])
        self.assertEqual(
            (stream.bare_line_ending, stream.nul, stream.line_too_long, stream.long_header_line, stream.size),
            (
                expected[0].bare_line_ending,
                expected[0].nul,
                expected[0].line_too_long,
                expected[0].long_header_line,
                expected[0].size,
            ),
        )
        if not expected[0].damaged:
            # A damaged message is thrown away whole: what was written or counted before does not matter.
            self.assertEqual((text, stream.received_count), (expected[1], expected[0].received_count))

    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(
            st.sampled_from(
                [
                    b"a",
                    b".",
                    b"..",
                    b"\r\n",
                    b"\r",
                    b"\n",
                    b"Received: x",
                    b"\r\n.",
                    b"x" * 7,
                    b"\x00",
                    b"\r\n\r\n",
                ]
            ),
            max_size=60,
        ),
        st.lists(st.integers(min_value=1, max_value=600), max_size=8),
    )
    def test_agrees_with_a_line_by_line_model(self, parts: list[bytes], cuts: list[int]) -> None:
        # The stream works on whole chunks (one search for <CRLF>., counts, rfind for line lengths); this
        # model reads the same text one line at a time, as RFC 5321 describes it.
        data = b"".join(parts) + b"\r\n.\r\nNEXT"
        model = _line_model(data, max_line=20)
        stream, text, rest = run_split(data, cuts, max_line_length=20)
        self.assertEqual(rest, model["rest"])
        self.assertEqual(
            (stream.bare_line_ending, stream.nul, stream.line_too_long),
            (model["bare"], model["nul"], model["too_long"]),
        )
        if not stream.damaged:
            self.assertEqual(
                (text, stream.size, stream.received_count),
                (model["text"], len(model["text"]), model["received"]),
            )

    def test_dots_where_lines_start(self) -> None:
        # A leading dot on the first line (of the headers, and of a body with no headers), a dot-stuffed
        # ".\r\n" inside, and a stuffed dot or the terminator cut anywhere across chunks.
        cases = [
            (b"..H: v\r\n\r\nbody\r\n.\r\n", b".H: v\r\n\r\nbody\r\n"),
            (b"\r\n..first\r\n.\r\n", b"\r\n.first\r\n"),
            (b"A: b\r\n\r\nx\r\n..\r\ny\r\n.\r\n", b"A: b\r\n\r\nx\r\n.\r\ny\r\n"),
            (b"A: b\r\n\r\n..\r\n...\r\n.x.\r\n.\r\n", b"A: b\r\n\r\n.\r\n..\r\nx.\r\n"),
        ]
        for data, text in cases:
            for cuts in ([], *([c] for c in range(1, len(data))), list(range(1, len(data)))):
                stream, written, rest = run_split(data + b"NEXT", cuts)
                self.assertEqual((written, rest, stream.damaged), (text, b"NEXT", False), (data, cuts))

    def test_crlf_split_across_chunks_is_one_line_ending(self) -> None:
        data = b"A: b\r\n\r\n" + b"line\r\n" * 50 + b".\r\n"
        for cut in range(1, len(data)):
            if data[cut - 1 : cut + 1] != b"\r\n":
                continue
            stream, written, rest = run_split(data, [cut])
            self.assertFalse(stream.bare_line_ending, cut)
            self.assertEqual((written, rest), (data[:-3], b""), cut)

    def test_line_lengths_across_many_lines(self) -> None:
        # Line lengths are checked a window at a time: a long line anywhere among short ones is found, and
        # lines exactly at the limit are not.
        short = b"y" * 10 + b"\r\n"
        at_limit = b"x" * 998 + b"\r\n"
        for position in (0, 1, 57, 199):
            lines = [short] * 200
            lines[position] = at_limit
            body = b"A: b\r\n\r\n" + b"".join(lines) + b".\r\n"
            self.assertFalse(run(body)[0].line_too_long, position)
            lines[position] = b"x" + at_limit
            body = b"A: b\r\n\r\n" + b"".join(lines) + b".\r\n"
            for cuts in ([], [len(body) // 2], list(range(0, len(body), 333))):
                self.assertTrue(run_split(body, cuts)[0].line_too_long, (position, cuts))

    def test_smuggling_sequences_never_end_data(self) -> None:
        for sequence in SMUGGLING:
            data = b"Subject: x\r\n\r\nbody" + sequence + b"MAIL FROM:<e@x.example>\r\n.\r\nAFTER"
            for cuts in ([], list(range(len(data)))):
                stream, _, rest = run_split(data, cuts)
                self.assertTrue(stream.bare_line_ending, sequence)
                self.assertEqual(rest, b"AFTER", sequence)

    def test_smuggling_in_headers(self) -> None:
        for sequence in SMUGGLING:
            stream, _, rest = run(b"Subject: x" + sequence + b"X: y\r\n.\r\nAFTER")
            self.assertTrue(stream.bare_line_ending, sequence)
            self.assertEqual(rest, b"AFTER", sequence)

    def test_nul_marks_the_message_wherever_it_is(self) -> None:
        for data in (
            b"Subject: x\x00\r\n\r\nbody\r\n.\r\nAFTER",
            b"\x00.\r\nSubject: x\r\n\r\n.\r\nAFTER",
            b"Subject: x\r\n\r\nbody\x00\r\n.\r\nAFTER",
            *(
                b"Subject: x\r\n\r\nbody" + s + b"MAIL FROM:<e@x.example>\r\n.\r\nAFTER"
                for s in [*NUL_SMUGGLING, b"\r\n.\r\x00\n", b"\r\x00\n.\r\n"]
            ),
        ):
            for cuts in ([], list(range(len(data)))):
                stream, _, rest = run_split(data, cuts)
                self.assertTrue(stream.nul, (data, cuts))
                self.assertTrue(stream.damaged, data)
                self.assertEqual(rest, b"AFTER", data)
        self.assertFalse(run(b"Subject: x\r\n\r\nbody\r\n.\r\n")[0].nul)

    def test_line_length_limit(self) -> None:
        for where in (b"", b"H: v\r\n\r\n"):
            ok = where + b"x" * 998 + b"\r\n.\r\n"
            self.assertFalse(run(ok)[0].line_too_long)
            self.assertFalse(run_split(ok, list(range(0, len(ok), 7)))[0].line_too_long)
            long = where + b"x" * 999 + b"\r\n.\r\nNEXT"
            for cuts in ([], list(range(0, len(long), 7)), [len(long) - 8]):
                stream, _, rest = run_split(long, cuts)
                self.assertTrue(stream.line_too_long, (where, cuts))
                self.assertEqual(rest, b"NEXT")

    def test_where_the_long_line_is(self) -> None:
        header = run(b"A: " + b"x" * 996 + b"\r\n\r\nbody\r\n.\r\n")[0]
        unfinished_header = run_split(b"A: " + b"x" * 2000 + b"\r\n\r\n.\r\n", [1500])[0]
        body = run(b"A: b\r\n\r\n" + b"x" * 999 + b"\r\n.\r\n")[0]
        for stream, where in ((header, b"header"), (unfinished_header, b"header"), (body, b"body")):
            reply = stream.refusal(max_received_headers=10)
            assert reply is not None
            self.assertEqual(reply.to_bytes(), LONG_LINE % where)

    def test_endless_line_keeps_memory_small(self) -> None:
        written: list[bytes] = []
        stream = DataStream(written.append, max_line_length=1000, max_message_size=10**9)
        for _ in range(100):
            self.assertEqual(stream.feed(b"x" * 4096), -1)
            self.assertLess(len(stream._carry), 1000)
        self.assertTrue(stream.line_too_long)
        self.assertEqual(stream.feed(b"\r\n.\r\n"), 5)

    def test_size_limit_stops_writing(self) -> None:
        data = (b"y" * 98 + b"\r\n") * 30 + b".\r\nNEXT"
        stream, text, rest = run_split(data, list(range(0, len(data), 512)), max_message_size=1000)
        self.assertTrue(stream.too_big)
        self.assertLessEqual(len(text), 1000)
        self.assertEqual(stream.size, 3000)
        self.assertEqual(rest, b"NEXT")

    def test_received_counted_in_headers_only(self) -> None:
        data = b"Received: a\r\nreceived: b\r\nRECEIVED:c\r\nX-Received: d\r\n\r\nReceived: body\r\n.\r\n"
        self.assertEqual(run(data)[0].received_count, 3)

    def test_feed_after_end_is_an_error(self) -> None:
        stream = run(b".\r\n")[0]
        self.assertRaises(RuntimeError, stream.feed, b"x")


class ReceivedHelperTests(unittest.TestCase):
    def test_with_protocol(self) -> None:
        self.assertEqual(with_protocol(esmtp=False, tls=True, authenticated=True, utf8=False), "SMTP")
        self.assertEqual(with_protocol(esmtp=True, tls=False, authenticated=False, utf8=False), "ESMTP")
        self.assertEqual(with_protocol(esmtp=True, tls=True, authenticated=True, utf8=False), "ESMTPSA")
        self.assertEqual(with_protocol(esmtp=True, tls=False, authenticated=True, utf8=True), "UTF8SMTPA")

    def test_address_literal(self) -> None:
        self.assertEqual(address_literal("192.0.2.1"), "[192.0.2.1]")
        self.assertEqual(address_literal("2001:db8:0::1"), "[IPv6:2001:db8::1]")
        self.assertEqual(address_literal("::ffff:192.0.2.1"), "[192.0.2.1]")

    def test_date_once_per_second_same_text(self) -> None:
        # The date is kept for its second; every instant still gets what email.utils makes of it, including
        # one a microsecond's rounding carries into the next second.
        import datetime
        import email.utils

        from dcrouter.smtp.received import _date

        for when in (
            1_700_000_000.2,
            1_700_000_000.9,
            1_700_000_000.9999997,
            1_700_000_000.5,
            1_700_000_001.0,
            1_699_999_999.99,
            0.0,
            5.9999999,
            5.1,
            -1.0,
            -0.5,
            -1.0,
        ):
            expected = email.utils.format_datetime(datetime.datetime.fromtimestamp(when, datetime.UTC))
            self.assertEqual(_date(when), expected, when)


class ProtocolDataTests(unittest.TestCase):
    def test_received_header_for_one_recipient(self) -> None:
        server = connect()
        server.exchange(START + b"Subject: x\r\n\r\nbody\r\n.\r\n")
        item = server.queue.items[0]
        self.assertEqual(
            server.queue.bodies[0],
            b"Received: from client.example ([192.0.2.10])\r\n"
            b"\tby mx.example.test (dcrouter) with ESMTP\r\n"
            b"\tid " + item.id.encode() + b"\r\n"
            b"\tfor <rcpt@example.org>; " + DATE.encode() + b"\r\n"
            b"Subject: x\r\n\r\nbody\r\n",
        )
        self.assertEqual(item.size, len(server.queue.bodies[0]))

    def test_received_header_for_two_recipients(self) -> None:
        server = connect()
        server.exchange(
            b"HELO c(x)\r\nMAIL FROM:<>\r\nRCPT TO:<a@example.org>\r\nRCPT TO:<b@example.org>\r\n"
            b"DATA\r\n.\r\n"
        )
        item = server.queue.items[0]
        self.assertEqual(
            server.queue.bodies[0],
            b"Received: from c_x_ ([192.0.2.10])\r\n"
            b"\tby mx.example.test (dcrouter) with SMTP\r\n"
            b"\tid " + item.id.encode() + b"; " + DATE.encode() + b"\r\n",
        )
        self.assertEqual(item.envelope.mail_from, "")

    def test_smuggling_is_refused_and_never_executed(self) -> None:
        for sequence in SMUGGLING:
            server = connect()
            out = server.exchange(
                START
                + b"Subject: a\r\n\r\nbody"
                + sequence
                + b"MAIL FROM:<evil@x.example>\r\nRCPT TO:<victim@example.org>\r\n"
                + b"DATA\r\nevil\r\n.\r\nNOOP\r\n"
            )
            self.assertTrue(out.endswith(READY + BARE + b"250 2.0.0 Ok\r\n"), (sequence, out))
            # EHLO (6 lines), MAIL, RCPT, 354, the refusal and NOOP: nothing of the smuggled commands.
            self.assertEqual(out.count(b"\r\n"), 11, sequence)
            self.assertEqual(server.queue.items, [], sequence)

    def test_nul_before_the_dot_is_refused_and_never_relayed(self) -> None:
        # A server downstream that dropped NUL octets would read "\x00." as the end of the data and run
        # the commands after it: the whole message is refused here, so nothing reaches it.
        for sequence in NUL_SMUGGLING:
            server = connect()
            out = server.exchange(
                START
                + b"Subject: a\r\n\r\nbody"
                + sequence
                + b"MAIL FROM:<spoof@victim.test>\r\nRCPT TO:<victim@example.org>\r\n"
                + b"DATA\r\nevil\r\n.\r\nNOOP\r\n"
            )
            self.assertTrue(out.endswith(READY + NUL + b"250 2.0.0 Ok\r\n"), (sequence, out))
            # EHLO (6 lines), MAIL, RCPT, 354, the refusal and NOOP: nothing of the smuggled commands.
            self.assertEqual(out.count(b"\r\n"), 11, sequence)
            self.assertEqual(server.queue.items, [], sequence)

    def test_nul_anywhere_refuses_the_message(self) -> None:
        for message in (b"Subject: a\x00b\r\n\r\nbody\r\n", b"Subject: a\r\n\r\nbo\x00dy\r\n"):
            server = connect()
            out = server.exchange(START + message + b".\r\nNOOP\r\n")
            self.assertTrue(out.endswith(READY + NUL + b"250 2.0.0 Ok\r\n"), out)
            self.assertEqual(server.queue.items, [])

    def test_pipelined_commands_after_the_end(self) -> None:
        server = connect()
        out = server.exchange(START + b"a\r\n.\r\nRSET\r\nNOOP\r\n")
        self.assertTrue(out.endswith(b"\r\n250 2.0.0 Ok\r\n250 2.0.0 Ok\r\n"))
        self.assertEqual(len(server.queue.items), 1)

    def test_terminator_in_separate_writes(self) -> None:
        server = connect()
        server.exchange(START)
        for piece in (b"a\r", b"\n", b".", b"\r", b"\nNO", b"OP\r\n"):
            out = server.exchange(piece)
        self.assertTrue(out.endswith(b"250 2.0.0 Ok\r\n"), out)
        self.assertEqual(len(server.queue.items), 1)

    def test_message_too_big_then_usable(self) -> None:
        server = connect()
        server.exchange(START)
        for _ in range(200):
            self.assertEqual(server.exchange(b"y" * 98 + b"\r\n"), b"")
        self.assertEqual(
            server.exchange(b".\r\nNOOP\r\n"),
            b"552 5.3.4 Message size exceeds fixed maximum message size\r\n250 2.0.0 Ok\r\n",
        )
        self.assertEqual(server.queue.items, [])

    def test_text_line_too_long_then_usable(self) -> None:
        server = connect()
        out = server.exchange(START + b"Subject: x\r\n\r\n" + b"x" * 2000 + b"\r\n.\r\nNOOP\r\n")
        self.assertTrue(
            out.endswith(READY + LONG_LINE % b"body" + b"250 2.0.0 Ok\r\n"),
            out,
        )
        self.assertEqual(server.queue.items, [])

    def test_long_to_header_is_refused_saying_so(self) -> None:
        # swaks --to with 150 recipients writes them all on one To: line (Postfix accepts and folds it).
        recipients = b", ".join(b"<user%d@example.org>" % n for n in range(150))
        self.assertGreater(len(b"To: " + recipients), 998)
        server = connect(make_config(max_message_size=100_000))
        out = server.exchange(START + b"To: " + recipients + b"\r\nSubject: x\r\n\r\nbody\r\n.\r\nNOOP\r\n")
        self.assertTrue(
            out.endswith(READY + LONG_LINE % b"header" + b"250 2.0.0 Ok\r\n"),
            out,
        )
        self.assertEqual(server.queue.items, [])

    def test_raised_line_limit_names_itself(self) -> None:
        server = connect(make_config(max_line_length=2000, max_message_size=100_000))
        out = server.exchange(START + b"H: " + b"v" * 1990 + b"\r\n\r\n" + b"b" * 1998 + b"\r\n.\r\n")
        self.assertTrue(out.endswith(b"250 2.0.0 Ok: queued as %s\r\n" % server.queue.items[0].id.encode()))
        out = server.exchange(START[21:] + b"H: v\r\n\r\n" + b"b" * 1999 + b"\r\n.\r\n")
        raised = b"554 5.6.0 Message refused: a body line exceeds 1998 octets (maxLineLength)\r\n"
        self.assertTrue(out.endswith(raised), out)

    def test_too_many_hops(self) -> None:
        server = connect()
        hops = b"Received: from a by b; date\r\n" * 4
        out = server.exchange(START + hops + b"\r\nbody\r\n.\r\n")
        self.assertTrue(out.endswith(READY + b"554 5.4.6 Too many hops (mail loop)\r\n"), out)
        out = server.exchange(START[21:] + hops[: 3 * 29] + b"\r\nReceived: in body\r\n.\r\n")
        self.assertTrue(out.endswith(b"250 2.0.0 Ok: queued as %s\r\n" % server.queue.items[0].id.encode()))

    def test_eight_bit_and_utf8_pass_through(self) -> None:
        server = connect()
        body = "Subject: é\r\n\r\nÜnïcödé ✓\r\n".encode()
        server.exchange(
            b"EHLO c\r\nMAIL FROM:<s\xc3\xa9@example.net> SMTPUTF8 BODY=8BITMIME\r\n"
            b"RCPT TO:<r\xc3\xa9@example.org>\r\nDATA\r\n" + body + b".\r\n"
        )
        self.assertTrue(server.queue.bodies[0].endswith(body))
        self.assertIn(b"with UTF8SMTP\r\n", server.queue.bodies[0])
        self.assertEqual(server.queue.items[0].envelope.recipients, ["ré@example.org"])

    def test_disconnect_mid_data_leaves_no_spool_file(self) -> None:
        server = connect(make_config(max_message_size=5_000_000))
        server.exchange(START)
        for _ in range(400):
            server.exchange(b"z" * 998 + b"\r\n")
        spool = server.factory.spool_directory
        self.assertEqual(len(os.listdir(spool)), 1)
        server.protocol.connectionLost()
        self.assertEqual(os.listdir(spool), [])

    def test_big_message_goes_through_a_file(self) -> None:
        server = connect(make_config(max_message_size=5_000_000))
        server.exchange(START)
        line = b"z" * 998 + b"\r\n"
        for _ in range(400):
            server.exchange(line)
        server.exchange(b".\r\n")
        self.assertTrue(server.queue.bodies[0].endswith(line * 400))
        self.assertEqual(os.listdir(server.factory.spool_directory), [])
