"""The ``dcrouter`` command: helpers around the configuration (running the router is ``twistd dcrouter``).

``dcrouter hash-password`` prints a hash for ``smtpConfig.auth.users[].password``; ``dcrouter check FILE``
validates a configuration file as ``twistd dcrouter --config FILE --check`` does;
``dcrouter config-reference`` prints the reference of every key.
"""

from __future__ import annotations

import argparse
import getpass
import sys

from dcrouter import __version__

_EPILOG = """\
examples:
  dcrouter hash-password                  asks twice on the terminal, prints scrypt$...
  echo 'secret' | dcrouter hash-password  reads one line when stdin is not a terminal
  dcrouter check etc/dcrouter.example.toml
  dcrouter config-reference > reference.md

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
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``dcrouter`` command with ``argv`` (default: ``sys.argv[1:]``); returns the exit status.
    Usage errors exit through argparse with status 2."""
    args = _parser().parse_args(argv)
    status: int = args.run(args)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
