"""A message's top-level header block as raw fields that transformations edit without touching the body.

The block is read once from the start of the spooled message (:func:`read_header_block`), bounded by a byte
limit; the body is never read here. Fields keep their exact bytes (folding included) until changed, so a
message whose headers a transformation did not touch is relayed byte for byte.

Every value written through this module is checked: no CR, LF or NUL can be injected through a
transformation's configured value or a rewritten address; a name is RFC 5322 ``ftext``. Non-ASCII values of
unstructured fields are RFC 2047-encoded; long values are folded at whitespace.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.header import Header
from typing import BinaryIO

#: RFC 5322 field name: printable US-ASCII except the colon.
_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+\Z")
_FIELD_NAME_TEXT = re.compile(r"[\x21-\x39\x3b-\x7e]{1,76}\Z")
_FORBIDDEN = re.compile(r"[\r\n\x00]")
FOLD_WIDTH = 78


class HeaderError(ValueError):
    """A header name or value that must not be written (CR/LF/NUL, a bad name) or a block that is not one."""


class HeaderTooLarge(HeaderError):
    """The header block is longer than the limit: the message is unscannable by policy."""


def check_name(name: str) -> str:
    """``name`` if it is a valid field name, else :class:`HeaderError`."""
    if not _FIELD_NAME_TEXT.match(name):
        raise HeaderError(f"invalid header field name {name!r}")
    return name


def check_value(value: str) -> str:
    """``value`` if it holds no CR, LF or NUL (header injection), else :class:`HeaderError`."""
    if _FORBIDDEN.search(value):
        raise HeaderError("a header value must not contain CR, LF or NUL")
    return value


#: Fields whose value is structured (addresses, message ids): RFC 2047 would swallow the addr-spec, so
#: non-ASCII text in them (RFC 6532 UTF-8 display names, as received) is written as UTF-8.
_STRUCTURED = frozenset(
    {
        "from", "to", "cc", "bcc", "reply-to", "sender", "resent-from", "resent-to", "resent-cc",
        "resent-bcc", "resent-sender", "message-id", "in-reply-to", "references", "return-path",
    }
)  # fmt: skip


def encode_field(name: str, value: str) -> bytes:
    """One complete field, ``Name: value`` folded to :data:`FOLD_WIDTH` where whitespace allows, ending in
    CRLF. Non-ASCII text is RFC 2047-encoded (UTF-8), except in address and message-id fields, where it is
    kept as UTF-8 (RFC 6532)."""
    check_name(name)
    check_value(value)
    if not value.isascii() and name.lower() in _STRUCTURED:
        return _fold(f"{name}: {value}").encode("utf-8") + b"\r\n"
    if not value.isascii():
        encoded = Header(value, "utf-8", header_name=name).encode(linesep="\r\n")
        return f"{name}: {encoded}\r\n".encode("ascii")
    return _fold(f"{name}: {value}").encode("ascii") + b"\r\n"


def _fold(line: str) -> str:
    if len(line) <= FOLD_WIDTH:
        return line
    out: list[str] = []
    current = ""
    for word in re.split(r"(?<=\S)(?=[ \t])", line):
        if current and len(current) + len(word) > FOLD_WIDTH and current.strip():
            out.append(current)
            current = word if word[:1] in (" ", "\t") else " " + word
        else:
            current += word
    out.append(current)
    return "\r\n".join(out)


@dataclass
class Field:
    name: str  # as written (case kept)
    raw: bytes  # the whole field: "Name:" value, folding and the final CRLF

    @property
    def value(self) -> str:
        """Unfolded value without the leading whitespace, as text (invalid UTF-8 as U+FFFD)."""
        _, _, rest = self.raw.partition(b":")
        text = rest.replace(b"\r\n", b"").replace(b"\n", b"").decode("utf-8", "replace")
        return text.strip(" \t")


class HeaderBlock:
    """The ordered fields of one header block. Changes mark it :attr:`changed`; :meth:`to_bytes` gives the
    block with its terminating empty line."""

    def __init__(self, fields: list[Field], terminated: bool = True) -> None:
        self._fields = fields
        #: False when the message had no empty line (headers only, no body); :meth:`to_bytes` adds one.
        self.terminated = terminated
        self.changed = False

    @classmethod
    def parse(cls, block: bytes, terminated: bool = True) -> HeaderBlock:
        """Fields of ``block`` (CRLF lines, without the empty line). A line that is neither a field nor a
        continuation raises :class:`HeaderError`."""
        fields: list[Field] = []
        lines = block.split(b"\r\n")
        if lines and lines[-1] == b"":
            lines.pop()
        for number, line in enumerate(lines, 1):
            if line[:1] in (b" ", b"\t"):
                if not fields:
                    raise HeaderError("the header block starts with a continuation line")
                fields[-1].raw += line + b"\r\n"
                continue
            name, colon, _ = line.partition(b":")
            name = name.rstrip(b" \t")
            if not colon or not _FIELD_NAME.match(name):
                raise HeaderError(f"header line {number} is not a header field")
            fields.append(Field(name.decode("ascii"), line + b"\r\n"))
        return cls(fields, terminated)

    def __iter__(self) -> Iterator[Field]:
        return iter(list(self._fields))

    def __len__(self) -> int:
        return len(self._fields)

    def names(self) -> list[str]:
        return [f.name for f in self._fields]

    def get_all(self, name: str) -> list[str]:
        wanted = name.lower()
        return [f.value for f in self._fields if f.name.lower() == wanted]

    def get(self, name: str) -> str | None:
        values = self.get_all(name)
        return values[0] if values else None

    def add(self, name: str, value: str, *, top: bool = False) -> None:
        """Add a field at the bottom (``top``: above every other field, where trace fields go)."""
        field = Field(name, encode_field(name, value))
        if top:
            self._fields.insert(0, field)
        else:
            self._fields.append(field)
        self.changed = True

    def add_raw(self, field: bytes, *, top: bool = True) -> None:
        """Add a field already encoded by its maker (``DKIM-Signature:`` from the signer): ``Name: value``,
        folded with CRLF and ending in CRLF. Checked: one field, no bare CR/LF or NUL."""
        name, colon, _ = field.partition(b":")
        body = field[:-2]
        if (
            not colon
            or not _FIELD_NAME.match(name)
            or not field.endswith(b"\r\n")
            or b"\x00" in field
            or any(line[:1] not in (b" ", b"\t") for line in body.split(b"\r\n")[1:])
            or b"\r" in body.replace(b"\r\n", b"")
            or b"\n" in body.replace(b"\r\n", b"")
        ):
            raise HeaderError("not one well-formed header field")
        entry = Field(name.decode("ascii"), field)
        if top:
            self._fields.insert(0, entry)
        else:
            self._fields.append(entry)
        self.changed = True

    def remove(self, name: str) -> int:
        """Remove every field called ``name`` (any case); the number removed."""
        wanted = name.lower()
        kept = [f for f in self._fields if f.name.lower() != wanted]
        removed = len(self._fields) - len(kept)
        if removed:
            self._fields = kept
            self.changed = True
        return removed

    def remove_if(self, name: str, predicate: Callable[[str], bool]) -> int:
        """Remove the fields called ``name`` (any case) whose unfolded value ``predicate`` holds for; the
        number removed."""
        wanted = name.lower()
        kept = [f for f in self._fields if f.name.lower() != wanted or not predicate(f.value)]
        removed = len(self._fields) - len(kept)
        if removed:
            self._fields = kept
            self.changed = True
        return removed

    def set(self, name: str, value: str) -> None:
        """Replace the first field called ``name`` in place (removing the others), or add it at the bottom."""
        wanted = name.lower()
        for index, field in enumerate(self._fields):
            if field.name.lower() == wanted:
                self._fields[index] = Field(field.name, encode_field(field.name, value))
                self._fields = [
                    f for i, f in enumerate(self._fields) if i <= index or f.name.lower() != wanted
                ]
                self.changed = True
                return
        self.add(name, value)

    def replace_values(self, name: str, change: object) -> int:
        """Rewrite each field called ``name`` with ``change(value) -> str`` (a callable); fields whose value
        does not change keep their bytes. The number changed."""
        assert callable(change)
        wanted = name.lower()
        count = 0
        for index, field in enumerate(self._fields):
            if field.name.lower() != wanted:
                continue
            new = change(field.value)
            if new != field.value:
                self._fields[index] = Field(field.name, encode_field(field.name, new))
                count += 1
        if count:
            self.changed = True
        return count

    def to_bytes(self) -> bytes:
        return b"".join(f.raw for f in self._fields) + b"\r\n"


def read_header_block(stream: BinaryIO, limit: int) -> tuple[HeaderBlock, int]:
    """Read the header block at the start of ``stream`` (positioned at 0): the parsed block and the offset
    where the body starts (just past the empty line; the stream's end when there is none). Reads at most
    ``limit`` bytes of header plus one chunk; past the limit :class:`HeaderTooLarge`. The stream's position
    afterwards is unspecified."""
    buffer = b""
    while True:
        end = buffer.find(b"\r\n\r\n")
        if buffer.startswith(b"\r\n"):
            return HeaderBlock([], True), 2
        if end >= 0:
            if end + 2 > limit:
                raise HeaderTooLarge(f"header block over {limit} bytes")
            return HeaderBlock.parse(buffer[: end + 2]), end + 4
        if len(buffer) > limit + 2:
            # No empty line within limit + 2 bytes: the block (which ends before the empty line's CRLF) is
            # over the limit. Not ``> limit``: the answer must not depend on how the stream cuts its reads.
            raise HeaderTooLarge(f"header block over {limit} bytes")
        chunk = stream.read(16 * 1024)
        if not chunk:
            if len(buffer) > limit:
                raise HeaderTooLarge(f"header block over {limit} bytes")
            # Headers only: the message has no empty line and no body.
            block = buffer if buffer.endswith(b"\r\n") or not buffer else buffer + b"\r\n"
            return HeaderBlock.parse(block, terminated=False), len(buffer)
        buffer += chunk
