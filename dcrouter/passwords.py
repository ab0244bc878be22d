"""Password hashes for ``smtpConfig.auth.users``: scrypt, in one self-describing string.

The format is ``scrypt$<log2 n>$<r>$<p>$<salt b64>$<hash b64>`` (standard base64 with padding), for example
``scrypt$15$8$1$3q2+7w...==$q1o...=``. A stored value that does not start with ``scrypt$`` is a plain-text
password; the config loader accepts it with a warning.

``verify_password`` is CPU- and memory-heavy on purpose (about 32 MiB and tens of milliseconds at the default
cost): call it off the reactor thread. Its cost parameters come from the configuration file, so they are
bounded here: a hostile or mistaken hash cannot make one check allocate gigabytes or run for minutes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from dataclasses import dataclass

PREFIX = "scrypt"

#: Cost of new hashes, read at call time so tests may lower it (``self.patch(passwords, "DEFAULT_LOG2_N",
#: 10)``).
DEFAULT_LOG2_N = 15
DEFAULT_R = 8
DEFAULT_P = 1
SALT_BYTES = 16
HASH_BYTES = 32

# Bounds on what a stored hash may ask for. Memory is 128 * r * n bytes; work grows with n * r * p.
MIN_LOG2_N = 10
MAX_LOG2_N = 20
MAX_R = 32
MAX_P = 16
MAX_MEMORY = 256 * 1024 * 1024
MAX_WORK = 2**24
MIN_SALT_BYTES = 8
MAX_SALT_BYTES = 64
MIN_HASH_BYTES = 16
MAX_HASH_BYTES = 64


@dataclass(frozen=True)
class ScryptHash:
    """A parsed, bounds-checked ``scrypt$`` string."""

    log2_n: int
    r: int
    p: int
    salt: bytes
    digest: bytes

    def encode(self) -> str:
        salt = base64.b64encode(self.salt).decode("ascii")
        digest = base64.b64encode(self.digest).decode("ascii")
        return f"{PREFIX}${self.log2_n}${self.r}${self.p}${salt}${digest}"


def _scrypt(password: str, salt: bytes, log2_n: int, r: int, p: int, length: int) -> bytes:
    n = 2**log2_n
    # OpenSSL refuses anything over its 32 MiB default maxmem, which the default cost already reaches.
    maxmem = 128 * r * n + 128 * r * p + 1024 * 1024
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=maxmem, dklen=length)


def _within_bounds(log2_n: int, r: int, p: int) -> bool:
    if not (MIN_LOG2_N <= log2_n <= MAX_LOG2_N and 1 <= r <= MAX_R and 1 <= p <= MAX_P):
        return False
    n = 2**log2_n
    # scrypt itself requires n < 2**(16 * r); OpenSSL reports a violation as "memory limit exceeded".
    return log2_n < 16 * r and 128 * r * n <= MAX_MEMORY and n * r * p <= MAX_WORK


def _decimal(text: str) -> int | None:
    # int() would accept "+8", " 8", "8_0" and non-ASCII digits; a hash string is stricter than that.
    if not text or len(text) > 3 or not (text.isascii() and text.isdigit()):
        return None
    return int(text)


def _b64(text: str) -> bytes | None:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        return None


def parse_password_hash(value: str) -> ScryptHash | None:
    """Parse ``value``; None unless it is a well-formed scrypt hash whose parameters are within bounds."""
    parts = value.split("$")
    if len(parts) != 6 or parts[0] != PREFIX:
        return None
    log2_n, r, p = (_decimal(part) for part in parts[1:4])
    salt, digest = _b64(parts[4]), _b64(parts[5])
    if log2_n is None or r is None or p is None or salt is None or digest is None:
        return None
    if not _within_bounds(log2_n, r, p):
        return None
    if not MIN_SALT_BYTES <= len(salt) <= MAX_SALT_BYTES:
        return None
    if not MIN_HASH_BYTES <= len(digest) <= MAX_HASH_BYTES:
        return None
    return ScryptHash(log2_n, r, p, salt, digest)


def hash_password(
    password: str, *, log2_n: int | None = None, r: int | None = None, p: int | None = None
) -> str:
    """Hash ``password`` with a fresh random salt; the result always satisfies ``is_password_hash``.

    Cost defaults to the module's ``DEFAULT_*`` values at call time. Raises ValueError for parameters outside
    the bounds ``verify_password`` accepts (so a hash it makes can always be checked).
    """
    log2_n = DEFAULT_LOG2_N if log2_n is None else log2_n
    r = DEFAULT_R if r is None else r
    p = DEFAULT_P if p is None else p
    if not _within_bounds(log2_n, r, p):
        raise ValueError(f"scrypt parameters out of bounds: log2 n={log2_n}, r={r}, p={p}")
    salt = os.urandom(SALT_BYTES)
    digest = _scrypt(password, salt, log2_n, r, p, HASH_BYTES)
    return ScryptHash(log2_n, r, p, salt, digest).encode()


def is_password_hash(value: str) -> bool:
    """True if ``value`` is a well-formed ``scrypt$`` hash with parameters ``verify_password`` accepts."""
    return parse_password_hash(value) is not None


def looks_like_password_hash(value: str) -> bool:
    """True if ``value`` claims to be a hash (starts with ``scrypt$``), well-formed or not.

    The config loader should refuse a value for which this is true but ``is_password_hash`` is false: it is a
    damaged hash, and ``verify_password`` never accepts any password for it.
    """
    return value.startswith(PREFIX + "$")


def verify_password(stored: str, password: str) -> bool:
    """True if ``password`` matches ``stored`` (a ``scrypt$`` hash, or plain text).

    Comparison is constant-time in both cases. A stored value that starts with ``scrypt$`` but is malformed or
    out of bounds matches no password (it is never treated as plain text). Blocking: run it in a thread.
    """
    if looks_like_password_hash(stored):
        parsed = parse_password_hash(stored)
        if parsed is None:
            return False
        candidate = _scrypt(password, parsed.salt, parsed.log2_n, parsed.r, parsed.p, len(parsed.digest))
        return hmac.compare_digest(candidate, parsed.digest)
    # Digests of equal length, so the comparison's time does not depend on the stored password's length.
    expected = hashlib.sha256(stored.encode("utf-8")).digest()
    given = hashlib.sha256(password.encode("utf-8")).digest()
    return hmac.compare_digest(expected, given)
