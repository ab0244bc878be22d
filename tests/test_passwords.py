"""Tests for dcrouter.passwords: the scrypt hash format, verification and the bounds on stored parameters."""

from __future__ import annotations

import base64
import re

from twisted.trial import unittest

from dcrouter import passwords
from dcrouter.passwords import hash_password, is_password_hash, parse_password_hash, verify_password

# RFC 7914 §12, third vector: scrypt("pleaseletmein", "SodiumChloride", N=16384, r=8, p=1, dkLen=64).
RFC7914_DIGEST = bytes.fromhex(
    "7023bdcb3afd7348461c06cd81fd38ebfda8fbba904f8e3ea9b543f6545da1f2"
    "d5432955613f0fcf62d49705242a9af9e61e85dc0d651e40dfcf017b45575887"
)
RFC7914_HASH = "scrypt$14$8$1${}${}".format(
    base64.b64encode(b"SodiumChloride").decode(), base64.b64encode(RFC7914_DIGEST).decode()
)


PRODUCTION_LOG2_N = passwords.DEFAULT_LOG2_N


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class HashPasswordTests(unittest.TestCase):
    def setUp(self) -> None:
        # Cheap cost keeps the suite fast; the format and checks do not depend on it.
        self.patch(passwords, "DEFAULT_LOG2_N", 10)

    def test_format(self) -> None:
        stored = hash_password("secret")
        match = re.fullmatch(r"scrypt\$10\$8\$1\$([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+)", stored)
        self.assertIsNotNone(match)
        assert match is not None
        self.assertEqual(len(base64.b64decode(match.group(1))), 16)
        self.assertEqual(len(base64.b64decode(match.group(2))), 32)
        self.assertTrue(is_password_hash(stored))

    def test_verifies_only_the_right_password(self) -> None:
        stored = hash_password("correct horse")
        self.assertTrue(verify_password(stored, "correct horse"))
        self.assertFalse(verify_password(stored, "correct horse "))
        self.assertFalse(verify_password(stored, ""))

    def test_salt_is_random(self) -> None:
        first, second = hash_password("same"), hash_password("same")
        self.assertNotEqual(first, second)
        self.assertTrue(verify_password(first, "same"))
        self.assertTrue(verify_password(second, "same"))

    def test_non_ascii_password(self) -> None:
        stored = hash_password("pässwörd ✓")
        self.assertTrue(verify_password(stored, "pässwörd ✓"))
        self.assertFalse(verify_password(stored, "passwort ✓"))

    def test_explicit_cost(self) -> None:
        stored = hash_password("x", log2_n=11, r=4, p=2)
        self.assertTrue(stored.startswith("scrypt$11$4$2$"))
        self.assertTrue(verify_password(stored, "x"))

    def test_refuses_to_make_unverifiable_hash(self) -> None:
        self.assertRaises(ValueError, hash_password, "x", log2_n=30)
        self.assertRaises(ValueError, hash_password, "x", log2_n=16, r=1)
        self.assertRaises(ValueError, hash_password, "x", p=10_000)

    def test_production_default_is_strong(self) -> None:
        # setUp lowered the cost for speed; the shipped value is read from before the patch.
        self.assertGreaterEqual(PRODUCTION_LOG2_N, 15)
        self.assertGreaterEqual(passwords.DEFAULT_R, 8)


class VerifyPasswordTests(unittest.TestCase):
    def test_rfc7914_vector(self) -> None:
        self.assertTrue(is_password_hash(RFC7914_HASH))
        self.assertTrue(verify_password(RFC7914_HASH, "pleaseletmein"))
        self.assertFalse(verify_password(RFC7914_HASH, "pleaseletmein "))

    def test_plain_text(self) -> None:
        self.assertTrue(verify_password("hunter2", "hunter2"))
        self.assertFalse(verify_password("hunter2", "hunter"))
        self.assertFalse(verify_password("hunter2", "hunter22"))
        self.assertFalse(verify_password("", "x"))
        self.assertTrue(verify_password("", ""))
        self.assertFalse(is_password_hash("hunter2"))

    def test_damaged_hash_is_not_plain_text(self) -> None:
        for damaged in ["scrypt$", "scrypt$15$8$1$bad", RFC7914_HASH[:-1]]:
            self.assertFalse(is_password_hash(damaged), damaged)
            self.assertFalse(verify_password(damaged, damaged), damaged)
            self.assertTrue(passwords.looks_like_password_hash(damaged))


class BoundsTests(unittest.TestCase):
    salt = _b64(b"s" * 16)
    digest = _b64(b"d" * 32)

    def stored(
        self,
        log2_n: str = "15",
        r: str = "8",
        p: str = "1",
        salt: str | None = None,
        digest: str | None = None,
    ) -> str:
        return f"scrypt${log2_n}${r}${p}${salt or self.salt}${digest or self.digest}"

    def test_well_formed(self) -> None:
        parsed = parse_password_hash(self.stored())
        self.assertEqual(parsed, passwords.ScryptHash(15, 8, 1, b"s" * 16, b"d" * 32))
        assert parsed is not None
        self.assertEqual(parsed.encode(), self.stored())

    def test_hostile_costs_refused_without_computing(self) -> None:
        # Each of these would take gigabytes of memory or minutes of CPU if attempted.
        for stored in [
            self.stored(log2_n="30"),
            self.stored(log2_n="22"),
            self.stored(log2_n="20", r="8"),
            self.stored(r="1000"),
            self.stored(p="1000"),
            self.stored(log2_n="18", r="8", p="16"),
            self.stored(log2_n="9"),
            self.stored(r="0"),
            self.stored(p="0"),
        ]:
            self.assertFalse(is_password_hash(stored), stored)
            self.assertFalse(verify_password(stored, "x"), stored)

    def test_malformed_fields(self) -> None:
        for stored in [
            self.stored(log2_n="+15"),
            self.stored(log2_n=" 15"),
            self.stored(log2_n="1_5"),
            self.stored(log2_n="\u0661\u0665"),  # Arabic-Indic "15": int() would accept it
            self.stored(salt="not base64!"),
            self.stored(salt=_b64(b"short")),
            self.stored(digest=_b64(b"d" * 8)),
            self.stored(digest=_b64(b"d" * 65)),
            self.stored() + "$extra",
            self.stored().replace("scrypt", "bcrypt", 1),
            self.stored().replace("scrypt", "SCRYPT", 1),
        ]:
            self.assertFalse(is_password_hash(stored), stored)
