"""``removeAttachment`` and ``sanitizeAttachment``: attachments matching the configured extensions or types
are replaced by a short text part saying what was there.

Parts are matched as the attachment scanner matches them (:mod:`dcrouter.processing.scanners.attachment`):
every name a part declares, compared in all the forms it may be saved under and hitting when it *ends* with a
configured extension (``a.pdf.exe`` hits on ``.exe``); the declared type and the type sniffed from the
content. The body is rewritten only when :attr:`Draft.info` shows a matching part; a message the MIME walker
could not inspect fully is rewritten too, matching on what the rewriter itself reads, since removing is the
safe side.
"""

from __future__ import annotations

import functools
import unicodedata
from collections.abc import Iterable

from twisted.internet.defer import Deferred
from zope.interface import implementer

from dcrouter.config.processing import TransformationConfig
from dcrouter.interfaces import ITransformation
from dcrouter.log import logger
from dcrouter.processing.message import Draft
from dcrouter.processing.mime import Part
from dcrouter.processing.scanners.attachment import (
    canonical_type,
    disguised,
    has_extension,
    normalise_extension,
    type_matches,
)
from dcrouter.processing.transforms.mimerewrite import (
    DEFAULT_LIMITS,
    PartView,
    RewriteLimits,
    rewrite_mime,
)

log = logger(__name__)

REMOVED_TEXT = "[attachment {name} removed by policy]"
SANITIZED_TEXT = "[attachment {name} ({type}) was removed by the security policy and is not delivered]"
_MAX_NAME = 200


class AttachmentPolicy:
    """Which parts the configuration names: by extension (any declared name), by type (declared or sniffed;
    ``image/*`` covers a whole kind), or as content of a kind whose usual extension is named, under no name or
    a name of another kind (an executable called ``photo.jpg``) — the attachment scanner's rules."""

    def __init__(self, extensions: Iterable[str], types: Iterable[str]) -> None:
        self._extensions = tuple(sorted({e for e in map(normalise_extension, extensions) if e}))
        self._types = frozenset(canonical_type(t) for t in types if t.strip())

    def matches(self, part: Part | PartView) -> bool:
        """Does this attachment match? Parts that are not attachments (text bodies) never do."""
        if not part.is_attachment:
            return False
        if any(has_extension(name, self._extensions) for name in part.names):
            return True
        for kind in (part.declared_type, part.sniffed_type):
            if kind is not None and type_matches(kind, self._types):
                return True
        return part.sniffed_type is not None and disguised(part.names, part.sniffed_type, self._extensions)


def _visible(text: str) -> str:
    """A part's name for the replacement text: no control or invisible format characters, bounded."""
    cleaned = "".join(ch for ch in text if unicodedata.category(ch) not in ("Cc", "Cf", "Zl", "Zp"))
    return cleaned if len(cleaned) <= _MAX_NAME else cleaned[: _MAX_NAME - 3] + "..."


def replacement_text(template: str, view: PartView) -> str:
    """``template`` with ``{name}`` and ``{type}`` replaced (other braces are left as written)."""
    name = _visible(view.filename) if view.filename else f"(part {view.path})"
    kind = view.declared_type
    if view.sniffed_type is not None and canonical_type(view.sniffed_type) != canonical_type(kind):
        kind = f"{kind}, content {view.sniffed_type}"
    return template.replace("{name}", name).replace("{type}", _visible(kind))


@implementer(ITransformation)
class RemoveAttachment:
    """Replaces each matching attachment by ``[attachment <name> removed by policy]`` (or ``config.text``)."""

    name = "removeAttachment"
    default_text = REMOVED_TEXT

    def __init__(self, config: TransformationConfig, *, limits: RewriteLimits = DEFAULT_LIMITS) -> None:
        self.policy = AttachmentPolicy(config.extensions, config.types)
        self.text = config.text if config.text is not None else self.default_text
        self._limits = limits

    def apply(self, message: Draft) -> Deferred[bool] | None:
        info = message.info
        paths: frozenset[str] = frozenset()
        if info is not None and info.unscannable is None:
            paths = frozenset(p.path for p in info.parts if self.policy.matches(p))
            if not paths:
                return None

        def replace(view: PartView) -> str | None:
            # The walker's finding by part number, or the rewriter's own reading of the part (the same rules).
            if view.path in paths or self.policy.matches(view):
                return replacement_text(self.text, view)
            return None

        rewrite = functools.partial(rewrite_mime, replace=replace, limits=self._limits)
        done: Deferred[bool] = message.rewrite_body(rewrite)
        return done.addCallback(self._log, message, bool(paths))

    def _log(self, changed: bool, message: Draft, expected: bool) -> bool:
        if changed:
            log.info("{queue_id}: {name}: attachments replaced", queue_id=message.queue_id, name=self.name)
        elif expected or (message.info is not None and message.info.unscannable is not None):
            # A matching part is known (or could not be ruled out) but the structure could not be rewritten.
            log.warn(
                "{queue_id}: {name}: message left unchanged (its MIME structure cannot be rewritten)",
                queue_id=message.queue_id,
                name=self.name,
            )
        return changed


@implementer(ITransformation)
class SanitizeAttachment(RemoveAttachment):
    """As :class:`RemoveAttachment`, with a text that names the file and its type."""

    name = "sanitizeAttachment"
    default_text = SANITIZED_TEXT
