"""A real ClamAV ``clamd`` for the scanner tests: 127.0.0.1, a free port, a temporary directory, and instead
of the (downloaded, hundreds of MB) official databases one tiny database written here that knows the EICAR
test file by its MD5 (:data:`SIGNATURE`, reported by clamd as ``Dcrouter.Test.EICAR.UNOFFICIAL``). It
starts in about a second; one is shared by the tests of a process (:func:`shared_clamd`).

``StreamMaxLength`` is :data:`STREAM_MAX_LENGTH`, small, so the tests can reach clamd's own limit cheaply.
"""

from __future__ import annotations

import hashlib
import os
import shutil

from tests.daemons import DaemonProcess, answers, shared

CLAMD = shutil.which("clamd") or ("/usr/sbin/clamd" if os.access("/usr/sbin/clamd", os.X_OK) else None)

SKIP_REASON: str | None = (
    None
    if CLAMD
    else "clamd is not installed: run `apt-get install clamav-daemon` (or `make test` as root) to run the"
    " ClamAV scanner tests"
)

#: The 68-byte EICAR anti-virus test file.
EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
SIGNATURE = "Dcrouter.Test.EICAR"
#: What clamd calls it (databases that are not ClamAV's own get the suffix).
REPORTED_SIGNATURE = SIGNATURE + ".UNOFFICIAL"
STREAM_MAX_LENGTH = 1024 * 1024


class ClamdServer(DaemonProcess):
    name = "clamd"

    def command(self) -> list[str]:
        assert CLAMD is not None, SKIP_REASON
        database = os.path.join(self.directory, "db")
        os.makedirs(database, exist_ok=True)
        with open(os.path.join(database, "dcrouter.hdb"), "w") as f:
            f.write(f"{hashlib.md5(EICAR).hexdigest()}:{len(EICAR)}:{SIGNATURE}\n")
        config = os.path.join(self.directory, "clamd.conf")
        lines = [
            "Foreground yes",
            f"TCPSocket {self.port}",
            "TCPAddr 127.0.0.1",
            f"DatabaseDirectory {database}",
            f"TemporaryDirectory {self.directory}",
            f"PidFile {os.path.join(self.directory, 'clamd.pid')}",
            f"StreamMaxLength {STREAM_MAX_LENGTH}",
            "LogTime yes",
        ]
        if os.geteuid() == 0:
            # Without it clamd would switch to the packaged "clamav" user, who cannot read our directory.
            lines.append("User root")
        with open(config, "w") as f:
            f.write("\n".join(lines) + "\n")
        return [CLAMD, f"--config-file={config}"]

    def ready(self) -> bool:
        return answers(self.port, b"zPING\0", b"PONG\0")


def shared_clamd() -> ClamdServer:
    """The clamd every test in this process shares."""
    daemon = shared("clamd", ClamdServer)
    assert isinstance(daemon, ClamdServer)
    return daemon
