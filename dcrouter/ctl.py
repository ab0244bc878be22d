"""``dcrouter queue``, ``dcrouter delivery``, ``dcrouter stats`` and ``dcrouter route-test``: a thin client
of the management API (docs/api.md), with output like Postfix's ``mailq`` and ``--json`` for scripts.

Where it connects: ``--url``, else ``DCROUTER_API``, else the ``apiConfig`` of ``--config FILE``
(``http://bindAddress:port``), else ``http://127.0.0.1:8025``. The token: ``DCROUTER_TOKEN``, else the first
line of ``--token-file``. Never from the configuration file, which holds only token hashes, nor from the
command line, where every user of the machine could read it in the process list.

Exit status: 0 done; 1 the API refused (unknown id, wrong status, bad token: its message is printed) or
could not be reached; 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, TextIO

DEFAULT_URL = "http://127.0.0.1:8025"
#: Seconds a request may take.
TIMEOUT = 30.0


class CtlError(Exception):
    """What went wrong, as printed; ``status`` is the exit status."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


class ApiClient:
    """Blocking JSON calls to the management API at ``url`` with bearer ``token``."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url.rstrip("/")
        self.token = token

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode("utf-8")
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Authorization", f"Bearer {self.token}")
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            raise CtlError(_error_text(error)) from None
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise CtlError(f"cannot reach the management API at {self.url}: {reason}") from None


def _error_text(error: urllib.error.HTTPError) -> str:
    try:
        detail = json.loads(error.read())["error"]
        return f"{detail['message']} ({error.code} {detail['code']})"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {error.code} {error.reason}"


def resolve(args: argparse.Namespace, environ: dict[str, str] | None = None) -> ApiClient:
    """The client ``args`` and the environment describe (see the module docstring)."""
    env = os.environ if environ is None else environ
    url = args.url or env.get("DCROUTER_API")
    if not url and args.config:
        from dcrouter.config import ConfigError, load_file

        try:
            api = load_file(args.config).options.api_config
        except ConfigError as error:
            raise CtlError(f"{args.config}: {error}", 2) from None
        host = f"[{api.bind_address}]" if ":" in api.bind_address else api.bind_address
        if host in ("0.0.0.0", "[::]"):
            host = "127.0.0.1"
        url = f"http://{host}:{api.port}"
    url = url or DEFAULT_URL
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise CtlError(f"not an http(s) URL: {url!r}", 2)
    token = env.get("DCROUTER_TOKEN", "")
    if not token and args.token_file:
        try:
            with open(args.token_file, encoding="utf-8") as f:
                token = f.readline().strip()
        except OSError as error:
            raise CtlError(f"cannot read the token file: {error}", 2) from None
    if not token:
        raise CtlError("no token: set DCROUTER_TOKEN or pass --token-file (make one: dcrouter api-token)", 2)
    return ApiClient(url, token)


# -- output ------------------------------------------------------------------------------------------

_MARK = {"held": "!", "delivering": "*"}


def print_queue(items: list[dict[str, Any]], out: TextIO) -> None:
    """``mailq``'s layout: id (``!`` held, ``*`` being delivered), size, arrival, sender; then the last
    error in parentheses and the recipients, indented."""
    out.write(f"{'-Queue ID-':<20} {'--Size--':>8} {'----Arrival Time----':<20} {'-Status-':<11} -Sender-\n")
    for item in items:
        mark = _MARK.get(item["status"], "")
        sender = item["sender"] or "<>"
        out.write(
            f"{item['id'] + mark:<20} {item['size']:>8} {item['createdAt'] or '-':<20} {item['status']:<11} "
            f"{sender}\n"
        )
        indent = " " * 62
        if item.get("lastError"):
            out.write(f"{indent}({_one_line(item['lastError'])})\n")
        for rcpt in item["recipients"]:
            out.write(f"{indent}{rcpt}\n")
        out.write("\n")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def print_item(item: dict[str, Any], out: TextIO) -> None:
    for key in (
        "id",
        "status",
        "size",
        "createdAt",
        "sender",
        "destination",
        "attempts",
        "nextAttemptAt",
        "lastError",
        "bounceId",
    ):
        out.write(f"{key + ':':<15} {item.get(key) if item.get(key) is not None else '-'}\n")
    out.write(f"{'recipients:':<15} {', '.join(item['recipients'])}\n")
    out.write(f"{'pending:':<15} {', '.join(item['pendingRecipients']) or '-'}\n")
    for rcpt, outcome in item.get("outcomes", {}).items():
        out.write(
            f"  {rcpt}: {outcome['outcome']} via {outcome['target'] or '-'}: {_one_line(outcome['reply'])}\n"
        )
    for attempt in item.get("history", []):
        out.write(
            f"attempt {attempt['at']} route {attempt['route']} tried {', '.join(attempt['tried']) or '-'}\n"
        )
        for result in attempt["results"]:
            out.write(
                f"  {result['recipient']}: {result['outcome']} from {result['target'] or '-'}: "
                f"{_one_line(result['reply'] or '')}\n"
            )


def print_stats(stats: dict[str, Any], out: TextIO) -> None:
    out.write(f"dcrouter {stats['version']}, up {stats['uptime']:.0f} s\n")
    counts = ", ".join(f"{n} {status}" for status, n in stats["queue"].items() if n)
    out.write(f"queue:      {counts or 'empty'}\n")
    messages = ", ".join(f"{n} {what}" for what, n in stats["messages"].items())
    out.write(f"since start: {messages}\n")
    out.write(
        f"now:        {stats['smtpSessions']} SMTP sessions, {stats['proxyConnections']} proxy connections, "
        f"{stats['processingInFlight']} in processing, {stats['deliveriesInFlight']} deliveries\n"
    )


# -- commands ----------------------------------------------------------------------------------------


def run(args: argparse.Namespace, out: TextIO, err: TextIO, environ: dict[str, str] | None = None) -> int:
    """Run a ``queue``/``delivery``/``stats`` command; returns the exit status."""
    try:
        client = resolve(args, environ)
        result = _dispatch(client, args)
    except CtlError as error:
        err.write(f"dcrouter {args.command}: {error}\n")
        return error.status
    if args.json:
        out.write(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    else:
        _print(args, result, out)
    return 0


def _route_query(args: argparse.Namespace) -> dict[str, Any]:
    """The body of ``POST /api/v1/routing/test`` from ``route-test``'s options."""
    proxy = args.sni is not None or args.host is not None
    if proxy == (args.recipient is not None):
        raise CtlError("give --recipient (mail) or --sni/--host with --port (proxy)", status=2)
    if proxy:
        if args.port is None:
            raise CtlError("--sni/--host need --port", status=2)
        body: dict[str, Any] = {"port": args.port}
        body.update({k: getattr(args, k) for k in ("sni", "host") if getattr(args, k) is not None})
    else:
        body = {"recipient": args.recipient, "sender": args.sender or "", "authenticated": args.authenticated}
    if args.client_ip:
        body["clientIp"] = args.client_ip
    return body


def print_route_test(result: dict[str, Any], out: TextIO) -> None:
    if result["kind"] == "proxy":
        matched = result["matched"]
        if matched is None:
            out.write(f"no route: the connection is closed ({result['reason']})\n")
            return
        target = result["target"]
        port = target["port"] if target["port"] is not None else "(the port connected to)"
        out.write(f"route:      {matched['name']} ({matched['key']}, priority {matched['priority']})\n")
        out.write(
            f"action:     {result['action']}" + (f" ({result['reason']})" if result["reason"] else "") + "\n"
        )
        out.write(f"target:     {', '.join(target['hosts'])} port {port}, TLS {result['tlsMode']}\n")
        return
    matched = result["matched"]
    accepted = "accepted" if result["accepted"] else f"refused: {result['reply']}"
    out.write(f"at RCPT:    {accepted}")
    if result["verifyRecipients"] != "off":
        out.write(f" (then verified: {result['verifyRecipients']})")
    out.write("\n")
    where = f" ({matched['key']})" if matched["key"] else ""
    out.write(f"matched:    {matched['by']} {matched['name'] or ''}{where}\n")
    targets = ", ".join(result["targets"]) if result["targets"] else f"MX of {result['mxDomain']}"
    out.write(f"route:      {result['route']} -> {targets} port {result['port']}, TLS {result['tls']}\n")
    retry = result["retry"]
    out.write(
        f"limits:     {result['maxPerDestination']} deliveries at once; retries: {retry['maxRetries']}, "
        f"first after {retry['baseRetryDelay'] / 1000:g} s, at most {retry['maxRetryDelay'] / 1000:g} s "
        "apart\n"
    )
    if result["paused"]:
        out.write("delivery:   paused\n")


def _dispatch(client: ApiClient, args: argparse.Namespace) -> Any:
    if args.command == "stats":
        return client.call("GET", "/api/v1/stats")
    if args.command == "reload":
        return client.call("POST", "/api/v1/reload", {})
    if args.command == "route-test":
        return client.call("POST", "/api/v1/routing/test", _route_query(args))
    if args.command == "delivery":
        if args.action == "status":
            return client.call("GET", "/api/v1/delivery")
        body = {"destination": args.destination} if args.destination else {}
        return client.call("POST", f"/api/v1/delivery/{args.action}", body)
    action = args.action
    if action == "list":
        return _list(client, args)
    path = "/api/v1/queue/" + urllib.parse.quote(args.id, safe="")
    if action == "show":
        return client.call("GET", path)
    if action == "delete":
        return client.call("DELETE", path)
    body = {"reason": args.reason} if action == "bounce" and args.reason else {}
    return client.call("POST", f"{path}/{action}", body)


def _list(client: ApiClient, args: argparse.Namespace) -> dict[str, Any]:
    """Every page (or the first ``--limit`` items)."""
    query = {
        k: getattr(args, k) for k in ("status", "destination", "sender", "recipient") if getattr(args, k)
    }
    wanted = args.limit
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        page_query = dict(query, limit=str(min(1000, wanted - len(items)) if wanted else 1000))
        if cursor:
            page_query["cursor"] = cursor
        page = client.call("GET", "/api/v1/queue?" + urllib.parse.urlencode(page_query))
        items += page["items"]
        cursor = page["nextCursor"]
        if not cursor or (wanted and len(items) >= wanted):
            return {"items": items, "nextCursor": cursor}


def print_destinations(result: dict[str, Any], out: TextIO) -> None:
    """``dcrouter delivery status``'s table: one line per destination with mail queued, deferred, in flight
    or a last error."""
    queued = result.get("queuedByDestination", {})
    flying = result.get("inFlightByDestination", {})
    errors = result.get("lastErrors", {})
    names = sorted(set(queued) | set(flying) | set(errors))
    if not names:
        return
    out.write(f"{'DESTINATION':<32} {'QUEUED':>8} {'DEFERRED':>8} {'FLIGHT':>6}  LAST ERROR\n")
    for name in names:
        counts = queued.get(name, {})
        error = errors.get(name, {}).get("reply", "")
        out.write(
            f"{name:<32} {counts.get('queued', 0):>8} {counts.get('deferred', 0):>8} "
            f"{flying.get(name, 0):>6}  {error}\n".rstrip()
            + "\n"
        )
    other = result.get("queuedOther", {})
    if other.get("queued") or other.get("deferred"):
        label = f"({other.get('destinations', 0)} other destinations)"
        out.write(f"{label:<32} {other.get('queued', 0):>8} {other.get('deferred', 0):>8}\n")
    if result.get("queuedComplete") is False:
        out.write("(queued and deferred counted over part of the queue only: lower bounds)\n")


def _print(args: argparse.Namespace, result: Any, out: TextIO) -> None:
    if args.command == "stats":
        print_stats(result, out)
    elif args.command == "reload":
        out.write(f"reloaded {result['path']}:\n")
        for change in result["changes"]:
            out.write(f"  {change}\n")
    elif args.command == "route-test":
        print_route_test(result, out)
    elif args.command == "delivery":
        paused = "paused" if result["paused"] else "running"
        out.write(
            f"delivery {paused}; paused destinations: {', '.join(result['pausedDestinations']) or 'none'}; "
            f"{result['inFlight']} in flight\n"
        )
        print_destinations(result, out)
    elif args.action == "list":
        items = result["items"]
        if not items:
            out.write("Mail queue is empty\n")
            return
        print_queue(items, out)
        more = " (more: raise --limit)" if result["nextCursor"] else ""
        out.write(f"-- {sum(i['size'] for i in items)} bytes in {len(items)} messages{more}\n")
    elif args.action == "show":
        print_item(result, out)
    else:
        item = result["item"]
        out.write(f"{item['id']}: {args.action} done, now {item['status']}\n")


def add_commands(commands: Any) -> None:
    """The ``queue``, ``delivery`` and ``stats`` subcommands of ``dcrouter``."""
    client = argparse.ArgumentParser(add_help=False)
    client.add_argument("--url", help=f"the API's URL (default: DCROUTER_API, --config, {DEFAULT_URL})")
    client.add_argument("--config", metavar="FILE", help="read the API's address from this file's apiConfig")
    client.add_argument(
        "--token-file", metavar="FILE", help="read the token from FILE (default: DCROUTER_TOKEN)"
    )
    client.add_argument("--json", action="store_true", help="print the API's JSON answer")

    queue = commands.add_parser(
        "queue",
        help="list, show, retry, hold, release, delete or bounce queued messages (through the API)",
        description="Work on the running router's queue through the management API (docs/api.md). The token "
        "comes from DCROUTER_TOKEN or --token-file.",
    )
    actions = queue.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", parents=[client], help="queued messages, newest first, like mailq")
    listing.add_argument("--status", help="only this status (queued, deferred, held, ...)")
    listing.add_argument("--destination", help="only this route (domain:example.com, mx:example.org, ...)")
    listing.add_argument("--sender", help="only senders containing this")
    listing.add_argument("--recipient", help="only messages with a recipient containing this")
    listing.add_argument("--limit", type=int, default=0, help="at most this many (default: all)")
    identified = argparse.ArgumentParser(add_help=False, parents=[client])
    identified.add_argument("id", metavar="ID", help="the queue id (as in `250 ... queued as <id>`)")
    for name, text in (
        ("show", "a message's envelope, status and attempts"),
        ("retry", "make a queued or deferred message due now"),
        ("hold", "hold a message: never delivered until released"),
        ("release", "release a held message"),
        ("delete", "remove a message; no bounce is sent"),
        ("bounce", "fail a message now and bounce it to its sender"),
    ):
        action = actions.add_parser(
            name, parents=[identified], help=text, description=text[0].upper() + text[1:] + "."
        )
        if name == "bounce":
            action.add_argument("--reason", help="said in the bounce")
    delivery = commands.add_parser(
        "delivery",
        help="pause or resume delivery, globally or for one destination (through the API)",
        description="Pause or resume the running router's deliveries; mail is still accepted and queued.",
    )
    steps = delivery.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name in ("pause", "resume"):
        step = steps.add_parser(name, parents=[client], help=f"{name} delivery")
        step.add_argument("destination", nargs="?", metavar="DESTINATION", help="a route name; default: all")
    steps.add_parser(
        "status",
        parents=[client],
        help="what is paused; per destination in flight, queued, deferred, last error",
    )
    stats = commands.add_parser(
        "stats", parents=[client], help="queue counts, messages since start, sessions (through the API)"
    )
    stats.set_defaults(action="stats")
    reload = commands.add_parser(
        "reload",
        parents=[client],
        help="re-read the configuration file and apply it now, like SIGHUP (through the API)",
        description="Ask the running router to re-read its configuration file (POST /api/v1/reload). Prints "
        "what changed; an invalid file, or a change that needs a restart, changes nothing and is shown here "
        "(exit status 1).",
    )
    reload.set_defaults(action="reload")
    route_test = commands.add_parser(
        "route-test",
        parents=[client],
        help="where the running router would send a recipient or a proxied connection; sends nothing",
        description="Ask the running router (POST /api/v1/routing/test) how it would route: mail with "
        "--recipient (and --sender, --client-ip, --authenticated), the proxy with --sni or --host and "
        "--port.",
    )
    route_test.add_argument("--recipient", help="mail: the RCPT TO address")
    route_test.add_argument("--sender", help="mail: the MAIL FROM address (default: the null sender)")
    route_test.add_argument("--client-ip", help="the client's address (default: one in no relay network)")
    route_test.add_argument("--authenticated", action="store_true", help="mail: the client authenticated")
    route_test.add_argument("--sni", help="proxy: the TLS server name")
    route_test.add_argument("--host", help="proxy: the HTTP Host")
    route_test.add_argument("--port", type=int, help="proxy: the port connected to")
    route_test.set_defaults(action="route-test")
    for parser in (queue, delivery, stats, reload, route_test):
        parser.set_defaults(run=lambda args: run(args, sys.stdout, sys.stderr))
