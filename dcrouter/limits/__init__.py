"""One rate-limit engine for dcrouter (docs/limits.md): GCRA over counters kept in process or in Redis.

:mod:`.gcra` is the arithmetic, :mod:`.counters` where the state lives (local, Redis, Redis with a local
fallback), :mod:`.limiter` the check-and-count that every user goes through, :mod:`.alerts` the warnings
about limits being hit, and :mod:`.ingress` the SMTP session's limits built from ``smtpConfig.rateLimits``
and ``domainConfigs``. SMTP, delivery and the proxy use it from above; it imports only ``config``, ``mail``,
``net``, ``interfaces`` and ``log``.
"""
