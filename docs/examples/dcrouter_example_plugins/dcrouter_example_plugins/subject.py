"""SubjectTag: puts a prefix before the Subject of every message (``[EXTERNAL] Lunch?``).

Configured as a transformation entry::

    [[smtpConfig.transformations]]
    type = "subject-tag"        # the entry point; or "dcrouter_example_plugins.subject:SubjectTag"
    options = { prefix = "[EXTERNAL] " }
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from zope.interface import implementer

from dcrouter.config import values
from dcrouter.config.schema import option
from dcrouter.interfaces import ITransformation
from dcrouter.processing.message import Draft
from dcrouter.processing.mime import decode_encoded_words

_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


def has_text(value: str) -> str | None:
    """A value check: the prefix must show something (a prefix of spaces would tag nothing)."""
    if not value.strip():
        return "must not be empty or only whitespace"
    return None


@dataclass(frozen=True)
class SubjectTagOptions:
    prefix: str = option(
        doc="Put before the Subject; include the trailing space (`[EXTERNAL] `). One line.",
        check=values.all_of(has_text, values.one_line),
    )


@implementer(ITransformation)
class SubjectTag:
    """Prefixes the Subject with ``prefix`` unless it already starts with it (mail tagged by an earlier hop
    is not tagged twice). A message without a Subject gets the prefix as its Subject."""

    name = "subject-tag"
    options_schema = SubjectTagOptions

    def __init__(self, options: SubjectTagOptions) -> None:
        self.prefix = options.prefix

    def apply(self, message: Draft) -> None:
        # The header block is in memory: editing it is cheap and belongs on the reactor thread.
        raw = message.headers.get("Subject")
        # The value as the reader sees it: RFC 2047 encoded-words decoded (HeaderBlock.set encodes non-ASCII
        # text again), and control characters an encoded-word may carry turned into spaces, since a header
        # value must not contain CR, LF or NUL (set() would refuse it).
        subject = _CONTROL.sub(" ", decode_encoded_words(raw)) if raw is not None else ""
        tag = self.prefix.strip()
        if subject.startswith(tag):
            return
        message.headers.set("Subject", self.prefix + subject if subject else tag)
