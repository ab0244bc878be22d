"""HTTP answered by the proxy itself: the ``redirect``, ``static`` and ``block`` (with a status) actions.

:class:`HttpAnswerer` reads one request head (strictly, as the forwarder does: :mod:`httpmessage`), answers
it and closes the connection; it serves plain HTTP as well as the inside of a terminated TLS connection.
Keep-alive is not offered (every answer carries ``Connection: close``): these answers are redirects, error
statuses and small sites, where a new connection per request costs little.

Files under ``static.root`` are found by :func:`static_file`: the path is percent-decoded once, and a
``..`` or ``.`` segment, a NUL or a backslash is refused (``400``); the file's real path (symbolic links
resolved) must lie inside the root's real path, else ``404``. Files are opened and streamed on the reactor
thread with :class:`~twisted.protocols.basic.FileSender` in 16 KiB chunks, as ``twisted.web.static`` does.
"""

from __future__ import annotations

import mimetypes
import os
import re
import stat
from collections.abc import Callable
from email.utils import formatdate, parsedate_to_datetime
from typing import IO, Any
from urllib.parse import unquote_to_bytes

from twisted.internet.interfaces import IDelayedCall, IHalfCloseableProtocol, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.protocols.basic import FileSender
from twisted.python.failure import Failure
from zope.interface import implementer

from dcrouter.log import logger
from dcrouter.proxy.forward import RouteCounters
from dcrouter.proxy.gate import RequestGate
from dcrouter.proxy.http import DEFAULT_IDLE_TIMEOUT, host_address, host_name
from dcrouter.proxy.httpmessage import HeadBuffer, HttpError, RequestHead, parse_request_head, simple_response
from dcrouter.proxy.routes import RouteAction, StaticContent

log = logger(__name__)

_PLACEHOLDER = re.compile(r"\{(domain|path|query|port)\}")
_REASONS = {
    200: "OK",
    201: "Created",
    202: "Accepted",
    204: "No Content",
    301: "Moved Permanently",
    302: "Found",
    303: "See Other",
    304: "Not Modified",
    307: "Temporary Redirect",
    308: "Permanent Redirect",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    410: "Gone",
    421: "Misdirected Request",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    451: "Unavailable For Legal Reasons",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}
#: Text types are labelled UTF-8 (the usual encoding of files written today); guessing would cost a read.
_TEXT = ("text/", "application/javascript", "application/json", "image/svg+xml")


def reason(status: int) -> str:
    return _REASONS.get(status, "Error" if status >= 400 else "OK")


def split_target(target: bytes) -> tuple[bytes, bytes]:
    """The path and query (without ``?``) of an origin-form request target; absolute form is reduced to
    its path. ``/`` when there is no path."""
    if not target.startswith(b"/"):
        match = re.match(rb"https?://[^/?#]*(.*)\Z", target, re.IGNORECASE | re.DOTALL)
        if match is None:
            raise HttpError(400, f"request target {target[:60]!r} has no path")
        target = match.group(1) or b"/"
        if not target.startswith(b"/"):
            target = b"/" + target
    path, _, query = target.partition(b"?")
    return path.partition(b"#")[0], query


def redirect_location(template: str, *, domain: str, path: bytes, query: bytes, port: int) -> bytes:
    """``template`` with its placeholders filled: ``{query}`` is ``?`` and the query, or nothing."""
    values = {
        "domain": domain,
        "path": path.decode("ascii", "replace"),
        "query": "?" + query.decode("ascii", "replace") if query else "",
        "port": str(port),
    }
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template).encode("ascii", "replace")


def static_file(root: str, path: bytes, index: tuple[str, ...]) -> str:
    """The file under ``root`` that the request path ``path`` (still percent-encoded) names; a directory's
    first existing ``index`` file. HttpError 400 for a path that tries to leave the root, 404 when nothing
    regular is there (or the file lies outside the root through a symbolic link)."""
    decoded = unquote_to_bytes(path)
    if b"\x00" in decoded or b"\\" in decoded:
        raise HttpError(400, "NUL or backslash in the path")
    try:
        text = decoded.decode("utf-8")
    except UnicodeDecodeError as error:
        raise HttpError(400, "the path is not UTF-8") from error
    parts = [p for p in text.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise HttpError(400, "dot segments in the path")
    real_root = os.path.realpath(root)
    candidate = os.path.realpath(os.path.join(real_root, *parts))
    if not _inside(real_root, candidate):
        raise HttpError(404, "outside the root")
    if os.path.isdir(candidate):
        for name in index:
            found = os.path.realpath(os.path.join(candidate, name))
            if _inside(real_root, found) and os.path.isfile(found):
                return found
        raise HttpError(404, "a directory without an index file")
    if not os.path.isfile(candidate):
        raise HttpError(404, "no such file")
    return candidate


def _inside(root: str, path: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def content_type(path: str) -> str:
    guessed, encoding = mimetypes.guess_type(path, strict=False)
    if guessed is None or encoding is not None:
        return "application/octet-stream"  # a .gz served as its content type would be decoded by browsers
    return guessed + "; charset=utf-8" if guessed.startswith(_TEXT) else guessed


def _not_modified(head: RequestHead, mtime: float) -> bool:
    since = head.fields.get(b"if-modified-since")
    if since is None:
        return False
    try:
        when = parsedate_to_datetime(since.decode("ascii"))
    except (ValueError, TypeError, UnicodeDecodeError):
        return False
    return int(mtime) <= when.timestamp()


@implementer(IHalfCloseableProtocol)
class HttpAnswerer(Protocol):
    """Answers one HTTP request by ``action`` (redirect, static, block with a status) and closes.

    ``port`` is the port the client connected to (``{port}``); ``server_name`` the name from SNI or the
    peeked Host, used for ``{domain}`` when the request has no Host; ``host_allowed``, if given, decides
    whether a request's Host may be served here (else ``421``). The connection is aborted ``timeout``
    seconds after it began, answered or not."""

    transport: Any

    def __init__(
        self,
        action: RouteAction,
        *,
        counters: RouteCounters,
        clock: IReactorTime,
        client_ip: str = "",
        port: int = 0,
        server_name: str | None = None,
        host_allowed: Callable[[str], bool] | None = None,
        timeout: float = DEFAULT_IDLE_TIMEOUT,
        gate: RequestGate | None = None,
        extra: tuple[bytes, ...] = (),
    ) -> None:
        self.action = action
        self.gate = gate
        self.extra = extra
        self.counters = counters
        self.client_ip = client_ip
        self.port = port
        self.server_name = server_name
        self.host_allowed = host_allowed
        self._clock = clock
        self._timeout = timeout
        self._deadline: IDelayedCall | None = None
        self._head = HeadBuffer()
        self._file: IO[bytes] | None = None
        self._lost = False
        #: The status answered, once it was.
        self.answered: int | None = None

    def connectionMade(self) -> None:
        self._deadline = self._clock.callLater(self._timeout, self._overdue)

    def _overdue(self) -> None:
        self._deadline = None
        log.info(
            "proxy: {client}: HTTP not done within {t:g}s; aborted", client=self.client_ip, t=self._timeout
        )
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = True
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        self._close_file()

    def readConnectionLost(self) -> None:
        if self.answered is None:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        """Never sent: the answer closes the whole connection."""

    def dataReceived(self, data: bytes) -> None:
        self.counters.bytes_in += len(data)
        if self.answered is not None:
            return
        try:
            complete = self._head.feed(data)
            if complete is None:
                return
            head = parse_request_head(complete[0])
        except HttpError as error:
            self._error(error)
            return
        if self.gate is None:
            self._respond(head)
            return
        self.answered = 0  # nothing more is read: the answer is being decided
        checking = self.gate.check(head, self.client_ip)
        checking.addCallbacks(lambda _: self._respond(head), self._unauthorized)

    def _unauthorized(self, failure: Failure) -> None:
        if self._lost:
            return
        error = failure.value
        if not isinstance(error, HttpError):
            log.failure("proxy: {client}: checking credentials failed", failure, client=self.client_ip)
            error = HttpError(500, "checking credentials failed")
        self._error(error)

    def _respond(self, head: RequestHead) -> None:
        if self._lost:
            return
        try:
            self._answer(head)
        except HttpError as error:
            self._error(error, head)

    def _error(self, error: HttpError, head: RequestHead | None = None) -> None:
        if error.status >= 500 or error.status in (400, 401, 405, 421, 431):
            log.info(
                "proxy: {client}: HTTP {s} ({why})", client=self.client_ip, s=error.status, why=error.reason
            )
        extra = getattr(error, "extra", ())
        self._send(error.status, body=reason(error.status).encode() + b"\n", extra=extra, head=head)

    # -- answers ----------------------------------------------------------------------------------------

    def _answer(self, head: RequestHead) -> None:
        host_field = head.fields.get(b"host")
        if host_field is None:
            domain = self.server_name or ""
        else:
            address = host_address(host_field)
            if address is not None:
                # An address names no route; it is served where no name was asked for (plain HTTP, or
                # TLS without SNI), as curl http://127.0.0.1:8080/ expects.
                if self.server_name is not None:
                    raise HttpError(421, f"Host {address} is not served on this connection")
                domain = address
            else:
                try:
                    domain = host_name(host_field)
                except ValueError as error:
                    raise HttpError(400, str(error)) from error
                if self.host_allowed is not None and not self.host_allowed(domain):
                    raise HttpError(421, f"Host {domain} is not served on this connection")
        action = self.action
        path, query = split_target(head.target)
        if action.type == "redirect":
            assert action.redirect is not None
            location = redirect_location(
                action.redirect.to, domain=domain, path=path, query=query, port=self.port
            )
            self._send(action.redirect.status, extra=(b"Location: " + location,), head=head)
        elif action.type == "static":
            assert action.static is not None
            self._static(head, action.static, path)
        else:  # block with a status
            assert action.status is not None
            self._send(action.status, body=reason(action.status).encode() + b"\n", head=head)

    def _static(self, head: RequestHead, static: StaticContent, path: bytes) -> None:
        if head.method not in (b"GET", b"HEAD"):
            self._send(405, body=b"Method Not Allowed\n", extra=(b"Allow: GET, HEAD",), head=head)
            return
        if static.content is not None:
            self._send(
                static.status, body=static.content, content_type=static.content_type.encode(), head=head
            )
            return
        assert static.root is not None
        name = static_file(static.root, path, static.index)
        try:
            handle = open(name, "rb")  # noqa: SIM115 -- closed when the transfer ends (_close_file)
            info = os.fstat(handle.fileno())
        except OSError as error:
            raise HttpError(404, f"cannot open: {error.strerror}") from error
        if not stat.S_ISREG(info.st_mode):
            handle.close()
            raise HttpError(404, "not a regular file")
        modified = b"Last-Modified: " + formatdate(info.st_mtime, usegmt=True).encode()
        if _not_modified(head, info.st_mtime):
            handle.close()
            self._write_head(304, [modified], length=None)
            self._finish()
            return
        self._write_head(
            200, [modified, b"Content-Type: " + content_type(name).encode()], length=info.st_size
        )
        if head.method == b"HEAD" or info.st_size == 0:
            handle.close()
            self._finish()
            return
        self._file = handle
        sending = FileSender().beginFileTransfer(handle, self)
        sending.addCallbacks(lambda _: self._finish(), self._send_failed)

    def write(self, data: bytes) -> None:
        """The consumer FileSender writes to (counts the bytes out)."""
        self.counters.bytes_out += len(data)
        self.transport.write(data)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.transport.unregisterProducer()

    def _send_failed(self, failure: Failure) -> None:
        log.info(
            "proxy: {client}: static file not sent: {why}",
            client=self.client_ip,
            why=failure.getErrorMessage(),
        )
        self._close_file()
        self.transport.abortConnection()

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _write_head(self, status: int, extra: list[bytes], *, length: int | None) -> None:
        self.answered = status
        lines = [b"HTTP/1.1 %d %s" % (status, reason(status).encode("ascii")), *extra, *self.extra]
        if length is not None:
            lines.append(b"Content-Length: %d" % length)
        lines.append(b"Connection: close")
        self.write(b"\r\n".join(lines) + b"\r\n\r\n")

    def _send(
        self,
        status: int,
        *,
        body: bytes = b"",
        extra: tuple[bytes, ...] = (),
        content_type: bytes = b"text/plain; charset=utf-8",
        head: RequestHead | None,
    ) -> None:
        self.answered = status
        response = simple_response(
            status, reason(status), body=body, extra=(*extra, *self.extra), content_type=content_type
        )
        if head is not None and head.method == b"HEAD":
            response = response[: len(response) - len(body)]
        self.write(response)
        self._finish()

    def _finish(self) -> None:
        self._close_file()
        self.transport.loseConnection()
