"""Configuration: the options schema, loading from TOML/JSON, validation.

``load_file(path)`` and ``load_options(mapping)`` return a :class:`ConfigResult` (frozen ``options`` and a
list of ``warnings``) or raise :class:`ConfigError` listing every error, each starting with its key path.
"""

from dcrouter.config.load import ConfigError, ConfigResult, load_file, load_options

__all__ = ["ConfigError", "ConfigResult", "load_file", "load_options"]
