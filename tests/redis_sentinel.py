"""Real Redis high availability per test: three ``redis-server`` processes (a master and two replicas) and
three ``redis-sentinel`` processes watching them, each on its own free 127.0.0.1 port and directory, stopped
at cleanup. Every server runs with ``appendfsync always`` and ``min-replicas-to-write 1`` (what
docs/queue.md asks of production), so a master acknowledges a write only while a replica is connected.

Where ``redis-sentinel`` is not installed, the tests using it are skipped with :data:`SKIP_REASON`
(``make test`` installs it on Debian when run as root).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from typing import Any

from tests.daemons import end_process, free_port
from tests.redis_server import REDIS_SERVER, START_TIMEOUT, RedisServer

REDIS_SENTINEL = shutil.which("redis-sentinel") or (
    "/usr/bin/redis-sentinel" if os.access("/usr/bin/redis-sentinel", os.X_OK) else None
)

SKIP_REASON: str | None = (
    None
    if REDIS_SERVER and REDIS_SENTINEL
    else "redis-server or redis-sentinel is not installed: run `apt-get install redis-server redis-sentinel`"
    " (or `make test` as root) to run the Sentinel failover tests"
)

MASTER_NAME = "mymaster"
#: How long the sentinels wait before they call a silent master down: longer than two of dcrouter's 5 s
#: deadlines per Redis call (RCPT's suppression check, then the enqueue), so the switch certainly shows as
#: 451s rather than as one slow 250.
DOWN_AFTER_MS = 12000
#: Settings every server gets: a master refuses writes unless a replica is connected (and not lagging).
SAFE = ["--min-replicas-to-write", "1", "--min-replicas-max-lag", "10"]


class Sentinel:
    """One redis-sentinel process monitoring ``MASTER_NAME`` (quorum 2, master down after DOWN_AFTER_MS)."""

    def __init__(self, directory: str, master_port: int) -> None:
        assert REDIS_SENTINEL is not None, SKIP_REASON
        self.directory = os.path.abspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        self.port = free_port()
        self.config = os.path.join(self.directory, "sentinel.conf")
        with open(self.config, "w") as f:  # sentinel rewrites its config: a file of its own
            f.write(
                f"port {self.port}\nbind 127.0.0.1\nprotected-mode no\ndir {self.directory}\n"
                f"logfile {os.path.join(self.directory, 'sentinel.log')}\n"
                f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2\n"
                f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {MASTER_NAME} 10000\n"
                f"sentinel parallel-syncs {MASTER_NAME} 1\n"
            )
        self.process: subprocess.Popen[bytes] | None = subprocess.Popen(
            [REDIS_SENTINEL, self.config], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
        )
        self.server = RedisServer.__new__(RedisServer)  # reuse its PING and command helpers
        self.server.port = self.port
        self.server.directory = self.directory
        _until(self.server.ping, f"redis-sentinel on port {self.port}")

    def master(self) -> dict[str, str]:
        reply = self.server.command("SENTINEL", "master", MASTER_NAME)
        lines = [line.decode() for line in reply.split(b"\r\n")[1:] if line and line[:1] not in (b"$", b"*")]
        return dict(zip(lines[0::2], lines[1::2], strict=False))

    def stop(self) -> None:
        end_process(self.process)
        self.process = None


class SentinelCluster:
    def __init__(self, test: Any) -> None:
        self.master = RedisServer(test.mktemp(), SAFE)
        self.master.start()
        test.addCleanup(self.stop_server, self.master)
        self.replicas = []
        for _ in range(2):
            replica = RedisServer(test.mktemp(), [*SAFE, "--replicaof", "127.0.0.1", str(self.master.port)])
            replica.start()
            test.addCleanup(self.stop_server, replica)
            self.replicas.append(replica)
        _until(lambda: b"connected_slaves:2" in self.master.command("INFO", "replication"), "two replicas")
        self.sentinels = []
        for _ in range(3):
            sentinel = Sentinel(test.mktemp(), self.master.port)
            test.addCleanup(sentinel.stop)
            self.sentinels.append(sentinel)
        _until(self._ready, "the sentinels to see two replicas and each other")

    def _ready(self) -> bool:
        for sentinel in self.sentinels:
            state = sentinel.master()
            if state.get("num-slaves") != "2" or state.get("num-other-sentinels") != "2":
                return False
        return True

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{MASTER_NAME}/0"

    def master_port(self) -> int:
        return int(self.sentinels[0].master().get("port", "0"))

    def promoted_from(self, old_port: int, within: float = 10.0) -> bool:
        """Whether the sentinels name a master other than ``old_port`` within ``within`` seconds: the one that
        ran the failover knows first, the others learn it from its hello messages (every 2 s), so any of
        them saying so is the answer (call in a thread)."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            for sentinel in self.sentinels:
                try:
                    if int(sentinel.master().get("port", "0")) not in (0, old_port):
                        return True
                except OSError:
                    pass
            time.sleep(0.1)
        return False

    @staticmethod
    def stop_server(server: RedisServer) -> None:
        if server.process is not None:
            server.stop()


def _until(condition: Any, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT * 3
    while True:
        try:
            if condition():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def start_sentinel_cluster(test: Any) -> SentinelCluster:
    """A master, two replicas and three sentinels for ``test`` (a trial TestCase), stopped in its cleanup."""
    return SentinelCluster(test)
