"""Tests for the streaming DKIM signer (dcrouter.processing.dkim).

Signatures are checked by dkimpy (``dkim.verify`` with a DNS function returning the test key record) and by
an independent verifier, Perl's Mail::DKIM (Debian ``libmail-dkim-perl``), given the record through a stub
resolver: no network is used.
"""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import subprocess
import threading
import tracemalloc
from typing import BinaryIO, cast

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest

from dcrouter.delivery.dotstuff import DotStuffer
from dcrouter.mail.dkimkeys import (
    DkimError,
    PrivateKey,
    dns_txt_record,
    dns_txt_value,
    generate_private_key,
    load_private_key,
    private_key_pem,
    read_private_key,
)
from dcrouter.processing.dkim import DkimSigner, RelaxedBodyHasher, sign_in_thread

NOW = 1_700_000_000
DOMAIN = "example.com"
SELECTOR = "sel"

# Generated once: RSA generation costs ~0.1-1 s.
RSA_KEY = generate_private_key("rsa", 2048)
ED_KEY = generate_private_key("ed25519")

MESSAGE = (
    b"Received: from client.example.net by mx.example.com; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    b"From: Alice <alice@example.com>\r\n"
    b"To: bob@example.org,\r\n"
    b"  carol@example.org\r\n"
    b"Cc: dave@example.org\r\n"
    b"Subject:   Quarterly   report\t \r\n"
    b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    b"Message-ID: <1@example.com>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"X-Mailer: test\r\n"
    b"\r\n"
    b"Hello  Bob,\t\r\n"
    b"\r\n"
    b"caf\xc3\xa9 \xff bytes   and\t\ttabs   \r\n"
    b" leading space\r\n"
    b"\r\n"
    b"\r\n"
)


def signer(key: PrivateKey = RSA_KEY, **kwargs: object) -> DkimSigner:
    return DkimSigner(DOMAIN, SELECTOR, private_key_pem(key), now=lambda: NOW, **kwargs)  # type: ignore[arg-type]


def dkimpy_verify(message: bytes, key: PrivateKey, domain: str = DOMAIN) -> bool:
    """dkimpy's verdict, its DNS answering ``key``'s record at ``sel._domainkey.<domain>`` (A-labels) only."""
    record = dns_txt_value(key).encode("ascii")
    names: list[bytes] = []

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        names.append(name)
        return record if name == f"{SELECTOR}._domainkey.{domain}.".encode() else None

    result = bool(dkim.verify(message, dnsfunc=dnsfunc))
    assert names, "dkimpy did not look the key up"
    return result


def dkimpy_body_hash(message: bytes) -> bytes:
    signed = dkim.sign(
        message,
        SELECTOR.encode(),
        DOMAIN.encode(),
        private_key_pem(RSA_KEY),
        canonicalize=(b"relaxed", b"relaxed"),
        include_headers=[b"from"],
    )
    return tag(signed, b"bh")


def tag(field: bytes, name: bytes) -> bytes:
    unfolded = re.sub(rb"\r\n[ \t]+", b" ", field)
    match = re.search(rb"(?:^|[;:]\s*)" + name + rb"=([^;]*)", unfolded)
    assert match is not None, (name, field)
    return re.sub(rb"\s+", b"", match.group(1))


class Chunked(io.RawIOBase):
    """A stream that returns at most ``sizes[i]`` octets on the i-th read (cycling), to cut a message
    anywhere."""

    def __init__(self, data: bytes, sizes: list[int]) -> None:
        self._data = data
        self._pos = 0
        self._sizes = sizes
        self._reads = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        size = self._sizes[self._reads % len(self._sizes)]
        self._reads += 1
        if n >= 0:
            size = min(size, n)
        chunk = self._data[self._pos : self._pos + size]
        self._pos += len(chunk)
        return chunk


class Generated(io.RawIOBase):
    """``header`` then ``size`` octets of body lines, produced on demand: nothing holds the whole message."""

    def __init__(self, header: bytes, size: int) -> None:
        self._pending = header
        self._left = size
        self._line = b"Lorem ipsum  dolor sit amet,\tconsectetur adipiscing elit, sed do eiusmod tempor. \r\n"

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            n = 1 << 30
        if not self._pending and self._left > 0:
            count = min(self._left, max(n, 1)) // len(self._line) + 1
            block = self._line * count
            block = block[: self._left]
            self._left -= len(block)
            self._pending = block
        chunk, self._pending = self._pending[:n], self._pending[n:]
        return chunk


# --- Perl Mail::DKIM, the independent verifier ---------------------------------------------------------

_PERL_VERIFIER = r"""
use strict;
use warnings;
use Mail::DKIM::Verifier;
use Net::DNS;

my ($name, @strings) = @ARGV;

package StubResolver;
sub new { return bless {}, shift }
sub errorstring { return 'NOERROR' }
sub send {
    my ($self, $domain, $type) = @_;
    my $packet = Net::DNS::Packet->new($domain, $type, 'IN');
    if (lc($domain) eq lc($name) && uc($type) eq 'TXT') {
        $packet->push(answer => Net::DNS::RR->new(name => $domain, type => 'TXT', txtdata => [@strings]));
    } else {
        $packet->header->rcode('NXDOMAIN');
    }
    return $packet;
}

package main;
Mail::DKIM::DNS::resolver(StubResolver->new);
my $verifier = Mail::DKIM::Verifier->new();
binmode STDIN;
local $/;
my $message = <STDIN>;
$verifier->PRINT($message);
$verifier->CLOSE;
print $verifier->result_detail, "\n";
"""


def _perl_has(module: str) -> bool:
    if shutil.which("perl") is None:
        return False
    return (
        subprocess.run(["perl", f"-M{module}", "-e", "1"], capture_output=True, check=False).returncode == 0
    )


HAVE_MAIL_DKIM = _perl_has("Mail::DKIM::Verifier") and _perl_has("Net::DNS")
NO_MAIL_DKIM = "Perl Mail::DKIM missing: apt-get install libmail-dkim-perl (independent DKIM verifier)"
HAVE_MAIL_DKIM_ED25519 = HAVE_MAIL_DKIM and _perl_has("Mail::DKIM::Algorithm::ed25519_sha256")
NO_MAIL_DKIM_ED25519 = "this Mail::DKIM has no ed25519-sha256 verifier (Debian 12 ships 1.20230212: RSA only)"
try:
    import nacl  # noqa: F401  (dkimpy verifies ed25519 with PyNaCl)

    NO_NACL = None
except ImportError:
    NO_NACL = "PyNaCl missing: dkimpy needs it to verify ed25519-sha256 (pip install pynacl)"


def mail_dkim_verify(
    message: bytes, key: PrivateKey, strings: list[str] | None = None, name: str = ""
) -> str:
    """Mail::DKIM's result detail (``pass``, ``fail (...)``, ``invalid (...)``, ``none``) with ``name``
    (default ``sel._domainkey.example.com``) answering the TXT ``strings`` (default: ``key``'s record)."""
    if strings is None:
        value = dns_txt_value(key)
        strings = [value[i : i + 255] for i in range(0, len(value), 255)]
    result = subprocess.run(
        ["perl", "-e", _PERL_VERIFIER, name or f"{SELECTOR}._domainkey.{DOMAIN}", *strings],
        input=message,
        capture_output=True,
        timeout=60,
        check=True,
    )
    return result.stdout.decode().strip()


# --- tests ------------------------------------------------------------------------------------------------


class KeyTests(unittest.TestCase):
    def test_rsa_under_2048_refused(self) -> None:
        small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
        e = self.assertRaises(DkimError, load_private_key, private_key_pem(small))  # type: ignore[arg-type]
        self.assertIn("1024 bits", str(e))
        self.assertRaises(DkimError, generate_private_key, "rsa", 1024)

    def test_other_key_types_refused(self) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        self.assertIn("RSA or Ed25519", str(self.assertRaises(DkimError, load_private_key, pem)))
        self.assertRaises(DkimError, generate_private_key, "dsa")

    def test_encrypted_and_garbage_refused(self) -> None:
        pem = RSA_KEY.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
        self.assertIn("encrypted", str(self.assertRaises(DkimError, load_private_key, pem)))
        self.assertRaises(DkimError, load_private_key, b"-----BEGIN PRIVATE KEY-----\nxx\n")

    def test_pkcs1_rsa_accepted(self) -> None:
        pem = RSA_KEY.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        self.assertIn(b"BEGIN RSA PRIVATE KEY", pem)
        self.assertEqual(signer().algorithm, DkimSigner(DOMAIN, SELECTOR, pem).algorithm)

    def test_inline_or_path(self) -> None:
        pem = private_key_pem(ED_KEY).decode()
        self.assertEqual(read_private_key(pem), pem.encode())
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(pem)
        self.assertEqual(read_private_key(path), pem.encode())
        self.assertIn("cannot read", str(self.assertRaises(DkimError, read_private_key, path + ".missing")))
        inline = DkimSigner.from_options(DOMAIN, SELECTOR, pem, now=lambda: NOW)
        from_file = DkimSigner.from_options(DOMAIN, SELECTOR, path, now=lambda: NOW)
        self.assertEqual(inline.sign(io.BytesIO(MESSAGE)), from_file.sign(io.BytesIO(MESSAGE)))

    def test_domain_and_selector(self) -> None:
        s = DkimSigner("Bücher.Example.", "Mail-2025", private_key_pem(ED_KEY))
        self.assertEqual((s.domain, s.selector), ("xn--bcher-kva.example", "mail-2025"))
        self.assertRaises(DkimError, DkimSigner, DOMAIN, "bad selector", private_key_pem(ED_KEY))
        self.assertRaises(DkimError, DkimSigner, DOMAIN, "_x", private_key_pem(ED_KEY))
        self.assertRaises(DkimError, DkimSigner, "exa mple.com", SELECTOR, private_key_pem(ED_KEY))


class RecordTests(unittest.TestCase):
    def test_rsa_record(self) -> None:
        record = dns_txt_record(DOMAIN, SELECTOR, RSA_KEY)
        self.assertTrue(record.startswith('sel._domainkey.example.com. IN TXT "v=DKIM1; k=rsa; p=MII'))
        strings = re.findall(r'"([^"]*)"', record)
        self.assertTrue(all(len(s) <= 255 for s in strings))
        self.assertEqual("".join(strings), dns_txt_value(RSA_KEY))
        der = base64.b64decode(dns_txt_value(RSA_KEY).split("p=")[1])
        public = serialization.load_der_public_key(der)
        self.assertEqual(public.public_numbers(), RSA_KEY.public_key().public_numbers())  # type: ignore[union-attr]

    def test_long_rsa_record_split(self) -> None:
        key = generate_private_key("rsa", 4096)
        strings = re.findall(r'"([^"]*)"', dns_txt_record(DOMAIN, SELECTOR, key))
        self.assertEqual([len(s) for s in strings[:-1]], [255] * (len(strings) - 1))
        self.assertGreaterEqual(len(strings), 3)

    def test_ed25519_record(self) -> None:
        value = dns_txt_value(ED_KEY)
        self.assertTrue(value.startswith("v=DKIM1; k=ed25519; p="))
        self.assertEqual(len(base64.b64decode(value.split("p=")[1])), 32)


class SignatureFieldTests(unittest.TestCase):
    def test_field(self) -> None:
        field = signer().sign(io.BytesIO(MESSAGE))
        self.assertTrue(
            field.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.com;")
        )
        self.assertTrue(field.endswith(b"\r\n"))
        lines = field[:-2].split(b"\r\n")
        self.assertTrue(all(len(line) <= 78 for line in lines), lines)
        self.assertTrue(all(line.startswith(b"\t") for line in lines[1:]))
        self.assertEqual(tag(field, b"t"), b"1700000000")
        self.assertEqual(tag(field, b"s"), b"sel")
        self.assertNotIn(b" l=", re.sub(rb"\r\n\t", b" ", field))

    def test_oversigning(self) -> None:
        field = signer().sign(io.BytesIO(MESSAGE))
        self.assertEqual(
            tag(field, b"h"),
            b"from:from:to:to:subject:subject:date:date:message-id:message-id:reply-to:cc:mime-version:"
            b"content-type",
        )

    def test_repeated_and_absent(self) -> None:
        message = b"From: a@example.com\r\nCc: x@example.org\r\nCc: y@example.org\r\n\r\nhi\r\n"
        field = signer().sign(io.BytesIO(message))
        self.assertEqual(tag(field, b"h"), b"from:from:to:subject:date:message-id:reply-to:cc:cc")
        self.assertTrue(dkimpy_verify(field + message, RSA_KEY))

    def test_deterministic_with_clock(self) -> None:
        self.assertEqual(signer().sign(io.BytesIO(MESSAGE)), signer().sign(io.BytesIO(MESSAGE)))
        later = DkimSigner(DOMAIN, SELECTOR, private_key_pem(RSA_KEY), now=lambda: NOW + 60.9)
        self.assertEqual(tag(later.sign(io.BytesIO(MESSAGE)), b"t"), b"1700000060")

    def test_reads_from_the_current_position(self) -> None:
        stream = io.BytesIO(b"garbage" + MESSAGE)
        stream.seek(7)
        self.assertEqual(signer().sign(stream), signer().sign(io.BytesIO(MESSAGE)))


class RefusalTests(unittest.TestCase):
    def test_no_from(self) -> None:
        e = self.assertRaises(DkimError, signer().sign, io.BytesIO(b"To: b@example.org\r\n\r\nhi\r\n"))
        self.assertIn("no From", str(e))
        self.assertRaises(DkimError, signer().sign, io.BytesIO(b"\r\nFrom: a@example.com\r\n"))

    def test_header_block_too_big(self) -> None:
        message = b"From: a@example.com\r\n" + b"X-Pad: " + b"x" * 5000 + b"\r\n\r\nhi\r\n"
        e = self.assertRaises(DkimError, signer(max_header_bytes=4096).sign, io.BytesIO(message))
        self.assertIn("header block exceeds 4096", str(e))

    def test_huge_header_never_terminated(self) -> None:
        stream = Generated(b"From: a@example.com\r\nX-Long: ", 10 * 1024 * 1024)
        self.assertRaises(DkimError, signer(max_header_bytes=64 * 1024).sign, stream)

    def test_malformed_header(self) -> None:
        for message in (b"From: a@example.com\r\nno colon here\r\n\r\n", b" folded\r\nFrom: a@x\r\n\r\n"):
            self.assertRaises(DkimError, signer().sign, io.BytesIO(message))


class VerificationTests(unittest.TestCase):
    """Signed messages verify with dkimpy; tampering makes verification fail."""

    def signed(self, key: PrivateKey = RSA_KEY, message: bytes = MESSAGE) -> bytes:
        return signer(key).sign(io.BytesIO(message)) + message

    def test_rsa(self) -> None:
        self.assertTrue(dkimpy_verify(self.signed(), RSA_KEY))

    def test_ed25519(self) -> None:
        if NO_NACL:
            raise unittest.SkipTest(NO_NACL)
        self.assertTrue(dkimpy_verify(self.signed(ED_KEY), ED_KEY))

    def test_ed25519_signature_is_rfc8463(self) -> None:
        # Without PyNaCl: check b= directly, Ed25519 over the SHA-256 of the header data as RFC 8463 says.
        field = signer(ED_KEY).sign(io.BytesIO(MESSAGE))
        self.assertEqual(tag(field, b"a"), b"ed25519-sha256")
        self.assertEqual(len(base64.b64decode(tag(field, b"b"))), 64)

    def test_second_from_fails(self) -> None:
        for key in (RSA_KEY, ED_KEY):
            if key is ED_KEY and NO_NACL:
                continue
            signed = self.signed(key)
            self.assertTrue(dkimpy_verify(signed, key))
            forged = signed.replace(b"From: Alice", b"From: Mallory <m@evil.example>\r\nFrom: Alice", 1)
            self.assertFalse(dkimpy_verify(forged, key))

    def test_oversigned_fields_cannot_be_added(self) -> None:
        signed = self.signed()
        for added in (b"Subject: other\r\n", b"Reply-To: m@evil.example\r\n", b"To: m@evil.example\r\n"):
            forged = signed.replace(b"X-Mailer:", added + b"X-Mailer:", 1)
            self.assertFalse(dkimpy_verify(forged, RSA_KEY), added)
        # A field that is not signed may be added (a Received: on the way, for instance).
        self.assertTrue(dkimpy_verify(signed.replace(b"X-Mailer:", b"X-Other: 1\r\nX-Mailer:", 1), RSA_KEY))

    def test_one_body_byte_fails(self) -> None:
        signed = self.signed()
        self.assertFalse(dkimpy_verify(signed.replace(b"Hello  Bob", b"Hello  Rob"), RSA_KEY))
        self.assertFalse(dkimpy_verify(signed.replace(b"\xff", b"\xfe"), RSA_KEY))

    def test_relaxed_tolerates_whitespace(self) -> None:
        signed = self.signed()
        self.assertTrue(dkimpy_verify(signed.replace(b"Hello  Bob", b"Hello \t Bob") + b"\r\n\r\n", RSA_KEY))
        self.assertTrue(dkimpy_verify(signed.replace(b"Subject:   Quarterly", b"Subject:Quarterly"), RSA_KEY))


BODIES = [
    b"",
    b"\r\n",
    b"\r\n\r\n\r\n",
    b"one line\r\n",
    b"no final line break",
    b"trailing blank lines\r\n\r\n\r\n\r\n",
    b"   \r\n\t\r\n",
    b"ws \t runs \t\t inside   and  trailing \t \r\nnext\r\n",
    b"\tleading tab\r\n  leading spaces\r\n",
    b"8-bit \x80\x81\xfe\xff caf\xc3\xa9\r\n",
    b"x" * 5000 + b"\r\n" + b"y " * 3000 + b"\r\n",
    b"empty lines\r\n\r\n\r\ninside\r\n \r\n",
    b"bare\nLF\nline ends\n\n",
]


class BodyHashTests(unittest.TestCase):
    """bh= equals dkimpy's for the same message (relaxed body canonicalisation)."""

    def test_bodies(self) -> None:
        for body in BODIES:
            message = b"From: a@example.com\r\nSubject: t\r\n\r\n" + body
            field = signer().sign(io.BytesIO(message))
            self.assertEqual(tag(field, b"bh"), dkimpy_body_hash(message), body)
            self.assertTrue(dkimpy_verify(field + message, RSA_KEY), body)

    def test_empty_body_hash(self) -> None:
        hasher = RelaxedBodyHasher()
        hasher.update(b"\r\n\r\n")
        # RFC 6376 errata 3192: an empty relaxed body hashes as the empty string.
        self.assertEqual(base64.b64encode(hasher.digest()), b"47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=")

    def test_no_body_at_all(self) -> None:
        for message in (b"From: a@example.com\r\n", b"From: a@example.com"):
            field = signer().sign(io.BytesIO(message))
            self.assertEqual(tag(field, b"bh"), b"47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=")

    def test_bare_cr_signed_as_relayed(self) -> None:
        # Delivery turns a bare CR or LF into CRLF; the signature is for those bytes.
        message = b"From: a@example.com\rTo: b@example.org\r\nSubject: s\n\r\nline\rline\r\r\nend \t"
        field = signer().sign(io.BytesIO(message))
        stuffer = DotStuffer()
        wire = b"".join(stuffer.encode(message[i : i + 3]) for i in range(0, len(message), 3))
        wire += stuffer.finish()
        relayed = wire.removesuffix(b".\r\n").replace(b"\r\n..", b"\r\n.")
        self.assertTrue(dkimpy_verify(field + relayed, RSA_KEY))


_LINE = st.lists(
    st.sampled_from([b"a", b"Z", b".", b" ", b"  ", b"\t", b" \t ", b"\xe9", b"\xff", b"x" * 200]),
    max_size=12,
).map(b"".join)
_BODY = st.lists(st.tuples(_LINE, st.sampled_from([b"\r\n", b"\r\n", b"\n", b""])), max_size=12).map(
    lambda lines: b"".join(text + end for text, end in lines)
)
_SUBJECT = st.lists(st.sampled_from([b"a", b" ", b"\t", b"  ", b"\xc3\xa9", b"\r\n "]), max_size=10).map(
    b"".join
)
_SIZES = st.lists(st.integers(min_value=1, max_value=70), min_size=1, max_size=8)


def _message(subject: bytes, body: bytes) -> bytes:
    return b"From: a@example.com\r\nSubject: x" + subject + b"\r\nTo: b@example.org\r\n\r\n" + body


class ChunkingTests(unittest.TestCase):
    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(subject=_SUBJECT, body=_BODY, sizes=_SIZES)
    def test_independent_of_chunking(self, subject: bytes, body: bytes, sizes: list[int]) -> None:
        message = _message(subject, body)
        whole = signer(ED_KEY).sign(io.BytesIO(message))
        self.assertEqual(signer(ED_KEY, chunk_size=max(sizes)).sign(Chunked(message, sizes)), whole)  # type: ignore[arg-type]

    @settings(max_examples=150, deadline=None)
    @given(subject=_SUBJECT, body=_BODY)
    def test_body_hash_as_dkimpy(self, subject: bytes, body: bytes) -> None:
        message = _message(subject, body)
        if not message.endswith(b"\n"):
            # An unterminated last line: relayed with a CRLF added, so compare against that form.
            message += b"\r\n"
        field = signer().sign(io.BytesIO(message))
        self.assertEqual(tag(field, b"bh"), dkimpy_body_hash(message))
        self.assertTrue(dkimpy_verify(field + message, RSA_KEY))

    @settings(max_examples=100, deadline=None)
    @given(
        pieces=st.lists(st.sampled_from([b"a", b" ", b"\t", b"\r\n", b"\r", b"\n", b"\xff"]), max_size=40),
        sizes=_SIZES,
    )
    def test_hasher_with_cr_lf_splits(self, pieces: list[bytes], sizes: list[int]) -> None:
        message = b"From: a@example.com\r\n\r\n" + b"".join(pieces)
        whole = signer(ED_KEY).sign(io.BytesIO(message))
        self.assertEqual(signer(ED_KEY).sign(Chunked(message, sizes)), whole)  # type: ignore[arg-type]


class MemoryTests(unittest.TestCase):
    def test_big_message_in_bounded_memory(self) -> None:
        header = MESSAGE.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
        size = 16 * 1024 * 1024
        s = signer()
        tracemalloc.start()
        try:
            field = s.sign(Generated(header, size))  # type: ignore[arg-type]
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        # A few 64 KiB chunks in flight, nothing that grows with the message (measured ~200 KB for 16 MB).
        self.assertLess(peak, 1024 * 1024, f"peak {peak} octets while signing {size}")
        self.assertTrue(field.startswith(b"DKIM-Signature:"))


reactor = cast(IReactorFromThreads, global_reactor)


class ThreadTests(unittest.TestCase):
    def setUp(self) -> None:
        self.pool = ThreadPool(minthreads=1, maxthreads=2, name="dkim-test")
        self.pool.start()
        self.addCleanup(self.pool.stop)

    def test_signs_off_the_reactor_thread(self) -> Deferred[None]:
        threads: list[threading.Thread] = []

        def open_stream() -> BinaryIO:
            threads.append(threading.current_thread())
            return io.BytesIO(MESSAGE)

        d = sign_in_thread(reactor, self.pool, signer(), open_stream)

        def check(field: bytes) -> None:
            self.assertEqual(field, signer().sign(io.BytesIO(MESSAGE)))
            self.assertIsNot(threads[0], threading.main_thread())

        return d.addCallback(check)

    def test_errors_arrive_as_failures(self) -> Deferred[object]:
        def missing() -> BinaryIO:
            return open(os.path.join(self.mktemp(), "gone"), "rb")

        d1 = self.assertFailure(sign_in_thread(reactor, self.pool, signer(), missing), OSError)
        no_from = sign_in_thread(reactor, self.pool, signer(), lambda: io.BytesIO(b"To: x@y\r\n\r\n"))
        d2 = self.assertFailure(no_from, DkimError)
        return d1.addCallback(lambda _: d2)


class MailDkimTests(unittest.TestCase):
    """The independent verifier: Perl's Mail::DKIM with the key record from a stub resolver."""

    def setUp(self) -> None:
        if not HAVE_MAIL_DKIM:
            raise unittest.SkipTest(NO_MAIL_DKIM)

    def test_rsa_passes(self) -> None:
        for body in (b"", b"short\r\n", b"x  \t y\r\n\r\n\r\n", b"\xff\xfe 8-bit\r\n" + b"z" * 900 + b"\r\n"):
            message = MESSAGE + body
            self.assertEqual(mail_dkim_verify(signer().sign(io.BytesIO(message)) + message, RSA_KEY), "pass")

    def test_second_from_fails(self) -> None:
        signed = signer().sign(io.BytesIO(MESSAGE)) + MESSAGE
        forged = signed.replace(b"From: Alice", b"From: Mallory <m@evil.example>\r\nFrom: Alice", 1)
        self.assertTrue(mail_dkim_verify(forged, RSA_KEY).startswith("fail"))
        appended = signed.replace(b"X-Mailer:", b"From: m@evil.example\r\nX-Mailer:", 1)
        self.assertTrue(mail_dkim_verify(appended, RSA_KEY).startswith("fail"))

    def test_body_byte_fails(self) -> None:
        signed = signer().sign(io.BytesIO(MESSAGE)) + MESSAGE
        detail = mail_dkim_verify(signed.replace(b"Hello  Bob", b"Hello  Rob"), RSA_KEY)
        self.assertIn("body has been altered", detail)

    def test_ed25519(self) -> None:
        if not HAVE_MAIL_DKIM_ED25519:
            raise unittest.SkipTest(NO_MAIL_DKIM_ED25519)
        signed = signer(ED_KEY).sign(io.BytesIO(MESSAGE)) + MESSAGE
        self.assertEqual(mail_dkim_verify(signed, ED_KEY), "pass")

    def test_big_generated_message(self) -> None:
        header = MESSAGE.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
        body = Generated(b"", 2 * 1024 * 1024).read(3 * 1024 * 1024)
        message = header + body
        self.assertEqual(mail_dkim_verify(signer().sign(io.BytesIO(message)) + message, RSA_KEY), "pass")
