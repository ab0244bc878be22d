"""DKIM signing (RFC 6376, RFC 8463) that streams the message: the body is canonicalised and hashed chunk by
chunk, only the header block is held, and the header hash is signed with ``cryptography``.

Why not dkimpy's ``sign``: it needs the whole message as one ``bytes`` and copies it several times while
canonicalising (measured 4 s and +224 MiB RSS for 50 MB, docs/dkim.md), and it has no way to pass a
precomputed ``bh=``. dkimpy stays the cross-check in the tests.

What a caller may rely on (:class:`DkimSigner`):

- ``sign(stream)`` reads ``stream`` from its position to EOF in chunks and returns one ``DKIM-Signature:``
  header field, folded, CRLF-terminated, to put in front of the message unchanged.
- ``a=rsa-sha256`` (keys of 2048 bits or more) or ``a=ed25519-sha256``; ``c=relaxed/relaxed``; no ``l=``;
  ``t=`` from the injected clock; ``d=`` in A-label form.
- Signed header fields: From, To, Subject, Date, Message-ID, Reply-To, Cc, MIME-Version, Content-Type as far
  as present; From, To, Subject, Date, Message-ID and Reply-To are listed once more than they occur
  ("oversigned"), so a field of those names added later - a second From - breaks the signature.
- The signature covers the message as dcrouter's delivery puts it on the wire: a bare CR or bare LF counts
  as a line break (delivery turns each into CRLF) and an unterminated last line as terminated (delivery adds
  the CRLF). For CRLF text, which is all the spool lets in, this is simply the message.
- Memory: one chunk, the header block (at most ``max_header_bytes``) and a few bytes of state; the result
  does not depend on how the stream cuts the message into reads.
- Errors are :class:`DkimError` with a sentence saying what is wrong (no From, header block too big, a
  malformed header line, a weak or unsupported key).
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Callable, Iterable
from typing import BinaryIO

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, padding
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from dcrouter.mail.dkimkeys import (
    DkimError,
    dns_txt_record,
    load_private_key,
    read_private_key,
    selector_label,
    signing_domain,
)
from dcrouter.mail.headers import HeaderBlock, HeaderError

__all__ = [
    "OVERSIGNED_HEADERS",
    "SIGNED_HEADERS",
    "DkimSigner",
    "RelaxedBodyHasher",
    "sign_in_thread",
]

#: Header fields signed when present, in the order they are listed in ``h=``.
SIGNED_HEADERS = (
    "from",
    "to",
    "subject",
    "date",
    "message-id",
    "reply-to",
    "cc",
    "mime-version",
    "content-type",
)
#: Fields listed once more than they occur (once when absent): nobody can add one without breaking ``b=``.
OVERSIGNED_HEADERS = frozenset({"from", "to", "subject", "date", "message-id", "reply-to"})
#: Octets read per call to ``stream.read``.
CHUNK_SIZE = 64 * 1024
#: The header block is the one part held in memory; beyond this the message is not signed.
MAX_HEADER_BYTES = 1024 * 1024
#: Longest line of the generated field (RFC 5322 recommends 78).
_FOLD_WIDTH = 78


# --- canonicalisation -------------------------------------------------------------------------------------


class _WireLineEndings:
    """Turns CRLF, bare CR and bare LF each into one CRLF, as delivery's DotStuffer does, across chunk
    boundaries: a trailing CR is held until the next chunk shows whether a LF follows. Output chunks never
    end inside a CRLF."""

    def __init__(self) -> None:
        self._held_cr = False

    def feed(self, chunk: bytes) -> bytes:
        if self._held_cr:
            chunk = b"\r" + chunk
        self._held_cr = chunk.endswith(b"\r")
        if self._held_cr:
            chunk = chunk[:-1]
        crlf = chunk.count(b"\r\n")
        if chunk.count(b"\r") == crlf and chunk.count(b"\n") == crlf:
            return chunk  # already CRLF text: the common case, no copy
        return chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")

    def finish(self) -> bytes:
        held, self._held_cr = self._held_cr, False
        return b"\r\n" if held else b""


class RelaxedBodyHasher:
    """The "relaxed" body canonicalisation (RFC 6376 §3.4.4) hashed incrementally.

    Feed CRLF text with :meth:`update` (a chunk must not end between a CR and its LF; :class:`DkimSigner`
    sees to that), then :meth:`digest`. A WSP run at the end of a chunk and line breaks at the end of the
    text so far are held back, so the result is the same however the text is cut: trailing WSP of a line
    and trailing empty lines of the body are dropped, WSP runs become one SP, a non-empty body ends in
    exactly one CRLF and an empty one hashes as empty. An unterminated last line is treated as terminated.
    """

    def __init__(self, hash_factory: Callable[[], hashlib._Hash] = hashlib.sha256) -> None:
        self._hash = hash_factory()
        self._held_crlfs = 0
        self._held_wsp = False
        self._content = False

    def update(self, chunk: bytes) -> None:
        if not chunk:
            return
        if self._held_wsp:
            # Re-attached, it merges with WSP that follows and disappears before a CRLF.
            chunk = b" " + chunk
            self._held_wsp = False
        chunk = _compress_wsp(chunk)
        chunk = chunk.replace(b" \r\n", b"\r\n")
        if chunk.endswith(b" "):
            self._held_wsp = True
            chunk = chunk[:-1]
        # The chunk is CRLF text, so a run of CR and LF octets at its end is whole CRLFs.
        text = chunk.rstrip(b"\r\n")
        if text:
            if self._held_crlfs:
                self._hash.update(b"\r\n" * self._held_crlfs)
            self._hash.update(text)
            self._content = True
            self._held_crlfs = (len(chunk) - len(text)) // 2
        else:
            self._held_crlfs += len(chunk) // 2

    def digest(self) -> bytes:
        """The hash of the canonical body; call once, after the last :meth:`update`."""
        if self._content:
            # One CRLF ends the last line, whether it had one or many (trailing empty lines) or none.
            self._hash.update(b"\r\n")
        return self._hash.digest()


def _compress_wsp(text: bytes) -> bytes:
    """Every run of SP and HTAB as one SP. Plain ``replace`` passes rather than ``re.sub``, which on a 64 KiB
    chunk of ordinary text builds a list of pieces 30 times its size; each pass halves the longest run."""
    if b"\t" in text:
        text = text.replace(b"\t", b" ")
    while b"  " in text:
        text = text.replace(b"  ", b" ")
    return text


def _relaxed_header(name: bytes, value: bytes) -> bytes:
    """``name:value`` in relaxed form (RFC 6376 §3.4.2), without the CRLF."""
    value = _compress_wsp(value.replace(b"\r\n", b"")).strip(b" ")
    return name.rstrip(b" \t").lower() + b":" + value


def _parse_header_block(block: bytes) -> list[tuple[bytes, bytes]]:
    """``(name, value)`` pairs of a CRLF header block (without the empty line); the value keeps its
    folding. The name may be followed by WSP before the colon (obsolete syntax, RFC 5322 §4.5)."""
    try:
        parsed = HeaderBlock.parse(block)
    except HeaderError as e:
        raise DkimError(str(e)) from e
    pairs = []
    for field in parsed:
        name, _, value = field.raw.partition(b":")
        pairs.append((name.rstrip(b" \t"), value[:-2]))
    return pairs


def _select(fields: list[tuple[bytes, bytes]], names: Iterable[str]) -> list[tuple[bytes, bytes]]:
    """The fields ``h=`` covers, in ``h=`` order: each name takes the last instance not yet taken, from
    the bottom up (RFC 6376 §5.4.2); a name with no instance left contributes nothing."""
    taken: dict[bytes, int] = {}
    chosen = []
    for text in names:
        name = text.encode("ascii")
        i = taken.get(name, len(fields))
        while i > 0:
            i -= 1
            if fields[i][0].lower() == name:
                chosen.append(fields[i])
                break
        taken[name] = i
    return chosen


# --- the signer -------------------------------------------------------------------------------------------


class DkimSigner:
    """Signs messages for one ``d=``/``s=`` with one key. Thread-safe: :meth:`sign` keeps its state local,
    so one signer may serve a whole thread pool."""

    def __init__(
        self,
        domain: str,
        selector: str,
        private_key_pem: bytes | str,
        *,
        now: Callable[[], float] = time.time,
        max_header_bytes: int = MAX_HEADER_BYTES,
        chunk_size: int = CHUNK_SIZE,
    ) -> None:
        self.domain = signing_domain(domain)
        self.selector = selector_label(selector)
        self._key = load_private_key(private_key_pem)
        self.algorithm = (
            "ed25519-sha256" if isinstance(self._key, ed25519.Ed25519PrivateKey) else "rsa-sha256"
        )
        self._now = now
        self._max_header_bytes = max_header_bytes
        self._chunk_size = chunk_size

    @classmethod
    def from_options(
        cls, domain_name: str, key_selector: str, private_key: str, *, now: Callable[[], float] = time.time
    ) -> DkimSigner:
        """A signer from ``dkimOptions`` (``privateKey`` inline PEM or a file path)."""
        return cls(domain_name, key_selector, read_private_key(private_key), now=now)

    def dns_txt_record(self) -> str:
        """The record that must be published for this signer's signatures to verify."""
        return dns_txt_record(self.domain, self.selector, self._key)

    def sign(self, stream: BinaryIO) -> bytes:
        """The ``DKIM-Signature:`` field (folded, CRLF-terminated) for the message read from ``stream``."""
        fields, body_hash = self._read(stream)
        if not any(name.lower() == b"from" for name, _ in fields):
            raise DkimError("the message has no From header field, which DKIM must sign")
        names = self._signed_names(fields)
        tags = [
            ("v", "1"),
            ("a", self.algorithm),
            ("c", "relaxed/relaxed"),
            ("d", self.domain),
            ("s", self.selector),
            ("t", str(int(self._now()))),
            ("h", ":".join(names)),
            ("bh", base64.b64encode(body_hash).decode("ascii")),
        ]
        unsigned = _fold(tags)
        data = b"".join(_relaxed_header(n, v) + b"\r\n" for n, v in _select(fields, names))
        # The field itself with an empty b=, relaxed, and without its CRLF (RFC 6376 §3.7).
        name, _, value = unsigned.partition(b":")
        data += _relaxed_header(name, value)
        signature = base64.b64encode(self._signature(data)).decode("ascii")
        return unsigned + _fold_b(signature) + b"\r\n"

    def _signature(self, data: bytes) -> bytes:
        if isinstance(self._key, ed25519.Ed25519PrivateKey):
            # RFC 8463 §3: Ed25519 signs the SHA-256 hash of the header data (PureEdDSA over the digest).
            return self._key.sign(hashlib.sha256(data).digest())
        return self._key.sign(data, padding.PKCS1v15(), hashes.SHA256())

    @staticmethod
    def _signed_names(fields: list[tuple[bytes, bytes]]) -> list[str]:
        counts: dict[str, int] = {}
        for field_name, _ in fields:
            key = field_name.decode("ascii").lower()
            counts[key] = counts.get(key, 0) + 1
        names: list[str] = []
        for name in SIGNED_HEADERS:
            n = counts.get(name, 0) + (1 if name in OVERSIGNED_HEADERS else 0)
            names.extend([name] * n)
        return names

    def _read(self, stream: BinaryIO) -> tuple[list[tuple[bytes, bytes]], bytes]:
        """The header fields and the relaxed body hash, reading ``stream`` once in chunks."""
        wire = _WireLineEndings()
        body = RelaxedBodyHasher()
        header = bytearray()
        in_header = True
        while True:
            raw = stream.read(self._chunk_size)
            chunk = wire.feed(raw) if raw else wire.finish()
            if in_header:
                # A message that starts with an empty line has no header block.
                if not header and chunk.startswith(b"\r\n"):
                    in_header = False
                    body.update(chunk[2:])
                else:
                    start = max(0, len(header) - 3)
                    header += chunk
                    end = header.find(b"\r\n\r\n", start)
                    if end >= 0 and end + 2 <= self._max_header_bytes:
                        in_header = False
                        body.update(bytes(header[end + 4 :]))
                        del header[end + 2 :]
                    elif end >= 0 or len(header) > self._max_header_bytes:
                        raise DkimError(
                            f"the header block exceeds {self._max_header_bytes} octets; not signed"
                        )
            else:
                body.update(chunk)
            if not raw:
                break
        return _parse_header_block(bytes(header)), body.digest()


def _fold(tags: list[tuple[str, str]]) -> bytes:
    """``DKIM-Signature: tag=value; ...;`` folded at :data:`_FOLD_WIDTH`, ending in ``b=`` on a line of its
    own (so the signature appended later never moves what was hashed). ``h=`` may break after a colon."""
    lines = ["DKIM-Signature:"]
    for tag, value in tags:
        pieces = [f"{tag}={value};"]
        if tag == "h":
            parts = value.split(":")
            pieces = [f"h={p}:" for p in parts[:1]] + [f"{p}:" for p in parts[1:]]
            pieces[-1] = pieces[-1][:-1] + ";"
        first = True
        for piece in pieces:
            sep = " " if first else ""
            if len(lines[-1]) + len(sep) + len(piece) <= _FOLD_WIDTH:
                lines[-1] += sep + piece
            else:
                lines.append("\t" + piece)
            first = False
    lines.append("\tb=")
    return "\r\n".join(lines).encode("ascii")


def _fold_b(signature: str) -> bytes:
    """The base64 signature continuing the ``b=`` line, broken with FWS (allowed inside ``b=``)."""
    width = _FOLD_WIDTH - 1
    first = width - len("b=")
    parts = [signature[:first]] + [signature[i : i + width] for i in range(first, len(signature), width)]
    return "\r\n\t".join(p for p in parts if p).encode("ascii")


def sign_in_thread(
    reactor: IReactorFromThreads,
    threadpool: ThreadPool,
    signer: DkimSigner,
    open_stream: Callable[[], BinaryIO],
) -> Deferred[bytes]:
    """Sign in ``threadpool`` (whose size bounds how many messages are signed at once) and fire on the
    reactor thread with the ``DKIM-Signature:`` field, or fail with :class:`DkimError` or the ``OSError``
    of opening or reading. ``open_stream`` runs in the pool too (``SpooledMessage.open`` fits); the stream
    is closed either way."""

    def work() -> bytes:
        with open_stream() as stream:
            return signer.sign(stream)

    return deferToThreadPool(reactor, threadpool, work)
