"""A real SpamAssassin ``spamd`` for the scanner tests: 127.0.0.1, a free port, a temporary directory, the
Debian rules from /usr/share/spamassassin, local tests only (``--local``: no DNS, no network checks), no user
preferences. GTUBE scores 1000.

spamd takes a few seconds to compile its rules, so one server is shared by every test in the process
(:func:`shared_spamd`) and stopped when the process exits. Where ``spamd`` is not installed, the tests that
need it are skipped with :data:`SKIP_REASON`.

Its start/wait/stop life cycle, shared with the clamd and rspamd fixtures, is
:class:`tests.daemons.DaemonProcess`.
"""

from __future__ import annotations

import os
import shutil

from tests.daemons import DaemonProcess, answers, shared

SPAMD = shutil.which("spamd") or ("/usr/sbin/spamd" if os.access("/usr/sbin/spamd", os.X_OK) else None)

#: Why the spamd tests are skipped, or None when they can run.
SKIP_REASON: str | None = (
    None
    if SPAMD
    else "spamd is not installed: run `apt-get install spamd spamassassin` (or `make test` as root) to run"
    " the SpamAssassin scanner tests"
)


class SpamdServer(DaemonProcess):
    name = "spamd"

    def command(self) -> list[str]:
        assert SPAMD is not None, SKIP_REASON
        args = [
            SPAMD,
            "--local",  # no DNS blocklists, no Razor/Pyzor: nothing leaves the machine
            "--nouser-config",
            "--listen", f"127.0.0.1:{self.port}",
            "--allowed-ips", "127.0.0.1",
            "--pidfile", os.path.join(self.directory, "spamd.pid"),
            "--syslog", "stderr",
            "--max-children", "2",
            "--min-children", "1",
            "--min-spare", "1",
            "--max-spare", "2",
        ]  # fmt: skip
        if os.geteuid() == 0:
            # spamd refuses to scan as root; its children switch to this user (who must reach the directory).
            os.chmod(self.directory, 0o755)
            args += ["--username", "nobody"]
        return args

    def ready(self) -> bool:
        return answers(self.port, b"PING SPAMC/1.5\r\n\r\n", b"PONG")


def shared_spamd() -> SpamdServer:
    """The spamd every test in this process shares."""
    daemon = shared("spamd", SpamdServer)
    assert isinstance(daemon, SpamdServer)
    return daemon
