"""The ``dcrouter`` command: helpers around the configuration (running the router is ``twistd dcrouter``).

``dcrouter hash-password`` prints a hash for ``smtpConfig.auth.users[].password``; ``dcrouter check FILE``
validates a configuration file as ``twistd dcrouter --config FILE --check`` does;
``dcrouter config-reference`` prints the reference of every key; ``dcrouter dkim-keygen`` writes a DKIM
signing key and prints the DNS record to publish; ``dcrouter dns-records FILE`` prints the zones the
DNS server (``dnsServerConfig``) publishes; ``dcrouter quarantine list|show|release|delete`` works on
quarantined messages while the router runs (:mod:`dcrouter.quarantine`); ``dcrouter api-token`` makes a
management API token; ``dcrouter queue``, ``dcrouter delivery`` and ``dcrouter stats`` are clients of that API
(:mod:`dcrouter.ctl`).
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import traceback
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TextIO

from dcrouter import __version__

if TYPE_CHECKING:
    from dcrouter.net.reactor import IRouterReactor

_EPILOG = """\
examples:
  dcrouter hash-password                  asks twice on the terminal, prints scrypt$...
  echo 'secret' | dcrouter hash-password  reads one line when stdin is not a terminal
  dcrouter check etc/dcrouter.example.toml
  dcrouter config-reference > reference.md
  dcrouter dkim-keygen --domain example.com --selector mail2025 --out /etc/dcrouter/dkim
  dcrouter dns-records /etc/dcrouter/dcrouter.toml
  dcrouter api-token ops --scope admin    prints a token and its [[apiConfig.tokens]] lines
  dcrouter quarantine list --config /etc/dcrouter/dcrouter.toml
  dcrouter quarantine release --config /etc/dcrouter/dcrouter.toml 1a2b3c4d5e6f
  DCROUTER_TOKEN=... dcrouter queue list --config /etc/dcrouter/dcrouter.toml
  DCROUTER_TOKEN=... dcrouter queue hold 1a2b3c4d5e6f
  DCROUTER_TOKEN=... dcrouter delivery pause domain:example.com
  DCROUTER_TOKEN=... dcrouter stats --json

Run the router itself with: twistd -n dcrouter --config FILE
"""


class _InputError(Exception):
    """What the user typed cannot be used; the message says why."""


def _read_password() -> str:
    """The password: asked twice without echo on a terminal, else the first line of stdin (without its
    line ending; other whitespace is part of the password)."""
    if sys.stdin.isatty():
        first = getpass.getpass("Password: ")
        if getpass.getpass("Password again: ") != first:
            raise _InputError("the passwords differ")
        password = first
    else:
        password = sys.stdin.readline().removesuffix("\n").removesuffix("\r")
    if not password:
        raise _InputError("empty password")
    return password


def _hash_password(args: argparse.Namespace) -> int:
    from dcrouter.passwords import hash_password

    try:
        password = _read_password()
    except _InputError as e:
        print(f"dcrouter hash-password: {e}", file=sys.stderr)
        return 1
    except (EOFError, KeyboardInterrupt):
        print("dcrouter hash-password: no password given", file=sys.stderr)
        return 1
    print(hash_password(password))
    return 0


def api_token_lines(name: str, scope: str, *, use_scrypt: bool = False) -> tuple[str, str]:
    """A new random token and the ``[[apiConfig.tokens]]`` TOML lines holding its hash (never the token)."""
    import hashlib
    import json
    import secrets

    token = secrets.token_urlsafe(32)  # 256 random bits: a fast hash is as safe as a slow one
    if use_scrypt:
        from dcrouter.passwords import hash_password

        token_hash = hash_password(token)
    else:
        token_hash = "sha256$" + hashlib.sha256(token.encode("ascii")).hexdigest()
    lines = (
        f"[[apiConfig.tokens]]\nname = {json.dumps(name)}\ntokenHash = {json.dumps(token_hash)}\n"
        f"scope = {json.dumps(scope)}"
    )
    return token, lines


def _api_token(args: argparse.Namespace) -> int:
    token, lines = api_token_lines(args.name, args.scope, use_scrypt=args.scrypt)
    print(f"# token (give it to the client, keep it secret; it is shown only now): {token}")
    print(lines)
    return 0


def _check(args: argparse.Namespace) -> int:
    # One implementation for `dcrouter check` and `twistd dcrouter --check`, so both print the same.
    from dcrouter.tap import check

    return check(args.config, sys.stdout, sys.stderr)


def _config_reference(args: argparse.Namespace) -> int:
    from dcrouter.config.reference import render

    sys.stdout.write(render())
    return 0


def _dns_records(args: argparse.Namespace) -> int:
    import time

    from dcrouter.config import ConfigError, load_file
    from dcrouter.dns.zone import build_zones
    from dcrouter.dns.zonefile import zone_file

    try:
        result = load_file(args.config)
    except ConfigError as error:
        for line in error.errors:
            print(f"dcrouter dns-records: {line}", file=sys.stderr)
        return 1
    if result.options.dns_server_config is None:
        print(f"dcrouter dns-records: {args.config}: dnsServerConfig is not set", file=sys.stderr)
        return 1
    try:
        zones = build_zones(result.options, serial=int(time.time()))
    except (OSError, ValueError) as error:
        print(f"dcrouter dns-records: dnsServerConfig: {error}", file=sys.stderr)
        return 1
    sys.stdout.write(zone_file(zones))
    return 0


def _dkim_keygen(args: argparse.Namespace) -> int:
    from dcrouter.mail.dkimkeys import DkimError, dns_txt_record, generate_private_key, private_key_pem

    def fail(message: str) -> int:
        print(f"dcrouter dkim-keygen: {message}", file=sys.stderr)
        return 1

    if args.type == "ed25519" and args.bits is not None:
        return fail("--bits applies to rsa keys only")
    try:
        key = generate_private_key(args.type, args.bits or 2048)
        record = dns_txt_record(args.domain, args.selector, key)
    except DkimError as e:
        return fail(str(e))
    name = record.split(". IN TXT", 1)[0]  # selector._domainkey.domain, normalised
    path = os.path.join(args.out, name + ".pem")
    try:
        # O_EXCL: never overwrite a key that may already be published; 0600 from the first byte on disk.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return fail(f"{path} exists; remove it or choose another selector")
    except OSError as e:
        return fail(f"cannot create {path}: {e.strerror}")
    with os.fdopen(fd, "wb") as f:
        os.fchmod(fd, 0o600)
        f.write(private_key_pem(key))
    print(record)
    print(
        f"dcrouter dkim-keygen: private key written to {path} (dkimOptions.privateKey may name this file); "
        "publish the record above before signing with it",
        file=sys.stderr,
    )
    return 0


def _quarantine(args: argparse.Namespace) -> int:
    work = quarantine_work(args, sys.stdout, sys.stderr)
    if isinstance(work, int):
        return work
    return _run_in_reactor(work)


def quarantine_work(
    args: argparse.Namespace, out: TextIO, err: TextIO
) -> int | Callable[[IRouterReactor], Coroutine[Any, Any, int]]:
    """What ``dcrouter quarantine`` does with ``args``: the exit status when the configuration rules it out
    (printed to ``err``), else the work to run in a reactor (``work(reactor)`` returns the exit status)."""
    from dcrouter import quarantine
    from dcrouter.config import ConfigError, load_file
    from dcrouter.tap import print_findings

    try:
        result = load_file(args.config)
    except ConfigError as error:
        # As `dcrouter check` prints them; exit 2: nothing was looked at.
        errors = error.errors or [str(error)]
        print_findings(errors, error.warnings, err)
        print(f"{args.config}: not valid, {len(errors)} error(s)", file=err)
        return 2
    smtp = result.options.smtp_config
    storage = None if smtp is None else smtp.queue_storage
    if smtp is None or storage not in ("disk", "redis"):
        reason = (
            "it has no smtpConfig, so no queue"
            if smtp is None
            else f'smtpConfig.queueStorage is "{storage}": quarantined messages live inside the running '
            "process and cannot be reached from outside it"
        )
        print(f"dcrouter quarantine: {args.config}: {reason}", file=err)
        return 2
    item_id = getattr(args, "id", None)
    return lambda reactor: quarantine.run(smtp, args.action, item_id, out, err, reactor=reactor)


def _run_in_reactor(work: Callable[[IRouterReactor], Coroutine[Any, Any, int]]) -> int:
    """Run ``work(reactor)`` in the global reactor until it returns the exit status."""
    from twisted.internet.task import react  # only here: the global reactor, for one short-lived run

    async def main(reactor: IRouterReactor) -> None:
        try:
            status = await work(reactor)
        except Exception:  # noqa: BLE001 (Twisted's log is not started: the terminal must see it)
            traceback.print_exc()
            status = 1
        raise SystemExit(status)

    try:
        react(main)
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else 1
    return 1  # react always exits; kept for the type checker


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dcrouter",
        description="Helpers for dcrouter, the SMTP store-and-forward gateway and TCP/TLS/HTTP proxy on "
        "Twisted: configuration, passwords, DKIM keys and quarantined mail.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"dcrouter {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    hashing = commands.add_parser(
        "hash-password",
        help="print a password hash for smtpConfig.auth.users",
        description="Read a password (twice, without echo, on a terminal; else one line of stdin) and print "
        "its scrypt hash, to paste as smtpConfig.auth.users[].password. The password is never taken as an "
        "argument, so it stays out of shell history and process lists.",
    )
    hashing.set_defaults(run=_hash_password)
    checking = commands.add_parser(
        "check",
        help="validate a configuration file",
        description="Load CONFIG (.toml or .json), print every error and warning with its key path, "
        "and exit 0 if it is valid, 1 if not. Nothing is started.",
    )
    checking.add_argument("config", metavar="CONFIG", help="configuration file, .toml or .json")
    checking.set_defaults(run=_check)
    reference = commands.add_parser(
        "config-reference",
        help="print the Markdown reference of every configuration key",
        description="Print the reference of every key (type, default, meaning) in Markdown, as generated "
        "into docs/configuration.md.",
    )
    reference.set_defaults(run=_config_reference)
    keygen = commands.add_parser(
        "dkim-keygen",
        help="write a DKIM signing key and print its DNS TXT record",
        description="Generate a DKIM key (RSA of 2048 bits or more, or Ed25519 per RFC 8463), write it as "
        "unencrypted PKCS#8 PEM, mode 0600, to OUT/SELECTOR._domainkey.DOMAIN.pem (never overwriting a "
        "file), and print the TXT record to publish in DNS, split into strings of at most 255 octets.",
    )
    keygen.add_argument("--domain", required=True, help="the signing domain (d=)")
    keygen.add_argument("--selector", required=True, help="the selector (s=), e.g. mail2025")
    keygen.add_argument("--type", choices=("rsa", "ed25519"), default="rsa", help="key type (default rsa)")
    keygen.add_argument("--bits", type=int, default=None, help="RSA key size, at least 2048 (default 2048)")
    keygen.add_argument("--out", default=".", metavar="DIR", help="directory for the key file (default .)")
    keygen.set_defaults(run=_dkim_keygen)
    records = commands.add_parser(
        "dns-records",
        help="print the zones dnsServerConfig publishes",
        description="Load CONFIG and print, as zone-file lines, every record the DNS server would answer "
        "with (configured, and generated from the mail configuration: MX, DKIM keys, SPF, DMARC), each with "
        "its source. The SOA serial of a generated SOA is the current time, as at start-up.",
    )
    records.add_argument("config", metavar="CONFIG", help="configuration file, .toml or .json")
    records.set_defaults(run=_dns_records)
    token = commands.add_parser(
        "api-token",
        help="make a management API token and print its apiConfig.tokens entry",
        description="Print a new random token (in a comment line: hand it to the client) and the "
        "[[apiConfig.tokens]] lines to paste into the configuration, which hold only its hash.",
    )
    token.add_argument("name", metavar="NAME", help="who holds the token (apiConfig.tokens[].name)")
    token.add_argument("--scope", choices=("read", "admin"), default="read", help="default: read")
    token.add_argument(
        "--scrypt", action="store_true", help="hash with scrypt instead of SHA-256 (slower to check)"
    )
    token.set_defaults(run=_api_token)
    _add_quarantine(commands)
    from dcrouter import ctl

    ctl.add_commands(commands)
    return parser


def _add_quarantine(commands: Any) -> None:
    quarantine = commands.add_parser(
        "quarantine",
        help="list, show, release or delete quarantined messages",
        description="Work on the messages a scanner quarantined, in the queue (disk or redis) that "
        "--config FILE names, safely while the router runs. Exit status: 0 done, 1 unknown id, not "
        "quarantined or queue unreachable, 2 configuration or usage error (a memory queue cannot be reached "
        "from outside).",
    )
    actions = quarantine.add_subparsers(dest="action", metavar="ACTION", required=True)
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument("--config", required=True, metavar="FILE", help="the router's configuration file")
    queue_id = argparse.ArgumentParser(add_help=False)
    queue_id.add_argument("id", metavar="ID", help="the queue id (as in `250 ... queued as <id>`)")
    listing = actions.add_parser(
        "list",
        parents=[config],
        help="one line per quarantined message",
        description="Print one tab-separated line per quarantined message, oldest first: id, queued at "
        "(UTC), size in bytes, sender (<> for the null sender), number of recipients, reason.",
    )
    showing = actions.add_parser(
        "show",
        parents=[config, queue_id],
        help="a quarantined message's details and headers",
        description="Print the message's queue fields and its header block as it will be relayed (read from "
        "the first 64 KiB of the message). Control characters are shown escaped.",
    )
    releasing = actions.add_parser(
        "release",
        parents=[config, queue_id],
        help="deliver a quarantined message",
        description="Make the message due now (status queued, reason cleared); the running router delivers "
        "it at its next look at the queue (smtpConfig.checkInterval).",
    )
    deleting = actions.add_parser(
        "delete",
        parents=[config, queue_id],
        help="remove a quarantined message and its body",
        description="Remove the quarantined message from the queue, body included. It is not delivered and "
        "no bounce is sent.",
    )
    for action in (listing, showing, releasing, deleting):
        action.set_defaults(run=_quarantine)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """``argv`` (default: ``sys.argv[1:]``) read as a ``dcrouter`` command line; ``run`` is the command's
    function. Usage errors exit through argparse with status 2."""
    return _parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the ``dcrouter`` command with ``argv`` (default: ``sys.argv[1:]``); returns the exit status.
    Usage errors exit through argparse with status 2."""
    args = parse_args(argv)
    status: int = args.run(args)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
