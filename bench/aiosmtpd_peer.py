"""The durable baseline: a minimal aiosmtpd server that fsyncs each message before its 250.

Each accepted message is written to its own file (envelope line, then the message as received), the file is
fsynced, then the directory is fsynced, and only then does the client get ``250``. This is the plainest honest
way to make an aiosmtpd server durable; the fsyncs run on the event loop, as a minimal handler would do it.

Run: ``python -m bench.aiosmtpd_peer --port 2600 --directory /tmp/peer``; it prints ``READY <port>`` once
listening.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import signal
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session


class FsyncHandler:
    """aiosmtpd handler: every message in its own fsynced file, directory fsynced, then 250."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.directory_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        self.sequence = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.sequence += 1
        path = os.path.join(self.directory, f"{os.getpid()}-{self.sequence}.eml")
        content = envelope.original_content or b""
        recipients = " ".join(envelope.rcpt_tos)
        envelope_line = f"X-Envelope: {envelope.mail_from} -> {recipients}\r\n".encode()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(envelope_line + content) if len(content) < 1 << 20 else None
            if view is None:
                os.write(fd, envelope_line)
                view = memoryview(content)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.fsync(self.directory_fd)
        return f"250 2.0.0 Ok: queued as {self.sequence}"


def raise_nofile_limit() -> int:
    """Raise the soft open-files limit to the hard one; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def serve(host: str, port: int, directory: str, data_size_limit: int) -> None:
    loop = asyncio.get_running_loop()
    handler = FsyncHandler(directory)

    def factory() -> Any:
        return SMTP(
            handler,
            data_size_limit=data_size_limit,
            hostname="peer.bench.invalid",
            ident="aiosmtpd-fsync-peer",
            loop=loop,
        )

    # asyncio's default listen backlog (100), as a minimal server would have it.
    server = await loop.create_server(factory, host=host, port=port)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"READY {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=2600)
    parser.add_argument("--directory", required=True, help="Where message files go (must exist).")
    parser.add_argument("--max-size", type=int, default=64 << 20, help="SIZE limit in bytes.")
    args = parser.parse_args(argv)
    raise_nofile_limit()
    asyncio.run(serve(args.host, args.port, args.directory, args.max_size))


if __name__ == "__main__":
    main()
