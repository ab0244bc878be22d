"""``twistd dcrouter``: command-line options and the service maker (twisted/plugins/dcrouter_plugin.py
points here).

``twistd -n dcrouter --config etc/dcrouter.example.toml`` runs in the foreground;
``twistd -n dcrouter --config FILE --check`` validates FILE, prints every error and warning, and exits 0
(valid) or 1 (invalid) without binding anything. twistd's own options (``--logfile``, ``--pidfile``,
``--uid``, ``--logger dcrouter.log.json_observer``, …) go before ``dcrouter``.

Signals under twistd: SIGTERM and SIGINT stop the router gracefully (twistd stops the reactor, which stops the
service; see ``dcrouter.router``). SIGHUP, which twistd leaves at the system default (the process ends), runs
:func:`on_sighup` instead: the configuration file is read again and applied (:mod:`dcrouter.reload`).
"""

from __future__ import annotations

import os
import signal
import sys
from typing import TYPE_CHECKING, Any, TextIO, cast

from twisted.application.service import Service
from twisted.python import usage

if TYPE_CHECKING:
    from dcrouter.config import ConfigError
    from dcrouter.net.reactor import IRouterReactor
    from dcrouter.router import DcRouter

#: A packaged deployment keeps its configuration here; from a checkout, pass
#: --config etc/dcrouter.example.toml.
DEFAULT_CONFIG = "/etc/dcrouter/dcrouter.toml"


class Options(usage.Options):
    synopsis = "[--config FILE] [--check]"
    longdesc = (
        "dcrouter routes mail and TCP from one process, as its configuration says. smtpConfig: an SMTP "
        "store-and-forward gateway (receive with STARTTLS and AUTH, scan and transform, queue durably, "
        "deliver with retries and bounces). smartProxyConfig (or httpDomainRoutes): a TCP/TLS/HTTP proxy "
        "routing by SNI or Host, passing TLS through or terminating it (certificates from files or ACME). "
        "The file is TOML or JSON (by extension) with the seed's option names (smtpConfig, domainConfigs, "
        "smartProxyConfig, ...); see docs/configuration.md, docs/proxy.md and etc/dcrouter.example.toml. "
        "twistd's own options (--logfile, --pidfile, --uid, --logger) go before 'dcrouter'. Examples: "
        "twistd -n dcrouter --config etc/dcrouter.example.toml; "
        "twistd --logfile /var/log/dcrouter.log --pidfile /run/dcrouter.pid dcrouter --config FILE"
    )
    optParameters = [
        ["config", "c", DEFAULT_CONFIG, "Configuration file, .toml or .json."],
    ]
    optFlags = [
        [
            "check",
            None,
            (
                "Validate the configuration file, print every error and warning, and exit: 0 if it is valid, "
                "1 if not. Nothing is bound or started."
            ),
        ],
    ]
    compData = usage.Completions(optActions={"config": usage.CompleteFiles("*.toml *.json")})

    def postOptions(self) -> None:
        if self["check"]:
            raise SystemExit(check(self["config"], sys.stdout, sys.stderr))


def _load(path: str) -> Any:
    """The ConfigResult of ``path``; raises ConfigError, or OSError when the file cannot be read."""
    from dcrouter.config import load_file

    return load_file(path)


def _config_errors(path: str, error: ConfigError | OSError) -> list[str]:
    from dcrouter.config import ConfigError

    if isinstance(error, ConfigError):
        return list(error.errors) or [str(error)]
    return [f"cannot read the configuration file: {error.strerror or error}"]


def _config_warnings(error: ConfigError | OSError) -> list[str]:
    """The warnings found beside the errors: a file that is refused is fixed faster when every finding is
    shown at once."""
    return list(getattr(error, "warnings", []))


def print_findings(errors: list[str], warnings: list[str], err: TextIO) -> None:
    """Every error, then every warning, one per line: the form ``--check``, ``dcrouter check`` and start-up
    share."""
    for message in errors:
        print(f"error: {message}", file=err)
    for message in warnings:
        print(f"warning: {message}", file=err)


def check(path: str, out: TextIO, err: TextIO) -> int:
    """Validate ``path`` as ``--check`` does: every error and every warning printed (warnings also when there
    are errors), and a summary line naming the file. Returns the exit status (0 valid, 1 invalid)."""
    from dcrouter.config import ConfigError

    try:
        result = _load(path)
    except (ConfigError, OSError) as error:
        errors, warnings = _config_errors(path, error), _config_warnings(error)
        print_findings(errors, warnings, err)
        print(f"{path}: not valid, {len(errors)} error(s), {len(warnings)} warning(s)", file=err)
        return 1
    print_findings([], result.warnings, err)
    print(f"{path}: OK, {len(result.warnings)} warning(s)", file=out)
    return 0


def makeService(config: Options, reactor: IRouterReactor | None = None) -> Any:
    """Load the configuration file and return the DcRouter service running on ``reactor``: twistd passes
    none, and gets the global reactor, imported only then (as Twisted's own taps do); tests and embedding
    programs pass theirs. Errors are printed, then SystemExit(1): at this point twistd has not started
    logging, so the terminal is where the operator is looking."""
    if reactor is None:
        from twisted.internet import reactor as global_reactor  # only here: the reactor twistd runs

        reactor = cast("IRouterReactor", global_reactor)  # the one twistd runs provides every part of it
    from dcrouter.config import ConfigError
    from dcrouter.router import DcRouter

    path = config["config"]
    try:
        result = _load(path)
    except (ConfigError, OSError) as error:
        print_findings(_config_errors(path, error), _config_warnings(error), sys.stderr)
        print(f"{path}: not valid; nothing started", file=sys.stderr)
        if path == DEFAULT_CONFIG:
            print("dcrouter: to try the example, pass --config etc/dcrouter.example.toml", file=sys.stderr)
        # The errors are printed above; the exception they came from would only repeat them.
        raise SystemExit(1) from None
    print_findings([], result.warnings, sys.stderr)
    from dcrouter.net.fdlimit import apply_nofile

    # Here, before twistd gives up root (the hard limit can only be raised as root); logged once twistd
    # begins logging.
    apply_nofile(result.options)

    from dcrouter.config.options import resolve_workers
    from dcrouter.net.listen import inherit
    from dcrouter.supervisor import Supervisor, die_with_parent, listen_addresses, worker_sockets

    worker = worker_sockets(os.environ)
    if worker is None and resolve_workers(result.options.workers) > 1:
        # This process is the supervisor: it opens the ports and runs the workers (dcrouter.supervisor).
        count = resolve_workers(result.options.workers)
        return Supervisor(os.path.abspath(path), count, listen_addresses(result.options), reactor=reactor)
    index = 0
    if worker is not None:
        index, sockets = worker
        inherit(sockets)
        die_with_parent()
    router = DcRouter(result, reactor=reactor, worker=index)
    if result.options.log_format == "json":
        from dcrouter.log import twistd_json_observer

        # Taken up by twistd when it starts logging, unless its own --logger was given (that wins).
        router.log_observer = twistd_json_observer(getattr(config, "parent", None))
    else:
        from dcrouter.log import twistd_text_observer

        # twistd's text lines to standard output, formatted with less work per line (None elsewhere:
        # a log file or syslog stays twistd's own observer).
        router.log_observer = twistd_text_observer(getattr(config, "parent", None))
    # Under twistd a router that cannot start (its queue does not load) should not linger half-alive.
    router.when_ready().addErrback(_stop_reactor, reactor)
    router.reloader = make_reloader(router, path, reactor)
    SighupHandler(router, reactor).setServiceParent(router)
    return router


def make_reloader(router: DcRouter, path: str, reactor: IRouterReactor) -> Any:
    """The :class:`~dcrouter.reload.Reloader` of ``router`` from ``path``, also behind ``POST
    /api/v1/reload`` when the API is on."""
    from twisted.internet.threads import deferToThreadPool

    from dcrouter.reload import Reloader

    threadpool = router.threadpool
    reloader = Reloader(router, path, lambda work: deferToThreadPool(reactor, threadpool, work))
    if router.api is not None:
        router.api_view.reload = reloader.reload
    return reloader


def on_sighup(router: DcRouter) -> None:
    """What SIGHUP does, run in the reactor thread: reload the configuration file (dcrouter.reload). The
    outcome is logged (and emitted as ``config.reloaded`` or ``config.reload_failed``)."""
    from dcrouter.log import logger

    reloader = getattr(router, "reloader", None)
    if reloader is None:
        logger(__name__).warn("SIGHUP received, but this router has no configuration file to reload")
        return
    logger(__name__).info("SIGHUP received: reloading the configuration")
    reloader.reload("signal")


class SighupHandler(Service):
    """Makes SIGHUP call :func:`on_sighup` in the reactor thread instead of ending the process (twistd
    installs no SIGHUP handler, and the system default terminates). Installed in privilegedStartService, as
    twistd starts, before the queue loads; kept until the process ends, so a SIGHUP while the router is
    stopping is harmless too. Only ``makeService`` adds it: a program embedding DcRouter keeps its own
    signals."""

    name = "sighup"  # type: ignore[assignment]

    def __init__(self, router: DcRouter, reactor: IRouterReactor) -> None:
        self._router = router
        self._reactor = reactor

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        hangup = getattr(signal, "SIGHUP", None)  # not on Windows
        if hangup is not None:
            signal.signal(hangup, self._received)

    def _received(self, signum: int, frame: Any) -> None:
        # A signal handler may run between any two bytecodes: hand the work to the reactor thread, as
        # Twisted's own SIGTERM handler does.
        self._reactor.callFromThread(on_sighup, self._router)


def _stop_reactor(failure: Any, reactor: IRouterReactor) -> None:
    # DcRouter has already logged the failure as critical; stopping the reactor ends the process.
    from twisted.internet.error import ReactorNotRunning

    try:
        reactor.stop()
    except ReactorNotRunning:
        pass  # already shutting down (the router was stopped before it became ready)
