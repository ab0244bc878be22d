"""The load generator: one asyncio process speaking raw SMTP.

Kept cheap on purpose, because on a small machine it competes with the server for CPU: messages are built once
and sent as a few large writes, replies are read line by line, and commands are pipelined (MAIL, RCPT, DATA in
one write) only where the server advertises PIPELINING, as RFC 2920 requires.

Three loads:
- ``run_senders``: N connections, each EHLO once and then MAIL/RCPT/DATA repeatedly, sharing a fixed number of
  messages (and a time limit); only a 2xx after the final dot counts as a success.
- ``send_large``: one big message, streamed in chunks, while the server's RSS is sampled from /proc.
- ``hold_idle``: many connections opened, greeted and left idle, then probed with NOOP.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

REPLY_TIMEOUT = 30.0
CONNECT_TIMEOUT = 15.0


class SmtpError(Exception):
    """The server answered something other than what the step needs."""


def _text_lines(size: int, seed: int) -> bytes:
    """About ``size`` bytes of base64 text in 76-character CRLF lines (no line starts with a dot)."""
    rng = random.Random(seed)
    raw = rng.randbytes(size * 3 // 4 + 3)
    text = base64.b64encode(raw)[:size]
    lines = [text[i : i + 76] for i in range(0, len(text), 76)]
    return b"\r\n".join(lines) + b"\r\n"


def _filler(size: int) -> bytes:
    """Exactly ``size`` bytes (0 or >= 3) of CRLF-ended lines of at most 78 octets."""
    lines = []
    while size > 0:
        take = 78 if size >= 78 + 3 or size == 78 else size
        lines.append(b"A" * (take - 2) + b"\r\n")
        size -= take
    return b"".join(lines)


def message_headers(sequence: int, sender: str, recipient: str) -> bytes:
    return (
        f"From: <{sender}>\r\nTo: <{recipient}>\r\nSubject: bench message {sequence}\r\n"
        f"Message-ID: <{sequence}.{os.getpid()}@loadgen.bench.invalid>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
    ).encode()


@dataclass
class Reply:
    code: int
    lines: list[bytes]

    def text(self) -> str:
        return b" / ".join(line.rstrip() for line in self.lines).decode("ascii", "replace")[:100]


async def read_reply(reader: asyncio.StreamReader, timeout: float = REPLY_TIMEOUT) -> Reply:
    lines = []
    while True:
        line = await asyncio.wait_for(reader.readline(), timeout)
        if not line:
            raise ConnectionError("connection closed by server")
        lines.append(line)
        if len(line) < 4 or line[3:4] != b"-":
            break
    try:
        code = int(lines[-1][:3])
    except ValueError:
        raise SmtpError(f"unparseable reply {lines[-1]!r}") from None
    return Reply(code, lines)


@dataclass
class Session:
    """One SMTP connection after a successful greeting and EHLO."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    extensions: set[str]
    size_limit: int | None = None
    allow_pipelining: bool = True

    @property
    def pipelining(self) -> bool:
        return self.allow_pipelining and "PIPELINING" in self.extensions

    def close(self) -> None:
        self.writer.close()


async def open_session(
    host: str, port: int, source: str | None = None, helo: str = "loadgen.bench.invalid"
) -> Session:
    local = (source, 0) if source else None
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(host, port, local_addr=local, limit=1 << 16), CONNECT_TIMEOUT
    )
    try:
        greeting = await read_reply(reader)
        if greeting.code != 220:
            raise SmtpError(f"greeting {greeting.text()}")
        writer.write(b"EHLO " + helo.encode() + b"\r\n")
        ehlo = await read_reply(reader)
        if ehlo.code != 250:
            raise SmtpError(f"EHLO {ehlo.text()}")
    except BaseException:
        writer.close()
        raise
    extensions = set()
    size_limit = None
    for line in ehlo.lines[1:]:
        words = line[4:].decode("ascii", "replace").upper().split()
        if words:
            extensions.add(words[0])
            if words[0] == "SIZE" and len(words) > 1 and words[1].isdigit():
                size_limit = int(words[1])
    return Session(reader, writer, extensions, size_limit)


async def send_message(
    session: Session, sender: str, recipient: str, chunks: Sequence[bytes], size: int
) -> Reply:
    """One MAIL/RCPT/DATA transaction; the final reply, or SmtpError naming the step that failed.

    ``chunks`` is the dot-stuffed message without the terminating ``.CRLF``.
    """
    reader, writer = session.reader, session.writer
    size_param = f" SIZE={size}" if "SIZE" in session.extensions else ""
    mail = f"MAIL FROM:<{sender}>{size_param}\r\n".encode()
    rcpt = f"RCPT TO:<{recipient}>\r\n".encode()
    if session.pipelining:
        writer.write(mail + rcpt + b"DATA\r\n")
        replies = [await read_reply(reader) for _ in range(3)]
    else:
        replies = []
        for command in (mail, rcpt, b"DATA\r\n"):
            writer.write(command)
            replies.append(await read_reply(reader))
            if replies[-1].code >= 400:
                break
    for step, reply in zip(("MAIL", "RCPT"), replies, strict=False):  # fewer replies when MAIL failed
        if reply.code >= 400:
            if replies[-1].code == 354:
                # A pipelined DATA was accepted although an earlier step failed: finish it empty.
                writer.write(b".\r\n")
                await read_reply(reader)
            else:
                writer.write(b"RSET\r\n")
                await read_reply(reader)
            raise SmtpError(f"{step}: {reply.text()}")
    if replies[-1].code != 354:
        writer.write(b"RSET\r\n")
        await read_reply(reader)
        raise SmtpError(f"DATA: {replies[-1].text()}")
    for chunk in chunks:
        writer.write(chunk)
        await writer.drain()
    writer.write(b".\r\n")
    final = await read_reply(reader)
    if final.code // 100 != 2:
        raise SmtpError(f"end of DATA: {final.text()}")
    return final


# -- many senders --------------------------------------------------------------------------------


@dataclass
class SendersResult:
    senders: int
    planned: int
    ok: int = 0
    errors: int = 0
    elapsed: float = 0.0
    connect_failures: int = 0
    latencies: list[float] = field(default_factory=list)
    error_kinds: collections.Counter[str] = field(default_factory=collections.Counter)
    timed_out: bool = False
    client_cpu: float = 0.0
    started_at: float = 0.0  # time.perf_counter() when the clock started (bench/relay measures from it)

    @property
    def rate(self) -> float:
        return self.ok / self.elapsed if self.elapsed > 0 else 0.0

    def percentile(self, p: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


async def run_senders(
    host: str,
    port: int,
    senders: int,
    messages: int,
    message_size: int = 10 * 1024,
    recipient: str = "user@bench.example",
    sender: str = "loadgen@bench.invalid",
    time_limit: float = 120.0,
    max_reconnects: int = 3,
    pipelining: bool = True,
) -> SendersResult:
    """``senders`` connections share ``messages`` messages of ``message_size`` bytes, within ``time_limit``.
    ``pipelining=False``: one command per round trip even where the server offers PIPELINING.

    The clock starts once every connection has been greeted and said EHLO, and stops at the last final reply.
    """
    result = SendersResult(senders, messages)
    body = _text_lines(message_size - len(message_headers(0, sender, recipient)), seed=senders)
    remaining = messages
    ready = 0
    go = asyncio.Event()

    async def connect() -> Session | None:
        try:
            session = await open_session(host, port)
        except (TimeoutError, OSError, SmtpError) as e:
            result.connect_failures += 1
            result.error_kinds[f"connect: {type(e).__name__}: {e}"[:100]] += 1
            return None
        session.allow_pipelining = pipelining
        return session

    async def one_sender() -> None:
        nonlocal remaining, ready
        session = await connect()
        ready += 1
        if ready == senders:
            go.set()
        await go.wait()
        reconnects = 0
        while remaining > 0 and time.monotonic() < deadline:
            if session is None:
                if reconnects >= max_reconnects:
                    return
                reconnects += 1
                session = await connect()
                if session is None:
                    await asyncio.sleep(0.1)
                    continue
            remaining -= 1
            sequence = messages - remaining
            headers = message_headers(sequence, sender, recipient)
            started = time.perf_counter()
            try:
                await send_message(session, sender, recipient, (headers, body), len(headers) + len(body))
            except SmtpError as e:
                result.errors += 1
                result.error_kinds[str(e)] += 1
            except (TimeoutError, OSError, asyncio.IncompleteReadError) as e:
                result.errors += 1
                result.error_kinds[f"connection: {type(e).__name__}: {e}"[:100]] += 1
                session.close()
                session = None
            else:
                result.ok += 1
                result.latencies.append(time.perf_counter() - started)
        if session is not None:
            try:
                session.writer.write(b"QUIT\r\n")
                await read_reply(session.reader, timeout=5)
            except (TimeoutError, OSError, SmtpError):
                pass
            session.close()

    cpu_before = time.process_time()
    deadline = time.monotonic() + time_limit  # covers connecting too; reset once everyone is ready
    tasks = [asyncio.ensure_future(one_sender()) for _ in range(senders)]
    await go.wait()
    started = result.started_at = time.perf_counter()
    deadline = time.monotonic() + time_limit
    await asyncio.gather(*tasks)
    result.elapsed = time.perf_counter() - started
    result.client_cpu = time.process_time() - cpu_before
    result.timed_out = remaining > 0
    return result


# -- one large message while sampling the server's RSS ----------------------------------------


def read_status_kb(pid: int, *fields: str) -> dict[str, int]:
    """Values in kB of the named fields of /proc/<pid>/status (VmRSS, VmHWM, ...)."""
    values = {}
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            name, _, rest = line.partition(b":")
            key = name.decode()
            if key in fields:
                values[key] = int(rest.split()[0])
    return values


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM of ``pid`` (Linux >= 4.0, ``echo 5 > /proc/pid/clear_refs``); False if not permitted."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclass
class LargeResult:
    size: int
    ok: bool = False
    reply: str = ""
    elapsed: float = 0.0
    rss_before_kb: int = 0
    rss_peak_kb: int = 0
    hwm_reset: bool = False
    hwm_after_kb: int = 0
    samples: int = 0

    @property
    def rss_growth_kb(self) -> int:
        return self.rss_peak_kb - self.rss_before_kb

    @property
    def hwm_growth_kb(self) -> int | None:
        return self.hwm_after_kb - self.rss_before_kb if self.hwm_reset else None


async def send_large(
    host: str,
    port: int,
    pid: int,
    size: int = 50 * 1024 * 1024,
    interval: float = 0.003,
    chunk_size: int = 256 * 1024,
    recipient: str = "user@bench.example",
    sender: str = "loadgen@bench.invalid",
    settle: float = 0.5,
) -> LargeResult:
    """Send one ``size``-byte message while sampling VmRSS of ``pid`` every ``interval`` seconds."""
    result = LargeResult(size)
    headers = message_headers(1, sender, recipient)
    chunk = _text_lines(chunk_size, seed=50)
    count, rest = divmod(size - len(headers), len(chunk))
    tail = _filler(rest)

    def chunks() -> list[bytes]:
        return [headers, *([chunk] * count), tail]

    session = await open_session(host, port)
    await asyncio.sleep(settle)
    result.hwm_reset = reset_peak_rss(pid)
    result.rss_before_kb = read_status_kb(pid, "VmRSS")["VmRSS"]
    peak = result.rss_before_kb
    sampling = True

    async def sampler() -> None:
        nonlocal peak
        while sampling:
            try:
                rss = read_status_kb(pid, "VmRSS")["VmRSS"]
            except (OSError, KeyError):
                return
            result.samples += 1
            peak = max(peak, rss)
            await asyncio.sleep(interval)

    task = asyncio.ensure_future(sampler())
    started = time.perf_counter()
    try:
        reply = await send_message(session, sender, recipient, chunks(), size)
        result.ok = True
        result.reply = reply.text()
    except (TimeoutError, SmtpError, OSError) as e:
        result.reply = f"{type(e).__name__}: {e}"[:100]
    result.elapsed = time.perf_counter() - started
    await asyncio.sleep(settle)  # work the server does right after its reply counts too
    sampling = False
    await task
    result.rss_peak_kb = peak
    try:
        result.hwm_after_kb = read_status_kb(pid, "VmHWM")["VmHWM"]
    except (OSError, KeyError):
        pass
    session.close()
    return result


# -- idle connections --------------------------------------------------------------------------------


@dataclass
class IdleResult:
    attempted: int
    greeted: int = 0
    alive: int = 0
    hold: float = 0.0
    open_seconds: float = 0.0
    fresh_ok: bool = False
    fresh_ms: float = float("nan")
    fresh_error: str = ""
    server_rss_kb: int = 0
    server_rss_before_kb: int = 0
    failures: collections.Counter[str] = field(default_factory=collections.Counter)


async def hold_idle(
    host: str,
    port: int,
    count: int,
    sources: Sequence[str],
    hold: float = 5.0,
    parallel: int = 100,
    server_rss: Callable[[], int] | None = None,
) -> IdleResult:
    """Open ``count`` connections (round robin over ``sources``), keep those greeted with 220 idle for
    ``hold`` seconds, then count those that still answer NOOP with 250; time a fresh session meanwhile."""
    result = IdleResult(count)
    if server_rss:
        result.server_rss_before_kb = server_rss()
    gate = asyncio.Semaphore(parallel)
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def open_one(index: int) -> None:
        async with gate:
            source = sources[index % len(sources)]
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(host, port, local_addr=(source, 0), limit=4096), CONNECT_TIMEOUT
                )
            except (TimeoutError, OSError) as e:
                result.failures[f"connect: {type(e).__name__}: {e}"[:80]] += 1
                return
            try:
                greeting = await read_reply(reader, timeout=CONNECT_TIMEOUT)
            except (TimeoutError, OSError, SmtpError) as e:
                result.failures[f"greeting: {type(e).__name__}: {e}"[:80]] += 1
                writer.close()
                return
            if greeting.code != 220:
                result.failures[f"greeting: {greeting.text()}"[:80]] += 1
                writer.close()
                return
            result.greeted += 1
            held.append((reader, writer))

    started = time.perf_counter()
    await asyncio.gather(*(open_one(i) for i in range(count)))
    result.open_seconds = time.perf_counter() - started
    await asyncio.sleep(hold)
    result.hold = hold
    if server_rss:
        result.server_rss_kb = server_rss()

    fresh_started = time.perf_counter()
    try:
        session = await open_session(host, port)
        session.writer.write(b"QUIT\r\n")
        await read_reply(session.reader)
        session.close()
        result.fresh_ok = True
        result.fresh_ms = (time.perf_counter() - fresh_started) * 1000
    except (TimeoutError, OSError, SmtpError) as e:
        result.fresh_error = f"{type(e).__name__}: {e}"[:100]

    async def probe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async with gate:
            try:
                writer.write(b"NOOP\r\n")
                reply = await read_reply(reader, timeout=CONNECT_TIMEOUT)
            except (TimeoutError, OSError, SmtpError) as e:
                result.failures[f"NOOP after hold: {type(e).__name__}: {e}"[:80]] += 1
                return
            if reply.code == 250:
                result.alive += 1
            else:
                result.failures[f"NOOP after hold: {reply.text()}"[:80]] += 1

    await asyncio.gather(*(probe(r, w) for r, w in held))
    for _, writer in held:
        writer.close()
    await asyncio.sleep(0.5)  # let the closes go out before the server is stopped
    return result
