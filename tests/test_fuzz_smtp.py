"""Fuzzing the ESMTP server protocol (dcrouter.smtp.protocol) in memory: commands with random arguments,
pipelined bursts cut anywhere, DATA with hostile framing, AUTH exchanges with garbage base64, STARTTLS at odd
times, timers firing between bursts.

Whatever the client sends: no unhandled error is logged; every reply line is ``NNN`` then a space or a
hyphen, its code one the documentation names (docs/smtp.md); replies stay in proportion to the input; input
waiting to be read and message text held in memory stay bounded. Without STARTTLS (which discards what
follows it) and without timers, the transcript does not depend on how the bytes were cut, nor on when the
client reads its replies. SessionModel, a state machine, checks each reply's code against a model of the
command sequence.
"""

from __future__ import annotations

import base64
import os
import re
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from twisted.internet.interfaces import ITLSTransport
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from dcrouter.config.auth import AuthConfig
from dcrouter.smtp.framing import AUTH_LINE_LIMIT, MAX_PENDING_INPUT
from tests.fuzzing import examples, split
from tests.smtp_fixtures import PASSWORD, BufferingTransport, Server, connect, make_config


def documented_codes() -> set[int]:
    """The codes of docs/smtp.md's "Reply codes" table."""
    with open(
        os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "smtp.md")
    ) as f:
        page = f.read()
    section = page.split("## Reply codes", 1)[1].split("\n## ", 1)[0]
    return {int(code) for code in re.findall(r"^\| `([2-5]\d\d)` \|", section, re.MULTILINE)}


#: Every reply code the documentation names (docs/smtp.md, "Reply codes").
DOCUMENTED_CODES = documented_codes()
REPLY_LINE = re.compile(rb"^([2-5]\d\d)([ -])(.*)$")
#: The longest reply dcrouter sends (EHLO's, with AUTH) is well under this per command line.
MAX_REPLY_PER_LINE = 400
SPOOL_MEMORY_LIMIT = 256 * 1024

_words = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=30)
_ascii = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
_local = st.sampled_from(["a", "user", "x.y", '"q q"', "", "ü", "postmaster", "a+b"])
_domain = st.sampled_from(
    ["example.org", "example.net", "[192.0.2.1]", "[IPv6:::1]", "ü.example", "", "a..b"]
)
_address = st.builds(
    lambda local, domain, shape: shape.format(local, domain),
    _local,
    _domain,
    st.sampled_from(["<{}@{}>", "{}@{}", "<@x,@y:{}@{}>", "<{}@@{}>", "<>", "<{}@{}"]),
)
_params = st.lists(
    st.sampled_from(
        [
            "SIZE=100",
            "SIZE=999999999999",
            "SIZE=x",
            "BODY=8BITMIME",
            "BODY=7BIT",
            "BODY=BINARYMIME",
            "SMTPUTF8",
            "RET=HDRS",
            "NOTIFY=NEVER",
            "X=\u00e9",
            "AUTH=<>",
            "SIZE=",
        ]
    ),
    max_size=3,
).map(" ".join)
_b64 = st.one_of(
    st.binary(max_size=60).map(lambda raw: base64.b64encode(raw).decode()),
    st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=*- ", max_size=60),
    st.just(base64.b64encode(b"\0alice\0" + PASSWORD.encode()).decode()),
    st.just(base64.b64encode(b"alice").decode()),
    st.just(base64.b64encode(PASSWORD.encode()).decode()),
    st.just("*"),
    st.just("="),
)
_endings = st.sampled_from([b"\r\n"] * 8 + [b"\n", b"\r", b"", b"\r\r\n", b"\x00\r\n"])


def _line(text: str, ending: bytes) -> bytes:
    return text.encode("utf-8", "surrogatepass") + ending


_commands = st.one_of(
    st.builds(
        lambda verb, arg: f"{verb} {arg}",
        st.sampled_from(["EHLO", "HELO", "ehlo"]),
        st.one_of(st.just("client.example"), _words),
    ),
    st.builds(lambda addr, params: f"MAIL FROM:{addr} {params}".rstrip(), _address, _params),
    st.builds(lambda addr, params: f"RCPT TO:{addr} {params}".rstrip(), _address, _params),
    st.just("RCPT TO:<rcpt@example.org>"),
    st.builds(
        lambda mech, resp: f"AUTH {mech} {resp}".rstrip(),
        st.sampled_from(["PLAIN", "LOGIN", "plain", "CRAM-MD5", "X", ""]),
        _b64,
    ),
    _b64,  # a SASL response line, or a stray one
    st.sampled_from(
        [
            "DATA",
            "DATA x",
            "RSET",
            "NOOP",
            "VRFY",
            "VRFY x",
            "HELP",
            "QUIT",
            "STARTTLS",
            "STARTTLS x",
            "BDAT 10",
            "BDAT 0 LAST",
            "ETRN x",
            "GET / HTTP/1.1",
            "",
        ]
    ),
    st.builds(
        lambda verb, arg: f"{verb} {arg}",
        st.sampled_from(["MAIL", "RCPT", "NOOP", "XYZZY", "mail from:"]),
        _words,
    ),
    _ascii,
)
command_lines = st.builds(_line, _commands, _endings)
#: A line too long for a command (maxCommandLineLength, or the AUTH limit).
long_lines = st.builds(
    lambda prefix, size, ending: prefix + b"x" * size + ending,
    st.sampled_from([b"", b"AUTH PLAIN ", b"NOOP ", b"MAIL FROM:<"]),
    st.sampled_from([500, 511, 512, 513, 1000, AUTH_LINE_LIMIT - 11, AUTH_LINE_LIMIT + 5]),
    _endings,
)

_body_lines = st.one_of(
    st.sampled_from(
        [
            b".",
            b"..",
            b".x",
            b"...",
            b"Subject: hi",
            b"Received: from x",
            b"",
            b" folded",
            b"\x00.",
            b".\x00",
            b"\r.",
            b"\n.",
            b".\r",
            b"From: a@example.net",
            b"Content-Type: multipart/mixed; boundary=b",
            b"--b",
            b"--b--",
        ]
    ),
    st.binary(max_size=40),
    st.builds(lambda n: b"y" * n, st.sampled_from([997, 998, 999, 1000, 2000])),
)
_separators = st.sampled_from([b"\r\n"] * 6 + [b"\n", b"\r", b"\r\r\n"])
#: Message text: lines, mostly CRLF-ended, then (usually) the end of data.
data_bodies = st.builds(
    lambda lines, end: b"".join(line + sep for line, sep in lines) + end,
    st.lists(st.tuples(_body_lines, _separators), max_size=12),
    st.sampled_from([b".\r\n"] * 5 + [b"\r\n.\r\n", b".\n", b"", b"\n.\n"]),
)
transaction = st.builds(
    lambda body: (
        b"EHLO client.example\r\nMAIL FROM:<sender@example.net>\r\nRCPT TO:<rcpt@example.org>\r\n"
        b"DATA\r\n" + body
    ),
    data_bodies,
)
#: An AUTH exchange after EHLO: a mechanism, maybe an initial response, then response lines.
auth_exchange = st.builds(
    lambda mech, responses: (
        b"EHLO client.example\r\nAUTH " + mech + b"".join(r.encode() + b"\r\n" for r in responses)
    ),
    st.sampled_from([b"PLAIN\r\n", b"LOGIN\r\n", b"PLAIN ", b"LOGIN ", b"PLAIN =\r\n"]),
    st.lists(_b64, max_size=3),
)
elements = st.one_of(command_lines, command_lines, long_lines, data_bodies, transaction, auth_exchange)
streams = st.lists(elements, max_size=14).map(b"".join)


@implementer(ITLSTransport)
class TLSCapableTransport(BufferingTransport):
    """A StringTransport that can "start TLS": it records the switch; what arrives afterwards stands for the
    decrypted bytes. The handshake itself is tested with real TLS in test_smtp_starttls."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tls_started = 0

    def startTLS(self, contextFactory: Any, normal: bool = True) -> None:
        self.tls_started += 1


def session(*, tls: bool, config_changes: dict[str, Any], buffer_size: int = 64 * 1024) -> Server:
    """A server on a transport that pushes back past ``buffer_size`` unread bytes (as TCP does)."""
    config = make_config(**config_changes)
    kind = TLSCapableTransport if tls else BufferingTransport
    server = connect(config, tls_options=object() if tls else None, transport_class=kind)
    assert isinstance(server.transport, BufferingTransport)
    server.transport.buffer_size = buffer_size
    return server


def _config_changes(auth: str, **limits: int) -> dict[str, Any]:
    """SmtpConfig changes: ``auth`` "insecure" (AUTH without TLS), "default" (only after TLS) or "required"
    (AUTH before MAIL too)."""
    insecure = auth != "default"
    return {
        "auth": AuthConfig(failure_delay=0, allow_insecure=insecure, required=auth == "required"),
        **limits,
    }


configs = st.builds(
    _config_changes,
    auth=st.sampled_from(["insecure", "default", "required"]),
    max_bad_commands=st.sampled_from([5, 1000]),
    max_junk_commands=st.sampled_from([3, 1000]),
    max_message_size=st.sampled_from([100, 10_000, 1_000_000]),
)


class Transcript:
    """What the server wrote, checked line by line as it comes."""

    def __init__(self, test: TestCase) -> None:
        self.test = test
        self.lines: list[bytes] = []
        self._partial = b""

    def add(self, output: bytes) -> None:
        data = self._partial + output
        *complete, self._partial = data.split(b"\r\n")
        for line in complete:
            match = REPLY_LINE.match(line)
            self.test.assertIsNotNone(match, line)
            assert match is not None
            self.test.assertIn(int(match.group(1)), DOCUMENTED_CODES, line)
            self.test.assertNotIn(b"\n", line)
            self.lines.append(re.sub(rb"queued as \S+", b"queued as ID", line))

    def finish(self) -> list[bytes]:
        self.test.assertEqual(self._partial, b"", "a reply without its CRLF")
        return self.lines


def drive(
    test: TestCase,
    server: Server,
    pieces: list[bytes],
    advances: list[float] | None = None,
    *,
    lazy: bool = False,
) -> list[bytes]:
    """Feed ``pieces`` (the client's bursts) one by one, checking the bounds after each; returns the
    transcript. ``advances``: seconds the clock moves after each piece. The client reads every reply at once,
    or (``lazy``) only when the server has stopped reading from it, as a client blocked on a full TCP window
    would have to."""
    transport = server.transport
    assert isinstance(transport, BufferingTransport)
    transcript = Transcript(test)
    transcript.add(transport.drain())
    protocol = server.protocol
    for index, piece in enumerate(pieces):
        for _ in range(3):
            if transport.producerState != "paused":
                break
            transcript.add(transport.drain())
        protocol.dataReceived(piece)
        # Unread replies stay within the transport's buffer (and the reply that crossed it, and a 421).
        test.assertLessEqual(len(transport.value()), transport.buffer_size + 2 * MAX_REPLY_PER_LINE)
        if not lazy:
            output = transport.drain()
            # Replies in proportion to what was sent: at most one reply (of bounded size) per line received.
            test.assertLessEqual(len(output), MAX_REPLY_PER_LINE * (piece.count(b"\n") + 2))
            transcript.add(output)
        # Input waiting to be handled is bounded (the transport is paused, then the session closed).
        test.assertLessEqual(len(protocol._in), 4 * MAX_PENDING_INPUT + len(piece))
        # Message text is never held whole in memory: the stream keeps a partial line, the spool a bound.
        stream = protocol._stream
        if stream is not None:
            test.assertLessEqual(len(stream._carry), 1000 + len(piece))
        spool = protocol._spool
        if spool is not None and spool._buffer is not None:
            test.assertLessEqual(spool._buffered, SPOOL_MEMORY_LIMIT + len(piece) + 1000)
        if advances and index < len(advances):
            server.clock.advance(advances[index])
            if not lazy:
                transcript.add(transport.drain())
    while output := transport.drain():
        transcript.add(output)
    protocol.connectionLost()
    transcript.add(transport.drain())
    errors = test.flushLoggedErrors()
    test.assertEqual(errors, [], [e.getTraceback() for e in errors])
    return transcript.finish()


class SMTPFuzzTests(TestCase):
    @examples(0.5)
    @given(streams, st.lists(st.integers(0, 1 << 16), max_size=10), configs, st.sampled_from([64, 300, 4096]))
    def test_any_client_any_cut(
        self, stream: bytes, cuts: list[int], changes: dict[str, Any], buffer_size: int
    ) -> None:
        """Without STARTTLS or timers, cutting the stream differently, or reading the replies late (the
        server then holds back), changes nothing."""
        whole = drive(self, session(tls=False, config_changes=changes), [stream])
        lazy = session(tls=False, config_changes=changes, buffer_size=buffer_size)
        pieces = drive(self, lazy, split(stream, cuts), lazy=True)
        self.assertEqual(pieces, whole)

    @examples(0.5)
    @given(
        st.lists(
            st.one_of(streams, st.just(b"STARTTLS\r\n"), st.just(b"EHLO x\r\nSTARTTLS\r\nEHLO y\r\n")),
            min_size=1,
            max_size=4,
        ),
        st.lists(st.sampled_from([0, 0, 0, 1, 30, 300, 3600]), max_size=4),
        configs,
        st.booleans(),
    )
    def test_starttls_and_timers_anywhere(
        self, bursts: list[bytes], advances: list[float], changes: dict[str, Any], lazy: bool
    ) -> None:
        timed = {**changes, "command_timeout": 60_000, "min_data_rate": 100}
        drive(self, session(tls=True, config_changes=timed, buffer_size=512), bursts, advances, lazy=lazy)

    def test_big_message_is_never_held_in_memory(self) -> None:
        """Megabytes of DATA in chunks of several sizes, well-formed or damaged: the bounds ``drive`` checks
        hold throughout, and the session stays in step (QUIT is answered)."""
        for line, chunk in [(b"x" * 998 + b"\r\n", 65536), (b"..\r\n", 1000), (b"a\rb\n" * 100, 70001)]:
            server = session(tls=False, config_changes={"max_message_size": 50_000_000})
            body = line * ((3 << 20) // len(line))
            stream = (
                b"EHLO c\r\nMAIL FROM:<a@example.net>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
                + body
                + b"\r\n.\r\nQUIT\r\n"
            )
            lines = drive(self, server, [stream[i : i + chunk] for i in range(0, len(stream), chunk)])
            self.assertEqual(lines[-1][:3], b"221", line[:10])


class SessionModel(RuleBasedStateMachine):
    """The ESMTP session against a model of RFC 5321's command sequence: which command gets 250, 354, 452,
    500, 501 or 503 depends only on what was accepted before (a greeting, MAIL, RCPTs), never on how earlier
    input failed. Every reply is checked as it comes; no error may be logged."""

    def __init__(self) -> None:
        super().__init__()
        config = {**_config_changes("insecure", max_bad_commands=10_000, max_junk_commands=10_000)}
        self.server = session(tls=False, config_changes=config)
        self.errors: list[Any] = []
        self.observer = lambda event: self.errors.append(event) if event.get("log_failure") else None
        globalLogPublisher.addObserver(self.observer)
        self.server.transport.drain()
        self.greeted = False
        self.in_transaction = False
        self.recipients: set[str] = set()
        self.closed = False
        self.steps = 0

    def send(self, line: bytes) -> list[bytes]:
        self.steps += 1
        assert isinstance(self.server.transport, BufferingTransport)
        self.server.protocol.dataReceived(line)
        output = self.server.transport.drain()
        assert output.endswith(b"\r\n"), output
        lines = output[:-2].split(b"\r\n")
        for reply in lines:
            match = REPLY_LINE.match(reply)
            assert match is not None and int(match.group(1)) in DOCUMENTED_CODES, reply
        return lines

    def code(self, line: bytes) -> int:
        lines = self.send(line)
        assert len({reply[:3] for reply in lines}) == 1, lines
        return int(lines[-1][:3])

    @initialize()
    def greet(self) -> None:
        assert self.code(b"EHLO client.example\r\n") == 250
        self.greeted = True

    @precondition(lambda self: not self.closed)
    @rule(name=st.sampled_from(["client.example", "[192.0.2.1]", "", "two words", "ü"]))
    def ehlo(self, name: str) -> None:
        valid = name not in ("", "two words", "ü")
        assert self.code(f"EHLO {name}\r\n".encode()) == (250 if valid else 501)
        if valid:
            self.greeted = True
            self.in_transaction = False
            self.recipients = set()

    @precondition(lambda self: not self.closed)
    @rule(sender=st.sampled_from(["<a@example.net>", "<>", "<b@example.com> SIZE=10"]))
    def mail(self, sender: str) -> None:
        expected = 503 if not self.greeted or self.in_transaction else 250
        assert self.code(f"MAIL FROM:{sender}\r\n".encode()) == expected
        if expected == 250:
            self.in_transaction = True

    @precondition(lambda self: not self.closed)
    @rule(local=st.sampled_from(["a", "b", "c", "d", "e"]))
    def rcpt_again(self, local: str) -> None:
        """RCPT twice as often as the other commands: the recipient limit needs several in a row."""
        self.rcpt(local)

    @precondition(lambda self: not self.closed)
    @rule(local=st.sampled_from(["a", "b", "c", "d", "e"]))
    def rcpt(self, local: str) -> None:
        address = f"{local}@example.org"
        if not self.in_transaction:
            expected = 503
        elif address in self.recipients:
            expected = 250  # a duplicate is accepted again, not counted twice
        elif len(self.recipients) >= 3:  # make_config's maxRecipients
            expected = 452
        else:
            expected = 250
        assert self.code(f"RCPT TO:<{address}>\r\n".encode()) == expected
        if expected == 250:
            self.recipients.add(address)

    @precondition(lambda self: not self.closed)
    @rule(body=st.sampled_from([b"Subject: x\r\n\r\nhi\r\n", b"", b"..dot\r\n", b"a\nb\r\n"]))
    def data(self, body: bytes) -> None:
        if not self.in_transaction or not self.recipients:
            assert self.code(b"DATA\r\n") == 503
            return
        assert self.code(b"DATA\r\n") == 354
        expected = 550 if b"\n" in body.replace(b"\r\n", b"") else 250
        assert self.code(body + b".\r\n") == expected
        self.in_transaction = False
        self.recipients = set()

    @precondition(lambda self: not self.closed)
    @rule(command=st.sampled_from([b"RSET\r\n", b"NOOP\r\n", b"VRFY x\r\n", b"HELP\r\n"]))
    def junk(self, command: bytes) -> None:
        assert self.code(command) in (250, 252, 214)
        if command == b"RSET\r\n":
            self.in_transaction = False
            self.recipients = set()

    @precondition(lambda self: not self.closed)
    @rule(
        line=st.one_of(
            st.sampled_from([b"XYZZY\r\n", b"MAIL\r\n", b"RCPT TO:\r\n", b"\r\n", b"x" * 600 + b"\r\n"]),
            st.binary(max_size=30).map(lambda b: b.replace(b"\n", b"") + b"\r\n"),
        )
    )
    def garbage(self, line: bytes) -> None:
        lines = self.send(line)
        code = int(lines[-1][:3])
        if code == 421:  # a non-SMTP verb (GET, POST, ...) ends the session
            self.closed = True
            return
        # A refused line changes nothing the model knows (a MAIL or RCPT with a bad argument is refused).
        assert code in (500, 501, 503, 504, 530, 553, 555, 250, 214, 252), lines
        assert code != 250 or line.upper().startswith((b"NOOP", b"RSET", b"EHLO", b"HELO")), lines
        if line.upper().startswith((b"RSET", b"EHLO", b"HELO")) and code == 250:
            self.in_transaction = False
            self.recipients = set()
            self.greeted = self.greeted or line.upper().startswith((b"EHLO", b"HELO"))

    @precondition(lambda self: not self.closed and self.steps > 20)
    @rule()
    def quit(self) -> None:
        assert self.code(b"QUIT\r\n") == 221
        self.closed = True

    @precondition(lambda self: self.closed)
    @rule(line=st.sampled_from([b"NOOP\r\n", b"MAIL FROM:<a@example.net>\r\n", b"x"]))
    def after_the_end(self, line: bytes) -> None:
        assert isinstance(self.server.transport, BufferingTransport)
        self.server.protocol.dataReceived(line)
        assert self.server.transport.drain() == b""  # input after the end is ignored

    @invariant()
    def nothing_logged_as_an_error(self) -> None:
        assert self.errors == [], self.errors

    def teardown(self) -> None:
        globalLogPublisher.removeObserver(self.observer)
        self.server.protocol.connectionLost()


class SessionModelTests(TestCase):
    def test_session_follows_the_model(self) -> None:
        run_state_machine_as_test(SessionModel, settings=settings(examples(0.2), stateful_step_count=30))
