"""Fuzzing the ESMTP server protocol (dcrouter.smtp.protocol) in memory: commands with random arguments,
pipelined bursts cut anywhere, DATA with hostile framing, AUTH exchanges with garbage base64, STARTTLS at odd
times, timers firing between bursts.

Whatever the client sends: no unhandled error is logged; every reply line is ``NNN`` then a space or a
hyphen, its code one the documentation names (docs/smtp.md); replies stay in proportion to the input; input
waiting to be read and message text held in memory stay bounded. Without STARTTLS (which discards what
follows it) and without timers, the transcript does not depend on how the bytes were cut.
"""

from __future__ import annotations

import base64
import os
import re
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.interfaces import ITLSTransport
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
