"""Metadata and MIME structure of a message, read once from a stream with bounded memory.

:func:`inspect_message` walks the raw bytes itself (``email.feedparser`` keeps the whole message in memory):
header blocks with folding, RFC 2047 encoded-words and RFC 2231 parameters; multipart boundaries per RFC 2046
(delimiter and close-delimiter lines, preamble, epilogue, transport padding), nested multiparts and
encapsulated ``message/rfc822`` messages; base64 and quoted-printable decoded incrementally. Each leaf part is
sized, hashed and sniffed as it goes by; text parts are decoded for scanners up to a budget.

Nothing here raises on hostile input. A limit crossed or a structure that different readers could see
differently makes the message *unscannable*: :attr:`MessageInfo.unscannable` says why, what was found until
then is kept, and the caller's policy decides (it must never be taken as clean). The result does not depend on
how the stream is chunked.

From, To and Cc are parsed strictly (``email.headerregistry`` cross-checked against ``email.utils``, the
checks of CVE-2023-27043's fix done here because Python 3.11 before 3.11.10 has no ``strict=True``): an
address that parses differently, or not at all, is left out rather than guessed, and an ambiguous ``From`` is
reported as such.
"""

from __future__ import annotations

import binascii
import codecs
import hashlib
import html
import re
from collections.abc import Callable
from dataclasses import dataclass
from email.headerregistry import HeaderRegistry
from email.utils import getaddresses
from typing import BinaryIO
from urllib.parse import unquote_to_bytes

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from dcrouter.processing.archive import MAGIC_BYTES, ArchiveLimits, ZipCollector, is_zip
from dcrouter.processing.sniff import SNIFF_BYTES, sniff_type

CHUNK_SIZE = 64 * 1024


@dataclass(frozen=True)
class MimeLimits:
    """How much of a message is inspected; beyond any of these the message is unscannable."""

    max_header_bytes: int = 256 * 1024  # any one header block (the message's, a part's)
    max_depth: int = 20  # nesting of multiparts and encapsulated messages
    max_parts: int = 1000  # body parts and encapsulated messages, all levels
    max_decoded_bytes: int = 64 * 1024 * 1024  # decoded content of all parts together
    max_text_bytes: int = 1024 * 1024  # UTF-8 text kept for scanners (beyond: truncated, not unscannable)
    # A part that is a zip is kept up to this many decoded bytes to list its entries (0: zips are not listed);
    # the next two are zip bomb limits read from its central directory. Crossing them marks the part
    # (Part.archive_problem), not the message.
    max_archive_bytes: int = 16 * 1024 * 1024
    max_archive_expanded: int = 256 * 1024 * 1024
    max_archive_entries: int = 10_000

    @property
    def archive(self) -> ArchiveLimits:
        return ArchiveLimits(self.max_archive_bytes, self.max_archive_expanded, self.max_archive_entries)


@dataclass(frozen=True)
class Part:
    """A leaf body part (not a multipart, not an encapsulated message's own header block)."""

    path: str  # IMAP-style part number: "1", "2.1", "3.1.2"
    depth: int
    declared_type: str  # lower-case type/subtype as declared (or its RFC 2045/2046 default)
    disposition: str | None  # "attachment", "inline", ... as declared, lower-case; None when absent
    filename: str | None  # Content-Disposition filename, else Content-Type name, decoded (RFC 2231 / 2047)
    names: tuple[str, ...]  # every distinct name declared for the part: scanners check them all
    transfer_encoding: str
    sniffed_type: str | None  # from the decoded content's first bytes; None when nothing known matched
    size: int  # decoded bytes (seen, when incomplete)
    sha256: str | None  # of the decoded content; None when incomplete
    complete: bool  # False when a limit stopped the inspection inside this part
    #: Entry names of a zip (by its content, whatever its name), from its central directory; not extracted.
    archive_names: tuple[str, ...] = ()
    #: Why the zip's entries cannot be trusted or listed ("encrypted archive", "zip bomb: ...", "archive too
    #: large", "corrupt archive: ..."); None for a sound zip and for parts that are not zips.
    archive_problem: str | None = None

    @property
    def is_attachment(self) -> bool:
        """Named, marked as an attachment, not a text body, or text whose content is something else."""
        if self.disposition == "attachment" or self.names:
            return True
        if self.declared_type not in ("text/plain", "text/html"):
            return True
        return self.sniffed_type not in (None, "text/html", "application/xml")


@dataclass(frozen=True)
class MessageInfo:
    #: top-level fields in order, unfolded; unstructured ones (Subject, X-...) RFC 2047-decoded
    headers: tuple[tuple[str, str], ...]
    from_addresses: tuple[str, ...]  # addr-specs of strictly parsed From fields; empty rather than guessed
    to: tuple[str, ...]
    cc: tuple[str, ...]
    subject: str | None
    message_id: str | None
    date: str | None
    #: not exactly one From field with exactly one strictly parsed mailbox: a policy input, never a guess
    from_ambiguous: bool
    parts: tuple[Part, ...]
    text: str  # text/plain and text/html (tags stripped) bodies, joined by newlines, up to max_text_bytes
    text_truncated: bool
    unscannable: str | None  # the first reason inspection is incomplete or untrustworthy; None when complete
    defects: tuple[str, ...]  # everything odd that was noticed, reasons for unscannable included
    size: int  # bytes read from the stream

    @property
    def attachments(self) -> tuple[Part, ...]:
        return tuple(p for p in self.parts if p.is_attachment)

    def get_all(self, name: str) -> list[str]:
        wanted = name.lower()
        return [value for field, value in self.headers if field.lower() == wanted]


def inspect_message(
    stream: BinaryIO, limits: MimeLimits = MimeLimits(), chunk_size: int = CHUNK_SIZE
) -> MessageInfo:
    """Read ``stream`` to its end once, in chunks, and describe the message. Only the stream's own I/O errors
    propagate. Memory stays within a few buffers of ``chunk_size`` plus the header and text budgets."""
    walker = _Walker(limits)
    while chunk := stream.read(chunk_size):
        walker.feed(chunk)
    walker.finish()
    return walker.result()


def inspect_in_thread(
    reactor: IReactorThreads,
    threadpool: ThreadPool,
    open_stream: Callable[[], BinaryIO],
    limits: MimeLimits = MimeLimits(),
) -> Deferred[MessageInfo]:
    """:func:`inspect_message` in ``threadpool``, off the reactor thread; ``open_stream`` (e.g.
    ``SpooledMessage.open``) is called there too and the stream closed after."""

    def work() -> MessageInfo:
        with open_stream() as stream:
            return inspect_message(stream, limits)

    return deferToThreadPool(reactor, threadpool, work)


# -- header values --

_ENCODED_WORD = re.compile(r"=\?([^?\s*]{1,64})(?:\*[^?\s]{0,32})?\?([bBqQ])\?([^?\s]{0,4096})\?=")
_BASE64_TEXT = re.compile(r"[A-Za-z0-9+/]*={0,2}")
_UNSTRUCTURED = frozenset({"subject", "comments", "keywords", "content-description", "thread-topic"})


def _text_of(raw: bytes) -> str:
    """Header bytes as text for callers: invalid UTF-8 and NUL become U+FFFD."""
    return raw.decode("utf-8", "replace").replace("\x00", "\ufffd")


def _exact_text(raw: bytes) -> str:
    """Header bytes as text that encodes back to the same bytes (a boundary must match byte for byte)."""
    return raw.decode("utf-8", "surrogateescape")


def _clean(text: str) -> str:
    return _text_of(text.encode("utf-8", "surrogateescape"))


def _codec(charset: str | None) -> codecs.CodecInfo:
    """A text codec for a declared charset: unknown, non-text (rot13, base64) or ASCII read as UTF-8."""
    try:
        info = codecs.lookup((charset or "utf-8").strip())
    except (LookupError, ValueError):
        return codecs.lookup("utf-8")
    if not getattr(info, "_is_text_encoding", True) or info.name == "ascii":
        return codecs.lookup("utf-8")
    return info


def _decode_charset(data: bytes, charset: str | None) -> str:
    try:
        return data.decode(_codec(charset).name, "replace")
    except (LookupError, UnicodeError, ValueError, TypeError):
        return data.decode("utf-8", "replace")


def decode_encoded_words(value: str) -> str:
    """RFC 2047: encoded-words decoded, whitespace between adjacent ones dropped, the rest left as it is."""
    out: list[str] = []
    pending = bytearray()
    pending_charset: str | None = None
    last = 0

    def flush() -> None:
        nonlocal pending_charset
        if pending_charset is not None:
            out.append(_decode_charset(bytes(pending), pending_charset))
            pending.clear()
            pending_charset = None

    for match in _ENCODED_WORD.finditer(value):
        between = value[last : match.start()]
        if pending_charset is None or between.strip(" \t") != "":
            flush()
            out.append(between)
        charset, kind, text = match.group(1).lower(), match.group(2).upper(), match.group(3)
        try:
            if kind == "B":
                if not _BASE64_TEXT.fullmatch(text):
                    raise ValueError(text)
                data = binascii.a2b_base64(text + "=" * (-len(text) % 4))
            else:
                data = binascii.a2b_qp(text.encode("ascii", "replace"), header=True)
        except (binascii.Error, ValueError):
            flush()
            out.append(match.group(0))
            last = match.end()
            continue
        if pending_charset is not None and pending_charset != charset:
            flush()
        pending_charset = charset
        pending += data
        last = match.end()
    flush()
    out.append(value[last:])
    return "".join(out)


_PARAM_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"?|\((?:[^()\\]|\\.)*\)?|;|[^";(]+', re.DOTALL)
_PARAM_NAME = re.compile(r"([^*\s]+)(?:\*(\d+))?(\*)?")
_MAX_PARAM_CHARS = 8192
_MAX_SEGMENT_INDEX = 999


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        return re.sub(r"\\(.)", r"\1", value[1:-1], flags=re.DOTALL)
    return value


def parse_structured(value: str) -> tuple[str, dict[str, list[str]], list[str]]:
    """``type/subtype; a=b; c*0*=...`` → (lower-case main value, every value declared per lower-case parameter
    name with RFC 2231 forms first, defects). Continuations are joined in index order up to the first gap, and
    capped."""
    items: list[str] = [""]
    for token in _PARAM_TOKENS.findall(value):
        if token == ";":
            items.append("")
        elif not token.startswith("(") or len(items) > 1:
            # A comment after the type carries nothing; in a parameter it is kept, as readers that ignore
            # comments there would show it (filename=evil(.exe)).
            items[-1] += token
    defects: list[str] = []
    params: dict[str, list[str]] = {}
    segments: dict[str, dict[int, tuple[str, bool]]] = {}
    for item in items[1:]:
        name, sep, raw = item.partition("=")
        name = name.strip().lower()
        if not name:
            continue
        if not sep:
            defects.append(f"parameter {name[:40]!r} without a value")
            continue
        match = _PARAM_NAME.fullmatch(name)
        if match is None or (match.group(2) is None and match.group(3) is None):
            params.setdefault(name, []).append(_unquote(raw)[:_MAX_PARAM_CHARS])
            continue
        base, index, extended = match.group(1), match.group(2), match.group(3) is not None
        number = 0 if index is None else int(index[:6])
        if number > _MAX_SEGMENT_INDEX:
            defects.append(f"parameter {base[:40]!r} continued beyond {_MAX_SEGMENT_INDEX} segments")
            continue
        parts = segments.setdefault(base, {})
        if number in parts:
            defects.append(f"parameter {base[:40]!r} segment {number} given twice")
            continue
        parts[number] = (_unquote(raw) if not extended else raw.strip(), extended)
    for base, parts in segments.items():
        joined = _join_rfc2231(base, parts, defects)
        plain = params.get(base, [])
        if plain and joined not in plain:
            defects.append(f"parameter {base[:40]!r} declared differently in its RFC 2231 form")
        params[base] = [joined, *plain]
    for name, values in params.items():
        if len(values) > 1 and len(set(values)) > 1:
            defects.append(f"parameter {name[:40]!r} declared more than once")
    return items[0].strip().lower(), params, defects


def _join_rfc2231(base: str, parts: dict[int, tuple[str, bool]], defects: list[str]) -> str:
    charset = "us-ascii"
    data = bytearray()
    number = 0
    while number in parts and len(data) <= _MAX_PARAM_CHARS:
        text, extended = parts[number]
        if extended:
            if number == 0:
                pieces = text.split("'", 2)
                if len(pieces) == 3:
                    charset, text = pieces[0] or charset, pieces[2]
                else:
                    defects.append(f"parameter {base[:40]!r} has no charset'language' prefix")
            data += unquote_to_bytes(text)
        else:
            data += text.encode("utf-8", "surrogateescape")
        number += 1
    if len(data) > _MAX_PARAM_CHARS:
        defects.append(f"parameter {base[:40]!r} longer than {_MAX_PARAM_CHARS} bytes, truncated")
        del data[_MAX_PARAM_CHARS:]
    elif len(parts) != number:
        defects.append(f"parameter {base[:40]!r} has a gap in its continuations")
    return _decode_charset(bytes(data), charset)


# -- addresses --

_REGISTRY = HeaderRegistry()
_MAX_ADDRESS_CHARS = 2048  # email.headerregistry is quadratic in places: each item parsed on its own, bounded
_MAX_ADDRESSES = 1000
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f\ufffd]")  # NUL, CR, LF, ..., and bytes that were not UTF-8
_ADDRESS_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"?|\((?:[^()\\]|\\.)*\)?|[<>,:;]|[^"<>,:;(]+', re.DOTALL)


def split_address_list(value: str) -> list[str]:
    """Split at the commas that separate addresses (not in quotes, comments, angle brackets or groups)."""
    items = [""]
    angle = group = False
    for token in _ADDRESS_TOKENS.findall(value):
        if token == "," and not angle and not group:
            items.append("")
            continue
        if token == "<":
            angle = True
        elif token == ">":
            angle = False
        elif token == ":" and not angle:
            group = True
        elif token == ";" and not angle:
            group = False
        items[-1] += token
    return [item.strip() for item in items if item.strip()]


def strict_mailboxes(value: str) -> list[str] | None:
    """The addr-specs of one address (or group); None if it is invalid or two parsers read it differently."""
    if len(value) > _MAX_ADDRESS_CHARS or value.count("(") > 8 or _CONTROL.search(value):
        return None
    try:
        header = _REGISTRY("to", value)
    except Exception:  # noqa: BLE001 (hostile input: a parser failure means "not a valid address")
        return None
    if header.defects:
        return None
    found = []
    for address in getattr(header, "addresses", ()):
        if not address.username or not address.domain:
            return None
        found.append(address.addr_spec)
    legacy = [spec for _, spec in getaddresses([value]) if spec]
    if legacy != found:
        return None
    return found


# -- body decoding --

_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_B64_DROP = bytes(b for b in range(256) if b not in _B64_ALPHABET + b"=")
_B64_VALID = _B64_ALPHABET + b"= \t\r\n"


class _Base64Decoder:
    """Lenient like mail readers (non-alphabet bytes skipped), noting every irregularity as a defect. Its
    state is a position in the stream (characters since the last padding), so any split of the input decodes
    the same."""

    def __init__(self) -> None:
        self._carry = b""
        self._segment = 0
        self._after_pad = False
        self.defects: set[str] = set()

    def feed(self, data: bytes) -> bytes:
        if data.translate(None, _B64_VALID):
            self.defects.add("characters outside the base64 alphabet ignored")
        out = []
        for index, piece in enumerate(data.translate(None, _B64_DROP).split(b"=")):
            if index:
                out.append(self._pad())
            if piece:
                if self._after_pad:
                    self.defects.add("base64 data after padding")
                    self._after_pad = False
                self._segment += len(piece)
                pending = self._carry + piece
                whole = len(pending) - len(pending) % 4
                out.append(binascii.a2b_base64(pending[:whole]))
                self._carry = pending[whole:]
        return b"".join(out)

    def _pad(self) -> bytes:
        carry, self._carry = self._carry, b""
        segment, self._segment = self._segment, 0
        after_pad, self._after_pad = self._after_pad, True
        if segment == 0 and after_pad:
            return b""  # the second "=" of "=="
        if not carry:
            self.defects.add("base64 padding where none belongs")
            return b""
        if len(carry) == 1:
            self.defects.add("truncated base64 quantum")
            return b""
        return binascii.a2b_base64(carry + b"=" * (4 - len(carry)))

    def flush(self) -> bytes:
        carry, self._carry = self._carry, b""
        if not carry:
            return b""
        self.defects.add("base64 not padded to a whole quantum")
        if len(carry) == 1:
            return b""
        return binascii.a2b_base64(carry + b"=" * (4 - len(carry)))


class _QuotedPrintableDecoder:
    def __init__(self) -> None:
        self._carry = b""
        self.defects: set[str] = set()

    def feed(self, data: bytes) -> bytes:
        data = self._carry + data
        # An escape ("=XX", "=\r\n") may be cut by the end of this piece: keep it for the next one.
        cut = data.rfind(b"=", max(0, len(data) - 2))
        if cut >= 0:
            data, self._carry = data[:cut], data[cut:]
        else:
            self._carry = b""
        return binascii.a2b_qp(data)

    def flush(self) -> bytes:
        carry, self._carry = self._carry, b""
        return binascii.a2b_qp(carry)


# -- text for scanners --


class _TextBudget:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._used = 0
        self.pieces: list[str] = []
        self.full = False
        self.truncated = False

    def add(self, text: str) -> None:
        if not text:
            return
        if self.full:
            self.truncated = True
            return
        encoded = text.encode("utf-8", "replace")
        room = self.limit - self._used
        if len(encoded) > room:
            text = encoded[:room].decode("utf-8", "ignore")
            encoded = text.encode("utf-8")
            self.full = self.truncated = True
        self.pieces.append(text)
        self._used += len(encoded)


_BLOCK_TAGS = frozenset(
    {"br", "p", "div", "tr", "td", "th", "li", "ul", "ol", "h1", "h2", "h3", "h4", "h5", "h6", "table", "hr"}
    | {"blockquote", "title", "pre", "section", "article"}
)
_TAG_NAME = re.compile(r"/?([A-Za-z][A-Za-z0-9]*)")
_ENTITY_TAIL = re.compile(r"&[^\s&<;]{0,31}\Z")


class _HtmlText:
    """Tags stripped, comments, scripts and styles dropped, entities decoded; fed any split of the text, the
    output is the same."""

    def __init__(self) -> None:
        self._state = "text"
        self._held = ""
        self._tag = ""
        self._skip_end: re.Pattern[str] | None = None

    def feed(self, text: str, final: bool = False) -> str:
        text, self._held = self._held + text, ""
        out: list[str] = []
        i, n = 0, len(text)
        while i < n:
            if self._state == "text":
                j = text.find("<", i)
                if j < 0:
                    rest = text[i:]
                    tail = None if final else _ENTITY_TAIL.search(rest)
                    if tail is not None:
                        self._held, rest = rest[tail.start() :], rest[: tail.start()]
                    out.append(html.unescape(rest))
                    break
                out.append(html.unescape(text[i:j]))
                if not final and n - j < 4 and "<!--".startswith(text[j:]):
                    self._held = text[j:]
                    break
                if text.startswith("<!--", j):
                    self._state, i = "comment", j + 4
                else:
                    self._state, self._tag, i = "tag", "", j + 1
            elif self._state == "tag":
                j = text.find(">", i)
                self._tag += text[i : (n if j < 0 else j)][: 32 - len(self._tag)]
                if j < 0:
                    break
                out.append(self._end_tag())
                i = j + 1
            elif self._state == "comment":
                j = text.find("-->", i)
                if j < 0:
                    self._held = "" if final else text[max(i, n - 2) :]
                    break
                self._state, i = "text", j + 3
            else:
                assert self._skip_end is not None
                match = self._skip_end.search(text, i)
                if match is None:
                    self._held = "" if final else text[max(i, n - 8) :]
                    break
                self._state, self._tag, i = "tag", "", match.start() + 1
        return "".join(out)

    def _end_tag(self) -> str:
        self._state = "text"
        match = _TAG_NAME.match(self._tag)
        if match is None:
            return ""
        name = match.group(1).lower()
        if name in ("script", "style") and not self._tag.startswith("/"):
            self._state = "skip"
            self._skip_end = re.compile("</" + name, re.IGNORECASE)
        return "\n" if name in _BLOCK_TAGS else ""


#: How much decoded input one text part may cost, as a multiple of the text budget: HTML that is all markup
#: yields no text, and stripping it is not free.
_TEXT_INPUT_FACTOR = 4


class _TextPart:
    def __init__(self, charset: str | None, is_html: bool, budget: _TextBudget) -> None:
        factory = _codec(charset).incrementaldecoder or codecs.getincrementaldecoder("utf-8")
        self._decoder = factory("replace")
        self._html = _HtmlText() if is_html else None
        self._budget = budget
        self._room = _TEXT_INPUT_FACTOR * budget.limit
        self._stopped = False
        if budget.pieces:
            budget.add("\n")

    def feed(self, data: bytes, final: bool = False) -> None:
        if self._budget.full or self._stopped:
            return
        if len(data) > self._room:
            data, final = data[: self._room], True
            self._stopped = self._budget.truncated = True
        self._room -= len(data)
        try:
            text = self._decoder.decode(data, final)
        except (UnicodeError, ValueError, TypeError, LookupError):
            self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
            text = self._decoder.decode(data, final)
        if self._html is not None:
            text = self._html.feed(text, final)
        self._budget.add(text)


# -- the walker --

_HEADERS, _LEAF, _IGNORE, _DRAIN = "headers", "leaf", "ignore", "drain"
_FIELD = re.compile(rb"([!-9;-~]+)([ \t]*):")
_PART_FIELDS = frozenset({b"content-type", b"content-transfer-encoding", b"content-disposition"})
_IDENTITY = frozenset({"7bit", "8bit", "binary"})
_MAX_DELIMITER_LINE = 1024  # a longer line is never a delimiter (boundaries are at most 70 characters)
_MAX_BOUNDARY = 200
_MAX_DEFECTS = 100


class _Entity:
    """A header block being read: the message's own (``top``), a body part's, or an encapsulated message's."""

    def __init__(self, depth: int, path: str, leaf_path: str, default_type: str, top: bool) -> None:
        self.depth = depth
        self.path = path
        self.leaf_path = leaf_path
        self.default_type = default_type
        self.top = top
        self.header_bytes = 0
        self.fields: list[tuple[bytes, bytes]] = []
        self._name: bytes | None = None
        self._value: list[bytes] | None = None

    def start_field(self, name: bytes, rest: bytes) -> None:
        self.close_field()
        self._name = name
        self._value = [rest] if self.top or name.lower() in _PART_FIELDS else None

    def continue_field(self, line: bytes) -> bool:
        if self._name is None:
            return False
        if self._value is not None:
            self._value.append(line)
        return True

    def close_field(self) -> None:
        if self._name is not None and self._value is not None:
            self.fields.append((self._name, b"".join(self._value).strip(b" \t")))
        self._name = self._value = None

    def values(self, name: bytes) -> list[bytes]:
        return [value for field, value in self.fields if field.lower() == name]


class _Frame:
    """An open multipart: its delimiter and how many parts it has had."""

    def __init__(self, boundary: bytes, depth: int, path: str, digest: bool) -> None:
        self.delimiter = b"--" + boundary
        self.depth = depth
        self.path = path
        self.digest = digest
        self.children = 0


class _Leaf:
    """The decoded content of one leaf part as it streams by: counted, hashed, sniffed, maybe read as text."""

    def __init__(
        self,
        walker: _Walker,
        entity: _Entity,
        kind: str,
        cte: str,
        params: dict[str, list[str]],
        disposition: str | None,
        names: tuple[str, ...],
    ) -> None:
        self._walker = walker
        self._entity = entity
        self._kind = kind
        self._cte = cte
        self._disposition = disposition
        self._names = names
        self._decoder: _Base64Decoder | _QuotedPrintableDecoder | None = None
        if cte == "base64":
            self._decoder = _Base64Decoder()
        elif cte == "quoted-printable":
            self._decoder = _QuotedPrintableDecoder()
        self._head = bytearray()
        self._sha = hashlib.sha256()
        self.size = 0
        self.truncated = False
        self._done = False
        self._text: _TextPart | None = None
        #: Until the first 4 decoded bytes are seen, whether the part is a zip is open.
        self._zip_undecided = walker.limits.max_archive_bytes > 0
        self._zip: ZipCollector | None = None
        if kind in ("text/plain", "text/html") and disposition != "attachment":
            charsets = params.get("charset")
            charset = charsets[0] if charsets else None
            self._text = _TextPart(charset, kind == "text/html", walker.text)

    def feed(self, data: bytes) -> None:
        self._take(self._decoder.feed(data) if self._decoder is not None else data)

    def _take(self, decoded: bytes) -> None:
        if not decoded or self.truncated:
            return
        allowed = self._walker.take_budget(len(decoded))
        if allowed < len(decoded):
            decoded = decoded[:allowed]
            self.truncated = True
        if self._zip_undecided and len(self._head) + len(decoded) >= MAGIC_BYTES:
            # Undecided means fewer than 4 bytes came before, all of them in the head.
            self._zip_undecided = False
            if is_zip(bytes(self._head) + decoded[:MAGIC_BYTES]):
                self._zip = ZipCollector(self._walker.limits.archive)
                self._zip.feed(bytes(self._head))
        if self._zip is not None:
            self._zip.feed(decoded)
        if len(self._head) < SNIFF_BYTES:
            self._head += decoded[: SNIFF_BYTES - len(self._head)]
        self._sha.update(decoded)
        self.size += len(decoded)
        if self._text is not None:
            self._text.feed(decoded)

    def finish(self, complete: bool) -> None:
        if self._done:
            return
        if complete and self._decoder is not None:
            self._take(self._decoder.flush())
        self._done = True
        if self._text is not None:
            self._text.feed(b"", final=True)
        path = self._entity.leaf_path
        if self._decoder is not None:
            for defect in sorted(self._decoder.defects):
                self._walker.defect(f"part {path}: {defect}")
        complete = complete and not self.truncated
        listing = self._zip.finish(complete) if self._zip is not None else None
        self._zip = None
        self._walker.parts.append(
            Part(
                path=path,
                depth=self._entity.depth,
                declared_type=self._kind,
                disposition=self._disposition,
                filename=self._names[0] if self._names else None,
                names=self._names,
                transfer_encoding=self._cte,
                sniffed_type=sniff_type(bytes(self._head)),
                size=self.size,
                sha256=self._sha.hexdigest() if complete else None,
                complete=complete,
                archive_names=listing.names if listing is not None else (),
                archive_problem=listing.problem if listing is not None else None,
            )
        )


class _Walker:
    """The push parser: :meth:`feed` any chunks, then :meth:`finish`. Everything it decides depends on the
    bytes only (lines, fixed limits), never on where the chunks were cut."""

    def __init__(self, limits: MimeLimits) -> None:
        self.limits = limits
        self.size = 0
        self.parts: list[Part] = []
        self.text = _TextBudget(limits.max_text_bytes)
        self.unscannable: str | None = None
        self._defects: dict[str, None] = {}
        self.top_fields: list[tuple[bytes, bytes]] = []
        self._buf = bytearray()
        self._pos = 0
        self._at_line_start = True
        self._pending_eol = b""
        self._frames: list[_Frame] = []
        self._entity: _Entity | None = _Entity(0, "", "1", "text/plain", top=True)
        self._leaf: _Leaf | None = None
        self._mode = _HEADERS
        self._entities = 0
        self._decoded = 0

    # -- bookkeeping --

    def defect(self, text: str) -> None:
        if len(self._defects) < _MAX_DEFECTS:
            self._defects[text] = None

    def broken(self, reason: str) -> None:
        """Inspection goes on, but the result cannot be trusted as complete."""
        self.defect(reason)
        if self.unscannable is None:
            self.unscannable = reason

    def _stop(self, reason: str) -> None:
        """A limit: keep what was found and read the rest without looking."""
        self.broken(reason)
        if self._entity is not None and self._entity.top:
            # The field being read is kept as far as it fit (its continuation may be cut).
            self._entity.close_field()
            self.top_fields = list(self._entity.fields)
        if self._leaf is not None:
            self._leaf.finish(complete=False)
            self._leaf = None
        self._entity = None
        self._mode = _DRAIN
        self._buf = bytearray()
        self._pos = 0

    def take_budget(self, wanted: int) -> int:
        allowed = min(wanted, self.limits.max_decoded_bytes - self._decoded)
        self._decoded += allowed
        return allowed

    # -- input --

    def feed(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self._mode == _DRAIN:
            return
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += chunk
        self._run(final=False)

    def finish(self) -> None:
        if self._mode != _DRAIN:
            self._run(final=True)
        if self._mode == _DRAIN:
            return
        if self._mode == _LEAF and self._pending_eol:
            self._feed_leaf(self._pending_eol)
            self._pending_eol = b""
            if self._mode == _DRAIN:
                return
        self._finish_current(complete=True)
        if self._frames and self._mode != _DRAIN:
            self.broken("multipart not closed: the message ends before its close delimiter")
        self._frames.clear()

    def _run(self, final: bool) -> None:
        while self._mode != _DRAIN:
            step = self._header_step if self._mode == _HEADERS else self._body_step
            if not step(final):
                return

    # -- header blocks --

    def _header_step(self, final: bool) -> bool:
        buf, pos, entity = self._buf, self._pos, self._entity
        assert entity is not None
        n = len(buf)
        if pos >= n:
            return False
        limit = self.limits.max_header_bytes
        end = buf.find(b"\n", pos)
        if end < 0:
            if entity.header_bytes + (n - pos) > limit:
                self._stop(f"header block larger than {limit} bytes")
                return False
            if not final:
                return False
            end = following = n
        else:
            following = end + 1
            if entity.header_bytes + (following - pos) > limit:
                self._stop(f"header block larger than {limit} bytes")
                return False
        line = bytes(buf[pos:end])
        if line.endswith(b"\r"):
            line = line[:-1]
        if b"\x00" in line:
            self.defect("NUL byte in a header block")
        if line.startswith(b"--") and (hit := self._match(line)) is not None:
            self._pos, self._at_line_start = following, True
            self._delimiter(*hit)
            return True
        if not line:
            self._pos, self._at_line_start = following, True
            entity.header_bytes += following - pos
            self._end_headers()
            return True
        if line[0] in b" \t":
            if not entity.continue_field(line):
                self.defect("header block starts with a continuation line")
        elif (field := _FIELD.match(line)) is not None:
            if field.group(2):
                self.defect(f"white space before the colon of {_text_of(field.group(1)[:40])!r}")
            entity.start_field(field.group(1), line[field.end() :])
        else:
            # Not a header field: the block ended without its blank line and this line is the body's first.
            self.defect("header block not ended by a blank line")
            self._end_headers()
            return True
        self._pos, self._at_line_start = following, True
        entity.header_bytes += following - pos
        return True

    def _end_headers(self) -> None:
        entity = self._entity
        assert entity is not None
        entity.close_field()
        self._entity = None
        if entity.top:
            self.top_fields = entity.fields
        kind, params, cte, disposition, names = self._content(entity)
        self._mode = _IGNORE
        if kind.startswith("multipart/"):
            boundaries = params.get("boundary", [])
            boundary = boundaries[0].encode("utf-8", "surrogateescape") if boundaries else b""
            if len(set(boundaries)) > 1:
                self.broken(f"part {entity.leaf_path}: conflicting multipart boundaries")
            elif not boundary or len(boundary) > _MAX_BOUNDARY:
                self.broken(f"part {entity.leaf_path}: multipart without a usable boundary")
            else:
                self._frames.append(_Frame(boundary, entity.depth, entity.path, kind == "multipart/digest"))
            return
        if kind in ("message/rfc822", "message/global") and cte in _IDENTITY:
            inner = f"{entity.path}.1" if entity.path else "1"
            self._begin_entity(entity.depth + 1, entity.path, inner, "text/plain")
            return
        if kind == "message/partial":
            self.broken(f"part {entity.leaf_path}: message/partial (content split across messages)")
        self._leaf = _Leaf(self, entity, kind, cte, params, disposition, names)
        self._mode = _LEAF

    def _content(self, entity: _Entity) -> tuple[str, dict[str, list[str]], str, str | None, tuple[str, ...]]:
        where = f"part {entity.leaf_path}"
        types = [_exact_text(v) for v in entity.values(b"content-type")]
        encodings = [_text_of(v).strip().lower() for v in entity.values(b"content-transfer-encoding")]
        dispositions = [_exact_text(v) for v in entity.values(b"content-disposition")]
        if len(set(types)) > 1:
            self.broken(f"{where}: conflicting Content-Type fields")
        if len(set(encodings)) > 1:
            self.broken(f"{where}: conflicting Content-Transfer-Encoding fields")
        kind, params = entity.default_type, dict[str, list[str]]()
        if types:
            kind, params, defects = parse_structured(types[0])
            for defect in defects:
                self.defect(f"{where}: Content-Type {defect}")
            if not re.fullmatch(r"[!#-'*+.0-9A-Z^-~-]+/[!#-'*+.0-9A-Z^-~-]+", kind):
                self.defect(f"{where}: invalid Content-Type {kind[:60]!r}")
                kind, params = "text/plain", {}
        cte = encodings[0] if encodings else "7bit"
        if cte not in _IDENTITY and cte not in ("base64", "quoted-printable"):
            self.defect(f"{where}: unknown Content-Transfer-Encoding {cte[:40]!r}, read as is")
        disposition = None
        names: list[str] = []
        if dispositions:
            disposition, disposition_params, defects = parse_structured(dispositions[0])
            for defect in defects:
                self.defect(f"{where}: Content-Disposition {defect}")
            names += disposition_params.get("filename", [])
        names += params.get("name", [])
        decoded = tuple(dict.fromkeys(_clean(decode_encoded_words(name)) for name in names if name))
        return kind, params, cte, disposition or None, decoded

    def _begin_entity(self, depth: int, path: str, leaf_path: str, default_type: str) -> None:
        self._entities += 1
        if self._entities > self.limits.max_parts:
            self._stop(f"more than {self.limits.max_parts} MIME parts")
        elif depth > self.limits.max_depth:
            self.broken(f"MIME nesting deeper than {self.limits.max_depth}")
            self._mode = _IGNORE
        else:
            self._entity = _Entity(depth, path, leaf_path, default_type, top=False)
            self._mode = _HEADERS

    # -- bodies --

    def _match(self, line: bytes) -> tuple[int, bool] | None:
        """Which open multipart ``line`` is a delimiter of (innermost first), and whether it closes it."""
        for index in range(len(self._frames) - 1, -1, -1):
            delimiter = self._frames[index].delimiter
            if line.startswith(delimiter):
                rest = line[len(delimiter) :]
                if not rest.strip(b" \t"):
                    return index, False
                if rest.startswith(b"--") and not rest[2:].strip(b" \t"):
                    return index, True
        return None

    def _body_step(self, final: bool) -> bool:
        buf, start = self._buf, self._pos
        n = len(buf)
        if start >= n:
            return False
        line = start if self._at_line_start else self._next_candidate(start)
        while line >= 0:
            if n - line < 2 and not final:
                return self._hold(start, line)
            if buf[line : line + 2] != b"--":
                line = self._next_candidate(line)
                continue
            end = buf.find(b"\n", line, line + _MAX_DELIMITER_LINE + 1)
            if end < 0:
                if n - line > _MAX_DELIMITER_LINE:
                    line = self._next_candidate(line)
                    continue
                if not final:
                    return self._hold(start, line)
                end = following = n
            else:
                following = end + 1
            text = bytes(buf[line:end])
            hit = self._match(text[:-1] if text.endswith(b"\r") else text)
            if hit is None:
                line = self._next_candidate(end) if end < n else -1
                continue
            self._emit(start, line)
            self._pending_eol = b""  # the line break before a delimiter belongs to the delimiter
            if self._mode == _DRAIN:
                return False
            self._pos, self._at_line_start = following, True
            self._delimiter(*hit)
            return True
        # No delimiter in sight: pass everything on but a tail that could begin one.
        stop = n if final else n - self._tail(start, n)
        self._emit(start, stop)
        if stop > start:
            self._pos, self._at_line_start = stop, buf[stop - 1] == 0x0A
        return False

    def _next_candidate(self, at: int) -> int:
        found = self._buf.find(b"\n--", at)
        return found + 1 if found >= 0 else -1

    def _tail(self, start: int, n: int) -> int:
        buf = self._buf
        if buf.endswith(b"\n-"):
            tail = 2
        elif buf.endswith((b"\n", b"\r")):
            tail = 1
        else:
            return 0
        if buf[n - 1] != 0x0D and n - tail - 1 >= 0 and buf[n - tail - 1] == 0x0D:
            tail += 1
        return min(tail, n - start)

    def _hold(self, start: int, line: int) -> bool:
        """Wait for more input to tell whether the line at ``line`` is a delimiter."""
        self._emit(start, line)
        if line > start:
            self._pos, self._at_line_start = line, True
        return False

    def _emit(self, start: int, stop: int) -> None:
        if stop <= start:
            return
        if self._mode != _LEAF:
            self._pending_eol = b""
            return
        data = bytes(self._buf[start:stop])
        pending = self._pending_eol
        if data.endswith(b"\n"):
            cut = 2 if data.endswith(b"\r\n") else 1
            self._pending_eol, data = data[-cut:], data[:-cut]
        else:
            self._pending_eol = b""
        self._feed_leaf(pending + data if pending else data)

    def _feed_leaf(self, data: bytes) -> None:
        assert self._leaf is not None
        if data:
            self._leaf.feed(data)
            if self._leaf.truncated:
                self._stop(f"decoded content larger than {self.limits.max_decoded_bytes} bytes")

    def _delimiter(self, index: int, close: bool) -> None:
        self._finish_current(complete=True)
        if self._mode == _DRAIN:
            return
        if index < len(self._frames) - 1:
            self.broken("multipart not closed before its enclosing multipart's boundary")
            del self._frames[index + 1 :]
        frame = self._frames[index]
        self._mode = _IGNORE
        if close:
            self._frames.pop()
            return
        frame.children += 1
        path = f"{frame.path}.{frame.children}" if frame.path else str(frame.children)
        self._begin_entity(frame.depth + 1, path, path, "message/rfc822" if frame.digest else "text/plain")

    def _finish_current(self, complete: bool) -> None:
        """The current entity ends here (a delimiter, the end of the message)."""
        while self._mode == _HEADERS:  # a header block with no body (an encapsulated message's may nest)
            self._end_headers()
        if self._mode == _LEAF and self._leaf is not None:
            leaf, self._leaf = self._leaf, None
            leaf.finish(complete)
            if leaf.truncated:
                self._stop(f"decoded content larger than {self.limits.max_decoded_bytes} bytes")
                return
        if self._mode != _DRAIN:
            self._mode = _IGNORE

    # -- result --

    def result(self) -> MessageInfo:
        headers: list[tuple[str, str]] = []
        for raw_name, raw_value in self.top_fields:
            name = _text_of(raw_name)
            value = _text_of(raw_value)
            if name.lower() in _UNSTRUCTURED or name.lower().startswith("x-"):
                value = decode_encoded_words(value)
            headers.append((name, value))
        fields: dict[str, list[str]] = {}
        for name, value in headers:
            fields.setdefault(name.lower(), []).append(value)
        from_fields = [_text_of(v) for n, v in self.top_fields if n.lower() == b"from"]
        from_addresses: list[str] = []
        from_ambiguous = len(from_fields) != 1
        for value in from_fields:
            items = split_address_list(value)
            found = strict_mailboxes(value) if len(items) == 1 else None
            if found is None:
                from_ambiguous = True
                self.defect("From field not strictly parsable as one mailbox")
            else:
                from_addresses += found
        if len(from_addresses) != 1:
            from_ambiguous = True

        def first(name: str) -> str | None:
            values = fields.get(name)
            return values[0].strip() if values else None

        to, cc = self._recipients(b"to"), self._recipients(b"cc")
        return MessageInfo(
            headers=tuple(headers),
            from_addresses=tuple(from_addresses),
            to=to,
            cc=cc,
            subject=first("subject"),
            message_id=first("message-id"),
            date=first("date"),
            from_ambiguous=from_ambiguous,
            parts=tuple(self.parts),
            text="".join(self.text.pieces),
            text_truncated=self.text.truncated,
            unscannable=self.unscannable,
            defects=tuple(self._defects),
            size=self.size,
        )

    def _recipients(self, name: bytes) -> tuple[str, ...]:
        found: list[str] = []
        for value in (_text_of(v) for n, v in self.top_fields if n.lower() == name):
            for item in split_address_list(value):
                if len(found) >= _MAX_ADDRESSES:
                    self.defect(f"{name.decode()}: more than {_MAX_ADDRESSES} addresses, the rest not parsed")
                    return tuple(found)
                addresses = strict_mailboxes(item)
                if addresses is None:
                    self.defect(f"{name.decode()}: an address not strictly parsable was left out")
                else:
                    found += addresses
        return tuple(found)
