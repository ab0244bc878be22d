"""dcrouter: an SMTP store-and-forward gateway and TCP/SNI/HTTP router on Twisted, in one process.

``dcrouter.DcRouter(options)`` is a Twisted MultiService built from the same options as the config file.
"""

from typing import Any

__version__ = "0.1.0.dev0"
__all__ = ["DcRouter", "__version__"]


def __getattr__(name: str) -> Any:
    # Imported lazily so that `import dcrouter` (and the twistd plugin) stays light.
    if name == "DcRouter":
        from dcrouter.router import DcRouter

        return DcRouter
    raise AttributeError(name)
