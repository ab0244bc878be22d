"""bench/session_memory: what one idle SMTP session allocates, by source line (tracemalloc).

    python -m bench.session_memory                 # 2000 sessions, greeted and past EHLO, then idle
    python -m bench.session_memory --sessions 500 --top 30

An embedded router (the bench's dcrouter configuration, disk queue, delivery paused) runs on the reactor in
this process; a thread opens ``--sessions`` plain-socket connections, reads the 220, sends EHLO and reads its
250, and leaves them open. tracemalloc snapshots are taken before and after (on the reactor thread, with every
session idle); the difference, divided by the number of sessions, is printed per allocating line (Python
allocations only: the kernel's socket buffers and the interpreter's free lists are not in it). See
docs/performance.md, "Idle sessions".
"""

from __future__ import annotations

import argparse
import gc
import os
import socket
import sys
import tempfile
import threading
import tracemalloc

from bench.ingress import DCROUTER_CONFIG, HOST, RECIPIENT_DOMAIN, free_port


def open_sessions(port: int, count: int, held: list[socket.socket]) -> None:
    for n in range(count):
        s = socket.socket()
        s.settimeout(30)
        s.bind((f"127.0.0.{2 + n // 20_000}", 0))
        s.connect((HOST, port))
        f = s.makefile("rb")
        assert f.readline().startswith(b"220 ")
        s.sendall(b"EHLO probe.bench.invalid\r\n")
        while not (line := f.readline()).startswith(b"250 "):
            assert line.startswith(b"250-"), line
        f.close()
        held.append(s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.session_memory", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--sessions", type=int, default=2000)
    parser.add_argument("--top", type=int, default=25, help="Lines shown (default 25).")
    parser.add_argument("--frames", type=int, default=1, help="Traceback depth grouped on (default 1).")
    args = parser.parse_args(argv)

    from twisted.internet import reactor

    from dcrouter.tap import Options, makeService

    workdir = tempfile.mkdtemp(prefix="dcrouter-session-memory-")
    port = free_port()
    config = os.path.join(workdir, "dcrouter.toml")
    with open(config, "w") as f:
        f.write(
            DCROUTER_CONFIG.format(
                port=port,
                host=HOST,
                max_size=1 << 20,
                queue=os.path.join(workdir, "queue"),
                domain=RECIPIENT_DOMAIN,
                relay_port=free_port(),
                paused="true",
                max_connections=args.sessions + 100,
            )
        )
    from twisted.logger import globalLogBeginner

    globalLogBeginner.beginLoggingTo([], redirectStandardIO=False)  # as twistd: no buffer of early events
    options = Options()
    options.parseOptions(["--config", config])
    service = makeService(options)
    service.privilegedStartService()
    service.startService()
    held: list[socket.socket] = []
    out: dict[str, object] = {}

    def warm() -> None:
        threading.Thread(
            target=lambda: (open_sessions(port, 50, held), reactor.callFromThread(before)), daemon=True
        ).start()

    def before() -> None:
        gc.collect()
        tracemalloc.start(args.frames)
        out["before"] = tracemalloc.take_snapshot()
        threading.Thread(
            target=lambda: (open_sessions(port, args.sessions, held), reactor.callFromThread(after)),
            daemon=True,
        ).start()

    def after() -> None:
        reactor.callLater(0.5, snapshot)

    def snapshot() -> None:
        gc.collect()
        out["after"] = tracemalloc.take_snapshot()
        reactor.stop()

    reactor.callLater(0.5, warm)
    reactor.run()
    stats = out["after"].compare_to(out["before"], "traceback" if args.frames > 1 else "lineno")  # type: ignore[attr-defined]
    total = sum(s.size_diff for s in stats)
    n = args.sessions
    print(f"{n} idle sessions (past EHLO): {total / n:.0f} B of Python allocations per session")
    for stat in stats[: args.top]:
        where = stat.traceback.format()[-1 if args.frames == 1 else 0].strip() if stat.traceback else "?"
        if args.frames > 1:
            where = " <- ".join(line.strip() for line in stat.traceback.format()[::2])
        print(f"  {stat.size_diff / n:7.0f} B  {stat.count_diff / n:5.2f} blocks  {where}")
    for s in held:
        s.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
