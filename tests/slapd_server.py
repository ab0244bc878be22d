"""A real OpenLDAP ``slapd`` per test: its own free port on 127.0.0.1, a slapd.conf and an MDB database in a
temporary directory, loaded with ``slapadd`` from a small LDIF (two people and a service account), stopped at
cleanup. Where slapd is not installed the tests are skipped with :data:`SKIP_REASON`."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from typing import Any

from tests.daemons import answers, end_process, free_port

SLAPD = shutil.which("slapd") or ("/usr/sbin/slapd" if os.access("/usr/sbin/slapd", os.X_OK) else None)
SLAPADD = shutil.which("slapadd") or (
    "/usr/sbin/slapadd" if os.access("/usr/sbin/slapadd", os.X_OK) else None
)
MODULES = "/usr/lib/ldap"
SCHEMA = "/etc/ldap/schema"

SKIP_REASON: str | None = (
    None
    if SLAPD and SLAPADD and os.path.isdir(MODULES)
    else "slapd is not installed: run `apt-get install slapd` (or `make test-peers` as root) to run the"
    " LDAP tests"
)

SUFFIX = "dc=example,dc=test"
PEOPLE = f"ou=people,{SUFFIX}"
SERVICE_DN = f"cn=mailrouter,{SUFFIX}"
SERVICE_PASSWORD = "service-secret"
#: user -> password of the directory's people.
USERS = {"alice": "alice-password", "bob": "bob-password"}

_LDIF = f"""dn: {SUFFIX}
objectClass: dcObject
objectClass: organization
dc: example
o: Example

dn: {PEOPLE}
objectClass: organizationalUnit
ou: people

dn: {SERVICE_DN}
objectClass: person
cn: mailrouter
sn: router
userPassword: {SERVICE_PASSWORD}

""" + "".join(
    f"""dn: uid={user},{PEOPLE}
objectClass: inetOrgPerson
uid: {user}
cn: {user.title()}
sn: {user.title()}
mail: {user}@example.test
userPassword: {password}

"""
    for user, password in USERS.items()
)

_CONF = """include {schema}/core.schema
include {schema}/cosine.schema
include {schema}/inetorgperson.schema
pidfile {directory}/slapd.pid
argsfile {directory}/slapd.args
modulepath {modules}
moduleload back_mdb
{tls}
database mdb
maxsize 10485760
suffix "{suffix}"
rootdn "cn=admin,{suffix}"
directory {directory}/db
access to attrs=userPassword by anonymous auth by self read by * none
access to * by * read
"""


class Slapd:
    """One slapd. ``start()`` returns once it answers on its port; ``kill()`` is SIGKILL."""

    def __init__(self, directory: str, *, cert: str | None = None, key: str | None = None) -> None:
        assert SKIP_REASON is None, SKIP_REASON
        self.directory = os.path.abspath(directory)
        os.makedirs(os.path.join(self.directory, "db"), exist_ok=True)
        self.port = free_port()
        self.tls_port = free_port() if cert is not None else None
        tls = f"TLSCertificateFile {cert}\nTLSCertificateKeyFile {key}" if cert else ""
        self.conf = os.path.join(self.directory, "slapd.conf")
        with open(self.conf, "w") as f:
            f.write(
                _CONF.format(schema=SCHEMA, directory=self.directory, modules=MODULES, suffix=SUFFIX, tls=tls)
            )
        ldif = os.path.join(self.directory, "data.ldif")
        with open(ldif, "w") as f:
            f.write(_LDIF)
        subprocess.run(
            [SLAPADD or "slapadd", "-f", self.conf, "-l", ldif], check=True, capture_output=True, timeout=60
        )
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}/{PEOPLE}"

    @property
    def ldaps_url(self) -> str:
        return f"ldaps://127.0.0.1:{self.tls_port}/{PEOPLE}"

    def start(self) -> None:
        log = open(os.path.join(self.directory, "slapd.log"), "wb")  # noqa: SIM115 (the child keeps it)
        urls = f"ldap://127.0.0.1:{self.port}/"
        if self.tls_port is not None:
            urls += f" ldaps://127.0.0.1:{self.tls_port}/"
        self.process = subprocess.Popen(
            [SLAPD or "slapd", "-d", "0", "-f", self.conf, "-h", urls],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
        log.close()
        deadline = time.monotonic() + 30
        # An anonymous bind request (message id 1, LDAPv3); any bind response means slapd serves.
        bind = bytes.fromhex("300c020101600702010304008000")
        while not answers(self.port, bind, b"\x61"):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"slapd did not start on port {self.port}: {self.log_tail()}")
            time.sleep(0.02)

    def kill(self) -> None:
        end_process(self.process, signal.SIGKILL)
        self.process = None

    def stop(self) -> None:
        end_process(self.process, signal.SIGTERM)
        self.process = None

    def log_tail(self) -> str:
        try:
            with open(os.path.join(self.directory, "slapd.log"), errors="replace") as f:
                return f.read()[-2000:]
        except OSError:
            return "(no log)"


def start_slapd(test: Any, **kwargs: Any) -> Slapd:
    server = Slapd(test.mktemp(), **kwargs)
    server.start()
    test.addCleanup(server.stop)
    return server
