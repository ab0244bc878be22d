"""The reactor-thread cost of the log events a relayed message makes, through twistd's text observer.

``python -m bench.logcost``: emits, many times over, the events one delivered message made before issue 14 §5
and times them per message (best of 5): the two info lines that are now debug (the manager's per-recipient
``delivered`` line and ``<queue id> delivered``), and eight protocol-trace debug events of the SMTP client
(dropped by the level filter) built unguarded as before and guarded by :func:`dcrouter.log.enabled` as now.
Written to /dev/null, so the figure is formatting and dispatch, not disk. See docs/performance.md.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from twisted.logger import globalLogBeginner, textFileLogObserver

from dcrouter.log import enabled, logger

QID = "420DE9661CBE7453BB9B"
manager = logger("dcrouter.delivery.manager")
client = logger("dcrouter.delivery.client")


def demoted_info() -> None:
    manager.info(
        "{queue_id} to {recipient} via {route}: {outcome} ({reply})",
        queue_id=QID,
        recipient="user@bench.example",
        route="domain:bench.example",
        outcome="delivered",
        reply="250 2.0.0 Ok",
    )
    manager.info("{queue_id} delivered", queue_id=QID)


def debug_unguarded() -> None:
    for _ in range(4):
        client.debug(
            "C: {command}", peer="127.0.0.1:25", queue_id=QID, command="RCPT TO:<user@bench.example>"
        )
        client.debug(
            "S: {code} {text}", peer="127.0.0.1:25", queue_id=QID, code=250, text=" / ".join(["2.1.5 Ok"])
        )


def debug_guarded() -> None:
    for _ in range(4):
        if enabled("dcrouter.delivery.client"):
            client.debug(
                "C: {command}", peer="127.0.0.1:25", queue_id=QID, command="RCPT TO:<user@bench.example>"
            )
        if enabled("dcrouter.delivery.client"):
            client.debug(
                "S: {code} {text}", peer="127.0.0.1:25", queue_id=QID, code=250, text=" / ".join(["2.1.5 Ok"])
            )


def per_call(f: Callable[[], None], n: int = 20_000) -> float:
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(n):
            f()
        best = min(best, time.perf_counter() - started)
    return best / n


def main() -> None:
    with open(os.devnull, "w") as out:
        globalLogBeginner.beginLoggingTo([textFileLogObserver(out)], redirectStandardIO=False)
        for f in (demoted_info, debug_unguarded, debug_guarded):
            print(f"{f.__name__:16} {per_call(f) * 1e6:6.1f} µs per message", flush=True)


if __name__ == "__main__":
    main()
