"""``addFooter``: a footer at the end of the first plain-text and the first HTML body of a message.

The HTML footer defaults to the text one, escaped, line breaks as ``<br>``. With ``domains`` set, only mail
with a recipient in one of them gets it (``*.example.com`` covers the sub-domains). The body is rewritten only
when :attr:`Draft.info` shows a text body the footer can go into; a message the MIME walker could not inspect
fully is left as it is (a footer is not worth guessing a structure for).
"""

from __future__ import annotations

import functools
import html

from twisted.internet.defer import Deferred
from zope.interface import implementer

from dcrouter.config.processing import TransformationConfig
from dcrouter.interfaces import ITransformation
from dcrouter.log import logger
from dcrouter.processing.message import Draft
from dcrouter.processing.transforms.headers import recipient_filter
from dcrouter.processing.transforms.mimerewrite import DEFAULT_LIMITS, RewriteLimits, rewrite_mime

log = logger(__name__)


def html_footer(text: str) -> str:
    """The text footer as HTML: escaped, each line break a ``<br>``."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return "<br>\n".join(html.escape(line) for line in lines)


@implementer(ITransformation)
class AddFooter:
    name = "addFooter"

    def __init__(self, config: TransformationConfig, *, limits: RewriteLimits = DEFAULT_LIMITS) -> None:
        self.text = config.text
        self.html = config.html if config.html is not None else (html_footer(config.text or "") or None)
        self._wanted = recipient_filter(config.domains)
        self._limits = limits

    def apply(self, message: Draft) -> Deferred[bool] | None:
        if not self._wanted(message):
            return None
        info = message.info
        if info is not None:
            if info.unscannable is not None:
                log.info(
                    "{queue_id}: addFooter: skipped, the message could not be inspected ({why})",
                    queue_id=message.queue_id,
                    why=info.unscannable,
                )
                return None
            kinds = {p.declared_type for p in info.parts if not p.is_attachment}
            plain = "text/plain" in kinds and self.text is not None
            if not plain and not ("text/html" in kinds and self.html):
                return None
        rewrite = functools.partial(
            rewrite_mime, footer_text=self.text, footer_html=self.html, limits=self._limits
        )
        return message.rewrite_body(rewrite)
