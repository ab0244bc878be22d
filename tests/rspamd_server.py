"""A real ``rspamd`` for the scanner tests: one normal worker on 127.0.0.1 at a free port, a configuration of
its own in a temporary directory (not /etc/rspamd: no controller, no Redis, no Lua rule set, DNS pointed at a
closed local port so nothing leaves the machine). rspamd's core still parses the message and recognises
GTUBE (action ``reject``, symbol ``GTUBE``); other mail scores 0. Start-up takes several seconds (it compiles
the public suffix list), so one is shared by the tests of a process (:func:`shared_rspamd`).
"""

from __future__ import annotations

import os
import shutil

from tests.daemons import DaemonProcess, answers, shared

RSPAMD = shutil.which("rspamd") or ("/usr/bin/rspamd" if os.access("/usr/bin/rspamd", os.X_OK) else None)

SKIP_REASON: str | None = (
    None
    if RSPAMD
    else "rspamd is not installed: run `apt-get install rspamd` (or `make test` as root) to run the rspamd"
    " scanner tests"
)

#: The score that makes rspamd's action ``reject`` (GTUBE gets exactly this).
REJECT_SCORE = 15.0

CONFIG = """\
options {{
    pidfile = "{directory}/rspamd.pid";
    dbdir = "{directory}/db";
    hs_cache_dir = "{directory}/db";
    tempdir = "{directory}";
    dns {{ nameserver = ["127.0.0.1:1"]; timeout = 0.1s; retransmits = 0; }}
}}
logging {{ type = "file"; filename = "{directory}/rspamd.log"; level = "info"; }}
actions {{ reject = {reject}; add_header = 6; greylist = 4; }}
worker "normal" {{ bind_socket = "127.0.0.1:{port}"; count = 1; mime = true; }}
"""


class RspamdServer(DaemonProcess):
    name = "rspamd"

    def command(self) -> list[str]:
        assert RSPAMD is not None, SKIP_REASON
        os.makedirs(os.path.join(self.directory, "db"), exist_ok=True)
        config = os.path.join(self.directory, "rspamd.conf")
        with open(config, "w") as f:
            f.write(CONFIG.format(directory=self.directory, port=self.port, reject=REJECT_SCORE))
        args = [RSPAMD, "--no-fork", "--config", config]
        if os.geteuid() == 0:
            args += ["--user", "root", "--group", "root"]
        return args

    def ready(self) -> bool:
        return answers(self.port, b"GET /ping HTTP/1.0\r\nHost: localhost\r\n\r\n", b"pong")

    def log_tail(self) -> str:
        tail = super().log_tail()
        try:
            with open(os.path.join(self.directory, "rspamd.log"), errors="replace") as f:
                return tail + f.read()[-3000:]
        except OSError:
            return tail


def shared_rspamd() -> RspamdServer:
    """The rspamd every test in this process shares."""
    daemon = shared("rspamd", RspamdServer)
    assert isinstance(daemon, RspamdServer)
    return daemon
