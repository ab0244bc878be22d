"""Configuration: the options schema, loading from TOML/JSON, validation.

``load_file(path)`` and ``load_options(mapping)`` return a :class:`ConfigResult` (frozen ``options`` and a
list of ``warnings``) or raise :class:`ConfigError` listing every error, each starting with its key path.

The modules, each importing only those listed before it: ``schema`` declares a block (``option()``,
``@checked``, ``@block_check``, ``Report``) and builds one from a raw table (``build_block``); ``values``
holds the checks of one key's value (ports, durations, host names, CIDRs, address patterns), on the parsers of
``dcrouter.mail`` and ``dcrouter.net``. Then one module per block, its checks across keys beside it and typed
by it: ``tls`` (certificates and TLS policy), ``auth`` (SMTP AUTH), ``delivery`` (outbound delivery, routing
rules, ``mtaConfig``), ``domains`` (``domainConfigs``, recipient callouts), ``plugins`` and ``processing``
(scanners, transformations, MIME limits), ``smtp`` (``smtpConfig``), ``proxy`` (``smartProxyConfig``,
``httpDomainRoutes``) and ``options`` (the top level, :class:`~dcrouter.config.options.DcRouterOptions`). On
top, ``load`` (files, mappings, the errors) and ``reference`` (docs/configuration.md, generated).
"""

from dcrouter.config.load import ConfigError, ConfigResult, load_file, load_options

__all__ = ["ConfigError", "ConfigResult", "load_file", "load_options"]
