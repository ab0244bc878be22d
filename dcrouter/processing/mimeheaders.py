"""Header fields as MIME reads them: field lines, RFC 2047 encoded-words, structured values with RFC 2231
parameters, and the Content-* fields of a header block.

Nothing here raises on hostile input: what does not parse is kept as written or reported as a defect. The MIME
walker (:mod:`dcrouter.processing.mimewalk`), which the inspector and the rewriter share, reads a part's
Content-* fields with :func:`read_content_fields`.
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from dcrouter.processing.decoding import IDENTITY_ENCODINGS, decode_charset

#: The start of a header field line: its name, and any white space before the colon (a defect).
FIELD_START = re.compile(rb"([!-9;-~]+)([ \t]*):")
#: A valid ``type/subtype``.
MEDIA_TYPE = re.compile(r"[!#-'*+.0-9A-Z^-~-]+/[!#-'*+.0-9A-Z^-~-]+")

_ENCODED_WORD = re.compile(r"=\?([^?\s*]{1,64})(?:\*[^?\s]{0,32})?\?([bBqQ])\?([^?\s]{0,4096})\?=")
_BASE64_TEXT = re.compile(r"[A-Za-z0-9+/]*={0,2}")


def text_of(raw: bytes) -> str:
    """Header bytes as text for callers: invalid UTF-8 and NUL become U+FFFD."""
    return raw.decode("utf-8", "replace").replace("\x00", "\ufffd")


def exact_text(raw: bytes) -> str:
    """Header bytes as text that encodes back to the same bytes (a boundary must match byte for byte)."""
    return raw.decode("utf-8", "surrogateescape")


def clean_text(text: str) -> str:
    """Text from :func:`exact_text` (or decoded from it) as :func:`text_of` shows it."""
    return text_of(text.encode("utf-8", "surrogateescape"))


def decode_encoded_words(value: str) -> str:
    """RFC 2047: encoded-words decoded, whitespace between adjacent ones dropped, the rest left as it is."""
    out: list[str] = []
    pending = bytearray()
    pending_charset: str | None = None
    last = 0

    def flush() -> None:
        nonlocal pending_charset
        if pending_charset is not None:
            out.append(decode_charset(bytes(pending), pending_charset))
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
            # Bytes, not str: a raw non-ASCII byte (surrogate-escaped here) is not encodable as UTF-8 text.
            data += unquote_to_bytes(text.encode("utf-8", "surrogateescape"))
        else:
            data += text.encode("utf-8", "surrogateescape")
        number += 1
    if len(data) > _MAX_PARAM_CHARS:
        defects.append(f"parameter {base[:40]!r} longer than {_MAX_PARAM_CHARS} bytes, truncated")
        del data[_MAX_PARAM_CHARS:]
    elif len(parts) != number:
        defects.append(f"parameter {base[:40]!r} has a gap in its continuations")
    return decode_charset(bytes(data), charset)


@dataclass(frozen=True)
class ContentFields:
    """A header block's Content-Type, Content-Transfer-Encoding and Content-Disposition, read for its part."""

    kind: str  # lower-case type/subtype; the block's default when absent, text/plain when invalid
    params: dict[str, list[str]]  # of the Content-Type, as :func:`parse_structured` gives them
    transfer_encoding: str  # lower-case; 7bit when absent
    disposition: str | None  # lower-case; None when absent
    names: tuple[str, ...]  # every distinct filename (Content-Disposition) and name (Content-Type), decoded
    #: The fields given more than once with different values ("Content-Type", "Content-Transfer-Encoding"):
    #: readers may pick either, so what the part is cannot be told. The first of each is read.
    conflicts: tuple[str, ...]
    defects: tuple[str, ...]  # what else is odd, each starting with the field it is about


def read_content_fields(values: Callable[[bytes], list[bytes]], default_type: str) -> ContentFields:
    """Read the Content-* fields of a header block. ``values`` gives the unfolded value bytes of every field
    of a lower-case name, in order; ``default_type`` is the block's type when it declares none (RFC 2046)."""
    types = [exact_text(v) for v in values(b"content-type")]
    encodings = [text_of(v).strip().lower() for v in values(b"content-transfer-encoding")]
    dispositions = [exact_text(v) for v in values(b"content-disposition")]
    conflicts: list[str] = []
    if len(set(types)) > 1:
        conflicts.append("Content-Type")
    if len(set(encodings)) > 1:
        conflicts.append("Content-Transfer-Encoding")
    found: list[str] = []
    kind, params = default_type, dict[str, list[str]]()
    if types:
        kind, params, defects = parse_structured(types[0])
        found += (f"Content-Type {defect}" for defect in defects)
        if not MEDIA_TYPE.fullmatch(kind):
            found.append(f"invalid Content-Type {kind[:60]!r}")
            kind, params = "text/plain", {}
    cte = encodings[0] if encodings else "7bit"
    if cte not in IDENTITY_ENCODINGS and cte not in ("base64", "quoted-printable"):
        found.append(f"unknown Content-Transfer-Encoding {cte[:40]!r}, read as is")
    disposition = None
    names: list[str] = []
    if dispositions:
        disposition, disposition_params, defects = parse_structured(dispositions[0])
        found += (f"Content-Disposition {defect}" for defect in defects)
        names += disposition_params.get("filename", [])
    names += params.get("name", [])
    decoded = tuple(dict.fromkeys(clean_text(decode_encoded_words(name)) for name in names if name))
    return ContentFields(kind, params, cte, disposition or None, decoded, tuple(conflicts), tuple(found))
