"""The management API's HTTP machinery on twisted.web: endpoints, JSON in and out, errors, body limits.

An :class:`Endpoint` is one method on one path (``/api/v1/queue/{id}``) with its handler, the scope it needs,
the query parameters and JSON body fields it accepts, and its documentation; the same table drives dispatch
(:mod:`dcrouter.api.root`) and the OpenAPI document (:mod:`dcrouter.api.openapi`), so neither can forget an
endpoint the other knows.

Errors are :class:`ApiError` values rendered as ``{"error": {"code": "...", "message": "..."}}`` with their
HTTP status; ``code`` is stable (scripts match on it), ``message`` is for people.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO
from urllib.parse import parse_qs

from twisted.web.server import Request

from dcrouter.config.api import ApiToken

#: Largest request body read (413 beyond).
MAX_BODY = 1 << 20

JSON_TYPE = "application/json"


class ApiError(Exception):
    """An answer other than success: HTTP ``status``, a stable ``code`` and a human ``message``."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: Mapping[str, str] | None = None,
        *,
        errors: list[str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})
        #: Every problem found (a configuration check's errors, each starting with its key path).
        self.errors = errors

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.errors is not None:
            error["errors"] = list(self.errors)
        return {"error": error}


class ApiRequest(Request):
    """A twisted.web Request that keeps at most MAX_BODY bytes of the body: beyond, the rest is read and
    dropped (the connection stays usable) and :attr:`too_large` is set, which the API answers with 413."""

    too_large = False
    _received = 0

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > MAX_BODY:
            self.too_large = True
            length = None  # never let Twisted size a buffer by the client's word
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        self._received += len(data)
        if self._received > MAX_BODY:
            self.too_large = True
        if not self.too_large:
            super().handleContentChunk(data)


@dataclass
class Call:
    """One request as a handler sees it: path parameters, query, JSON body, and the caller's token."""

    request: Request
    params: dict[str, str]
    query: dict[str, str]
    body: dict[str, Any]
    token: ApiToken | None


@dataclass(frozen=True)
class Stream:
    """A handler's answer that is a file, sent in chunks with flow control (never read whole), then
    closed."""

    file: BinaryIO
    content_type: str


#: A handler returns the JSON body (status 200), ``(status, body)``, or a Stream.
Handler = Callable[[Call], Awaitable[Any]]


@dataclass(frozen=True)
class Field:
    """A query parameter or JSON body field: its JSON type and meaning (documented in OpenAPI)."""

    name: str
    type: str  # "string" | "integer" | "boolean" | "array" (of objects) | "object"
    doc: str
    required: bool = False
    enum: tuple[str, ...] = ()
    #: JSON null is accepted too (a body field only).
    nullable: bool = False


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    handler: Handler
    scope: str  # "public" | "read" | "admin"
    summary: str
    query: tuple[Field, ...] = ()
    body: tuple[Field, ...] | None = None  # None: no body accepted
    responses: Mapping[int, str] = field(default_factory=dict)
    produces: str = JSON_TYPE
    pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        regex = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(self.path))
        object.__setattr__(self, "pattern", re.compile(regex + r"\Z"))

    def match(self, path: str) -> dict[str, str] | None:
        found = self.pattern.match(path)
        return None if found is None else found.groupdict()


def parse_query(request: Request, endpoint: Endpoint) -> dict[str, str]:
    """The query parameters, one value each; unknown or repeated names are a 400 naming them. Read from the
    URI itself: twisted.web's ``request.args`` also holds the fields of a form body."""
    query_string = request.uri.partition(b"?")[2].decode("latin-1")
    try:
        args = parse_qs(query_string, keep_blank_values=True, encoding="utf-8", errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise ApiError(400, "bad_parameter", "the query string is not UTF-8 once %-decoded") from None
    known = {f.name: f for f in endpoint.query}
    unknown = sorted(name for name in args if name not in known)
    if unknown:
        shown = ", ".join(repr(n) if not n.isprintable() else n for n in unknown)
        raise ApiError(400, "unknown_parameter", f"unknown query parameters: {shown}")
    query: dict[str, str] = {}
    for name, values in args.items():
        if len(values) != 1:
            raise ApiError(400, "bad_parameter", f"{name}: given {len(values)} times")
        check_value(known[name], values[0], where=name)
        query[name] = values[0]
    return query


def check_value(spec: Field, value: Any, *, where: str) -> None:
    if value is None and spec.nullable:
        return
    if spec.type == "array":
        if not isinstance(value, list):
            raise ApiError(400, "bad_field", f"{where}: expected an array, got {value!r}")
        return
    if spec.type == "object":
        if not isinstance(value, dict):
            raise ApiError(400, "bad_field", f"{where}: expected an object, got {value!r}")
        return
    if spec.type == "integer":
        ok = isinstance(value, int) and not isinstance(value, bool)
        if isinstance(value, str):
            ok = value.isascii() and value.isdigit() and len(value) <= 9
        if not ok:
            raise ApiError(400, "bad_parameter", f"{where}: expected an integer, got {value!r}")
    elif spec.type == "boolean":
        if not isinstance(value, bool):
            raise ApiError(400, "bad_field", f"{where}: expected true or false, got {value!r}")
    elif not isinstance(value, str):
        raise ApiError(400, "bad_field", f"{where}: expected a string, got {value!r}")
    if spec.enum and value not in spec.enum:
        raise ApiError(
            400, "bad_parameter", f"{where}: expected one of {', '.join(spec.enum)}, got {value!r}"
        )


def parse_body(request: Request, endpoint: Endpoint, raw: bytes) -> dict[str, Any]:
    """The JSON object body: 415 unless ``application/json``; 400 for bad JSON, unknown fields (named),
    missing required ones or wrong types."""
    if endpoint.body is None:
        if raw.strip():
            raise ApiError(400, "unexpected_body", f"{endpoint.method} {endpoint.path} takes no body")
        return {}
    if not raw.strip():
        data: Any = {}
    else:
        content_type = (request.getHeader("content-type") or "").split(";")[0].strip().lower()
        if content_type != JSON_TYPE:
            raise ApiError(415, "unsupported_media_type", f"the body must be {JSON_TYPE}")
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, "bad_json", f"the body is not JSON: {e}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "bad_json", "the body must be a JSON object")
    known = {f.name: f for f in endpoint.body}
    unknown = sorted(k for k in data if k not in known)
    if unknown:
        raise ApiError(400, "unknown_field", f"unknown fields: {', '.join(unknown)}")
    for spec in endpoint.body:
        if spec.name in data:
            check_value(spec, data[spec.name], where=spec.name)
        elif spec.required:
            raise ApiError(400, "missing_field", f"{spec.name}: required")
    return data


def json_bytes(data: Any) -> bytes:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"
