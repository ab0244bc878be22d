"""WebSockets over HTTP/2 (RFC 8441): an extended CONNECT stream as an HTTP/1.1 WebSocket upgrade.

A server that sends ``SETTINGS_ENABLE_CONNECT_PROTOCOL = 1`` lets a client open a stream with ``:method
CONNECT`` and ``:protocol websocket`` (with ``:scheme``, ``:path``, ``:authority``,
``sec-websocket-version: 13`` and its own subprotocol and extension offers). The backend, which speaks
HTTP/1.1, gets the opening handshake of RFC 6455 §4.1 for it: ``GET`` of the path, ``Upgrade: websocket``,
``Connection: Upgrade``, a fresh random ``Sec-WebSocket-Key`` (RFC 8441 §5: the HTTP/2 client sends none),
``Sec-WebSocket-Version: 13`` and the client's ``sec-websocket-protocol``/``-extensions``. Only the backend's
``101`` with the ``Sec-WebSocket-Accept`` that key asks for opens the stream (``:status 200``, with the
backend's choice of subprotocol and extensions); from then on the stream's DATA frames carry the WebSocket
bytes both ways.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

from dcrouter.proxy.httpmessage import HOP_BY_HOP, HttpError, ResponseHead

#: The pseudo-header field of an extended CONNECT (RFC 8441 §4).
PROTOCOL = b":protocol"
#: The one protocol offered by extended CONNECT.
WEBSOCKET = b"websocket"
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#: Fields of the HTTP/1.1 handshake that are the proxy's to set, whatever the HTTP/2 client sent.
_HANDSHAKE = frozenset({b"sec-websocket-key", b"sec-websocket-version"})
#: Fields of the backend's 101 that describe the HTTP/1.1 handshake only.
_NOT_RELAYED = HOP_BY_HOP | {b"sec-websocket-accept", b"content-length", b"transfer-encoding"}


def new_key() -> bytes:
    """A ``Sec-WebSocket-Key``: 16 random bytes, base64 (RFC 6455 §4.1)."""
    return base64.b64encode(os.urandom(16))


def accept_for(key: bytes) -> bytes:
    """The ``Sec-WebSocket-Accept`` a server answers ``key`` with (RFC 6455 §4.2.2)."""
    return base64.b64encode(hashlib.sha1(key + _GUID).digest())


def handshake_fields(fields: list[tuple[bytes, bytes]]) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The regular fields of an extended CONNECT (lower-case names, checked already) as those of the HTTP/1.1
    opening handshake, and the key it carries. HttpError ``400`` for a ``sec-websocket-version`` other than
    13, the only version RFC 6455 defines (a missing one is taken as 13)."""
    for name, value in fields:
        if name == b"sec-websocket-version" and value != b"13":
            raise HttpError(400, "sec-websocket-version other than 13")
    key = new_key()
    kept = [(name, value) for name, value in fields if name not in _HANDSHAKE]
    kept += [
        (b"Upgrade", WEBSOCKET),
        # "close": if the backend answers anything but the upgrade, that answer ends the exchange (as every
        # translated stream's does), so nothing the client sent for the WebSocket is read as a request.
        (b"Connection", b"Upgrade, close"),
        (b"Sec-WebSocket-Key", key),
        (b"Sec-WebSocket-Version", b"13"),
    ]
    return kept, key


def opened_fields(head: ResponseHead, key: bytes) -> list[tuple[bytes, bytes]]:
    """The header list of the stream's ``200`` for the backend's answer to the handshake with ``key``: its
    fields (subprotocol, extensions, cookies...) less those of the HTTP/1.1 handshake. HttpError ``502``
    unless it is a ``101`` switching to ``websocket`` with the right ``Sec-WebSocket-Accept``."""
    if head.status != 101:
        raise HttpError(502, f"the backend answered {head.status} to the WebSocket handshake, not 101")
    if WEBSOCKET not in head.fields.tokens(b"upgrade"):
        raise HttpError(502, "the backend's 101 does not switch to websocket")
    accept = head.fields.get_all(b"sec-websocket-accept")
    if len(accept) != 1 or not hmac.compare_digest(accept[0].strip(), accept_for(key)):
        raise HttpError(502, "the backend's 101 has no Sec-WebSocket-Accept matching the key sent")
    named = head.fields.tokens(b"connection")
    out = [(b":status", b"200")]
    for name, value in head.fields.lines:
        lower = name.lower()
        if lower not in _NOT_RELAYED and lower not in named:
            out.append((lower, value))
    return out
