"""``smtpConfig.redisUrl``: where the Redis queue lives. Pure parsing, no I/O and no txredisapi import, so the
configuration checks can use it.

Accepted forms (what a caller may rely on; anything else is a ValueError naming the problem):

- ``redis://[[user]:password@]host[:port][/db]`` -- TCP; port 6379 and database 0 by default; ``host`` may be
  a name, an IPv4 address or a bracketed IPv6 address; user and password may be percent-encoded.
- ``unix:///path/to/redis.sock[?db=N]`` -- a Unix socket (absolute path); ``unix://:password@/path`` also
  works.
- ``redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/master-name[/db][?wait=N]`` -- Redis
  Sentinel: the sentinels (port 26379 by default) are asked for the current master of ``master-name``, again
  after every lost connection (a failover). The password is the master's (the sentinels are asked without
  one). ``wait`` (default 1) is how many replicas must have an enqueue before it counts as stored (Redis's
  ``WAIT``), so that a failover never loses an acknowledged message; 0 turns that off.

TLS (``rediss://``) is refused: txredisapi's TLS support does not check the server's name, and a queue that
carries mail should not pretend otherwise. Use a Unix socket, a private network or a TLS tunnel.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit


@dataclass(frozen=True)
class RedisAddress:
    """A parsed redisUrl. Exactly one of ``host`` (with ``port``), ``unix_path`` or ``sentinels`` (with
    ``master_name``) is set."""

    host: str | None = None
    port: int = 6379
    unix_path: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = None
    #: With Sentinel (then ``host`` is None): the sentinels' addresses, the master's name, and how many
    #: replicas an enqueue waits for.
    sentinels: tuple[tuple[str, int], ...] = ()
    master_name: str | None = None
    wait_replicas: int = 0

    @property
    def display(self) -> str:
        """The address for logs: never the password."""
        if self.sentinels:
            hosts = ",".join(f"{_bracketed(h)}:{p}" for h, p in self.sentinels)
            return f"redis+sentinel://{hosts}/{self.master_name} db {self.db}"
        where = f"unix://{self.unix_path}" if self.unix_path else f"redis://{self._host_text()}:{self.port}"
        return f"{where} db {self.db}"

    def _host_text(self) -> str:
        assert self.host is not None
        return _bracketed(self.host)


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def parse_redis_url(url: str) -> RedisAddress:
    """Parse ``url`` (see the module docstring); raises ValueError with a message fit for the operator."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError("empty Redis URL")
    if url.strip().startswith("redis+sentinel://"):
        return _sentinel_address(url.strip())
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as e:
        raise ValueError(f"not a valid URL: {e}") from None
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    if parts.scheme == "rediss":
        raise ValueError("rediss:// (TLS) is not supported; use redis:// on a private network or unix://")
    if parts.scheme == "redis":
        if not parts.hostname:
            raise ValueError("redis:// URL without a host (expected redis://[:password@]host:port/db)")
        if parts.query or parts.fragment:
            raise ValueError("redis:// URL with a query or fragment; the database goes in the path: /0")
        return RedisAddress(
            host=parts.hostname,
            port=port if port is not None else 6379,
            db=_db_number(parts.path.lstrip("/") or "0"),
            username=username,
            password=password,
        )
    if parts.scheme == "unix":
        path = parts.path
        if not path.startswith("/") or path == "/":
            raise ValueError("unix:// URL needs an absolute socket path: unix:///run/redis/redis.sock")
        if parts.hostname or port is not None:
            raise ValueError("unix:// URL with a host; write unix:///path (three slashes)")
        query = parse_qs(parts.query, strict_parsing=False) if parts.query else {}
        unknown = set(query) - {"db"}
        if unknown:
            raise ValueError(f"unix:// URL with unknown parameters: {', '.join(sorted(unknown))}")
        return RedisAddress(
            unix_path=path,
            db=_db_number(query.get("db", ["0"])[-1]),
            username=username,
            password=password,
        )
    raise ValueError(
        f"unsupported scheme {parts.scheme!r}: use redis://host:port/db, unix:///path or "
        "redis+sentinel://host:port,host:port/master-name/db"
    )


def _sentinel_address(url: str) -> RedisAddress:
    rest = url[len("redis+sentinel://") :]
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) if user else None
        password = unquote(secret) if colon else None
    sentinels = []
    for entry in hosts.split(","):
        try:
            parts = urlsplit(f"//{entry}")
            host, port = parts.hostname, parts.port
        except ValueError as e:
            raise ValueError(f"not a valid sentinel address {entry!r}: {e}") from None
        if not host:
            raise ValueError(f"sentinel address without a host: {entry!r}")
        sentinels.append((host, port if port is not None else 26379))
    segments = path.split("/") if path else []
    if not segments or not segments[0] or len(segments) > 2:
        raise ValueError(
            "redis+sentinel:// URL needs the master's name: redis+sentinel://host:port/mymaster/0"
        )
    params = parse_qs(query, strict_parsing=False) if query else {}
    unknown = set(params) - {"wait"}
    if unknown:
        raise ValueError(f"redis+sentinel:// URL with unknown parameters: {', '.join(sorted(unknown))}")
    wait = params.get("wait", ["1"])[-1]
    if not wait.isdigit() or int(wait) > 100:
        raise ValueError(f"wait must be a number of replicas (0-100): {wait!r}")
    return RedisAddress(
        host=None,
        port=0,
        db=_db_number(segments[1] if len(segments) == 2 and segments[1] else "0"),
        username=username,
        password=password,
        sentinels=tuple(sentinels),
        master_name=unquote(segments[0]),
        wait_replicas=int(wait),
    )


def _db_number(text: str) -> int:
    if not text.isdigit() or len(text) > 5:
        raise ValueError(f"database must be a number: {text!r}")
    return int(text)
