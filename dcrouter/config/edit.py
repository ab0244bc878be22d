"""Changing the routing of a configuration: the keys ``PUT /api/v1/routing`` replaces, validated as the loader
validates a file, and written back to the file (when ``apiConfig.persist`` asks for it) without touching the
rest of it.

What a caller may rely on:

- :func:`routing_of` is the routing part of a raw configuration (the file's own key names and shapes).
- :func:`with_routing` is a copy of a raw configuration with its routing replaced; :func:`load_options` on it
  is the whole check (every error with its key path, as ``dcrouter --check`` reports them).
- :func:`unapplied_changes` names what a routing change would alter that only a restart applies (the header
  and DKIM settings of ``domainConfigs`` entries, which the processing chain holds, and their
  ``allowedIPs`` and ``rateLimits``, which the SMTP limits hold).
- :func:`write_routing` replaces the routing keys in the file and nothing else: a TOML file keeps its comments
  and layout (tomlkit), a JSON one is rewritten with two-space indentation. The write is atomic: the old
  file is first copied to ``<file>.bak``, the new text goes to a temporary file in the same directory, is
  fsynced and renamed over the file, and the directory is fsynced. It blocks: run it in a thread.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from collections.abc import Mapping, MutableMapping
from typing import Any

from dcrouter.config.domains import DomainConfig
from dcrouter.config.smtp import SmtpConfig
from dcrouter.net.domains import normalize_domain

#: The keys of ``smtpConfig`` that are the routing, in the order they are shown.
ROUTING_KEYS = ("domainConfigs", "routingRules", "defaultServer", "defaultPort", "useTls")

#: What a routing answer shows for a downstream AUTH password to a caller who may not read it.
HIDDEN = "<hidden>"

#: DomainConfig fields read when the processing chain (headers, DKIM) and the SMTP limits (allowedIPs,
#: rateLimits) are built: a routing change cannot alter them while the router runs.
_PROCESSING_FIELDS = {
    "add_headers": "addHeaders",
    "header_info": "headerInfo",
    "sign_dkim": "signDkim",
    "dkim_options": "dkimOptions",
    "allowed_ips": "allowedIPs",
    "rate_limits": "rateLimits",
}


def routing_of(raw: Mapping[str, Any], *, show_passwords: bool = True) -> dict[str, Any]:
    """``domainConfigs``, ``routingRules`` and ``defaultServer`` (``[]``, ``[]`` and null when not set), and
    ``defaultPort``/``useTls`` when set, as ``raw`` holds them. Without ``show_passwords`` every
    ``authentication.pass`` reads :data:`HIDDEN`."""
    smtp = raw.get("smtpConfig") or {}
    routing: dict[str, Any] = {"domainConfigs": [], "routingRules": [], "defaultServer": None}
    for key in ROUTING_KEYS:
        if key in smtp:
            routing[key] = copy.deepcopy(smtp[key])
    if not show_passwords:
        for key in ("domainConfigs", "routingRules"):
            entries = routing[key]
            for entry in entries if isinstance(entries, list) else []:
                auth = entry.get("authentication") if isinstance(entry, dict) else None
                if isinstance(auth, dict) and "pass" in auth:
                    auth["pass"] = HIDDEN
    return routing


def hidden_passwords(routing: Mapping[str, Any]) -> list[str]:
    """Errors for every ``authentication.pass`` that is :data:`HIDDEN` (a read token's answer sent back)."""
    errors = []
    for key in ("domainConfigs", "routingRules"):
        entries = routing.get(key)
        for i, entry in enumerate(entries if isinstance(entries, list) else []):
            auth = entry.get("authentication") if isinstance(entry, dict) else None
            if isinstance(auth, dict) and auth.get("pass") == HIDDEN:
                errors.append(
                    f"smtpConfig.{key}[{i}].authentication.pass: {HIDDEN!r} is what a read token sees, not "
                    "the password; send the password"
                )
    return errors


def with_routing(raw: Mapping[str, Any], routing: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of ``raw`` whose ``smtpConfig`` routing keys are exactly those of ``routing`` (a key
    missing or null there is removed, so the loader's default applies)."""
    new = copy.deepcopy(dict(raw))
    smtp = dict(new.get("smtpConfig") or {})
    for key in ROUTING_KEYS:
        smtp.pop(key, None)
        if routing.get(key) is not None:
            smtp[key] = copy.deepcopy(routing[key])
    new["smtpConfig"] = smtp
    return new


def _processing_settings(entry: DomainConfig) -> tuple[Any, ...]:
    return tuple(getattr(entry, name) for name in _PROCESSING_FIELDS)


_DEFAULTS = _processing_settings(DomainConfig(domains=["x.invalid"], target_ips=["127.0.0.1"]))


def _by_domain(config: SmtpConfig) -> dict[str, tuple[int, tuple[Any, ...]]]:
    found = {}
    for i, entry in enumerate(config.domain_configs):
        settings = _processing_settings(entry)
        for pattern in entry.domains:
            wild = pattern.startswith("*.")
            name = ("*." if wild else "") + normalize_domain(pattern[2:] if wild else pattern)
            found[name] = (i, settings)
    return found


def unapplied_changes(old: SmtpConfig, new: SmtpConfig) -> list[str]:
    """Errors, with key paths in ``new``, for each domain whose header or DKIM settings differ between
    ``old`` and ``new`` (a domain absent from one side counts as having the defaults there)."""
    before, after = _by_domain(old), _by_domain(new)
    errors = []
    for domain in sorted(set(before) | set(after)):
        old_settings = before.get(domain, (-1, _DEFAULTS))[1]
        index, new_settings = after.get(domain, (-1, _DEFAULTS))
        if old_settings == new_settings:
            continue
        pairs = zip(_PROCESSING_FIELDS.values(), old_settings, new_settings, strict=True)
        changed = [key for key, a, b in pairs if a != b]
        where = f"smtpConfig.domainConfigs[{index}]" if index >= 0 else "smtpConfig.domainConfigs"
        errors.append(
            f"{where}: {domain}: {', '.join(changed)} changed; header, DKIM and client-limit settings are "
            "applied at a restart, not by a routing change (change them in the file)"
        )
    return errors


def _render(path: str, routing: Mapping[str, Any], current: str) -> str:
    if path.lower().endswith(".json"):
        data = json.loads(current)
        data["smtpConfig"] = with_routing(data, routing)["smtpConfig"]
        return json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    import tomlkit

    doc = tomlkit.parse(current)
    if "smtpConfig" not in doc:
        doc["smtpConfig"] = tomlkit.table()
    smtp = doc["smtpConfig"]
    for key in ROUTING_KEYS:
        if key in smtp:
            del smtp[key]
        value = routing.get(key)
        if value is not None and value != []:
            smtp[key] = value
    return tomlkit.dumps(doc)


def _fsync_write(path: str, data: bytes, mode: int) -> None:
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_routing(path: str, routing: Mapping[str, Any]) -> None:
    """Replace the routing keys of the configuration file ``path`` by ``routing`` (see the module
    docstring): ``<path>.bak`` first holds the file as it was. Blocks; raises OSError or ValueError (the
    file no longer parses)."""
    with open(path, "rb") as f:
        old = f.read()
    mode = os.stat(path).st_mode & 0o7777
    new = _render(path, routing, old.decode("utf-8")).encode("utf-8")
    _fsync_write(path + ".bak", old, mode)
    _fsync_write(path, new, mode)
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


#: The keys of ``smtpConfig.delivery`` that ``PUT /api/v1/rate-limits`` changes.
OUTBOUND_RATE_KEYS = ("globalRateLimit", "perServerRateLimit", "perDomainRateLimit")


def put_rate_limits(smtp: MutableMapping[str, Any], parts: Mapping[str, Any]) -> None:
    """Put the rate-limit ``parts`` of a ``PUT /api/v1/rate-limits`` body into the raw ``smtpConfig`` table
    ``smtp``, in place (a dict, or a tomlkit table, whose layout is kept): ``rateLimits`` replaced, each
    ``domainConfigs`` entry's ``rateLimits`` replaced (removed when null), the outbound keys of ``delivery``
    replaced (removed when null)."""
    if "rateLimits" in parts:
        smtp["rateLimits"] = copy.deepcopy(parts["rateLimits"])
    if "domainConfigs" in parts:
        for entry, item in zip(smtp.get("domainConfigs") or [], parts["domainConfigs"], strict=False):
            limits = item.get("rateLimits")
            if limits is None:
                entry.pop("rateLimits", None)
            else:
                entry["rateLimits"] = copy.deepcopy(limits)
    if "delivery" in parts:
        if "delivery" not in smtp:
            smtp["delivery"] = {}
        delivery = smtp["delivery"]
        for key in OUTBOUND_RATE_KEYS:
            value = parts["delivery"].get(key)
            if value is None:
                delivery.pop(key, None)
            else:
                delivery[key] = copy.deepcopy(value)


def with_rate_limits(raw: Mapping[str, Any], parts: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of ``raw`` with the rate-limit ``parts`` put in (:func:`put_rate_limits`)."""
    new = copy.deepcopy(dict(raw))
    smtp = new.setdefault("smtpConfig", {})
    put_rate_limits(smtp, parts)
    return new


def write_rate_limits(path: str, parts: Mapping[str, Any]) -> None:
    """Write the rate-limit ``parts`` into the configuration file ``path`` as :func:`write_routing` writes
    the routing (the rest of the file untouched, ``<path>.bak``, atomic). Blocks; raises OSError or
    ValueError."""
    with open(path, "rb") as f:
        old = f.read()
    mode = os.stat(path).st_mode & 0o7777
    current = old.decode("utf-8")
    if path.lower().endswith(".json"):
        text = json.dumps(with_rate_limits(json.loads(current), parts), indent=2, ensure_ascii=False) + "\n"
    else:
        import tomlkit

        doc = tomlkit.parse(current)
        if "smtpConfig" not in doc:
            doc["smtpConfig"] = tomlkit.table()
        put_rate_limits(doc["smtpConfig"], parts)  # type: ignore[arg-type]
        text = tomlkit.dumps(doc)
    _fsync_write(path + ".bak", old, mode)
    _fsync_write(path, text.encode("utf-8"), mode)
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
