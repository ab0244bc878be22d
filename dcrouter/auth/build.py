"""The providers ``smtpConfig.auth`` configures, as twisted.cred checkers in the order they are asked:
LDAP (after the users table, which :mod:`dcrouter.smtp.auth` puts first), OAUTH2 tokens, then third-party
providers (``auth.providers``, loaded like plugin scanners: docs/plugins.md)."""

from __future__ import annotations

from typing import Any

from twisted.cred.checkers import ICredentialsChecker

from dcrouter.auth.ldap import LdapChecker
from dcrouter.auth.oauth2 import OAuth2Checker
from dcrouter.config import plugins
from dcrouter.config.auth import AuthConfig
from dcrouter.net.ldapurl import parse_ldap_url


def _http_client(reactor: Any) -> Any:
    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool

    # Not persistent: a token check is rare next to the mail it allows, and the results are cached.
    return HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))


def build_providers(config: AuthConfig, reactor: Any, http: Any = None) -> list[ICredentialsChecker]:
    """Checkers for everything ``config`` names besides ``users``; ``http`` is a treq-like client (default:
    one on ``reactor``)."""
    checkers: list[ICredentialsChecker] = []
    if config.ldap_url is not None:
        checkers.append(LdapChecker(parse_ldap_url(config.ldap_url), config.ldap, reactor=reactor))
    if config.oauth2 is not None and "OAUTH2" in config.methods:
        client = http if http is not None else _http_client(reactor)
        checkers.append(OAuth2Checker(config.oauth2, http=client, clock=reactor))
    for entry in config.providers:
        checkers.append(plugins.instantiate("auth", entry, reactor))
    return checkers
