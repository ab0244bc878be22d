"""The ``dcrouter`` command: helpers around the configuration (running the router is ``twistd dcrouter``).

``dcrouter hash-password`` prints a hash for ``smtpConfig.auth.users[].password``; ``dcrouter check FILE``
validates a configuration file as ``twistd dcrouter --config FILE --check`` does;
``dcrouter config-reference`` prints the reference of every key; ``dcrouter dkim-keygen`` writes a DKIM
signing key and prints the DNS record to publish.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys

from dcrouter import __version__

_EPILOG = """\
examples:
  dcrouter hash-password                  asks twice on the terminal, prints scrypt$...
  echo 'secret' | dcrouter hash-password  reads one line when stdin is not a terminal
  dcrouter check etc/dcrouter.example.toml
  dcrouter config-reference > reference.md
  dcrouter dkim-keygen --domain example.com --selector mail2025 --out /etc/dcrouter/dkim

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


def _check(args: argparse.Namespace) -> int:
    # One implementation for `dcrouter check` and `twistd dcrouter --check`, so both print the same.
    from dcrouter.tap import check

    return check(args.config, sys.stdout, sys.stderr)


def _config_reference(args: argparse.Namespace) -> int:
    from dcrouter.config.reference import render

    sys.stdout.write(render())
    return 0


def _dkim_keygen(args: argparse.Namespace) -> int:
    from dcrouter.processing.dkim import (
        DkimError,
        dns_txt_record,
        generate_private_key,
        private_key_pem,
    )

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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dcrouter",
        description="Configuration helpers for dcrouter, the SMTP store-and-forward gateway on Twisted.",
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
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``dcrouter`` command with ``argv`` (default: ``sys.argv[1:]``); returns the exit status.
    Usage errors exit through argparse with status 2."""
    args = _parser().parse_args(argv)
    status: int = args.run(args)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
