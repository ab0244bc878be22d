"""KeywordScanner: a message whose text or Subject holds one of the configured words is BLOCKED.

Configured as a scanner entry::

    [[smtpConfig.scanners]]
    type = "keyword"            # the entry point; or "dcrouter_example_plugins.keyword:KeywordScanner"
    action = "reject"           # what the processor does on a hit: tag, reject, quarantine, discard
    options = { words = ["viagra", "wire transfer"], caseSensitive = false }

A word matches as a whole word (``cash`` does not match ``cashew``); the spaces of a phrase match any run of
whitespace, line breaks included.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from dcrouter.config import values
from dcrouter.config.schema import option
from dcrouter.interfaces import IScanner
from dcrouter.processing.message import Draft, ScanResult, Verdict

STATUS_HEADER = "X-Keyword-Status"


def visible(value: str) -> str | None:
    """A value check (``option(check=...)``/``each=``): None when fine, else the message the loader shows
    after the key path."""
    if not value.strip():
        return "must not be empty or only whitespace"
    return None


@dataclass(frozen=True)
class KeywordOptions:
    """The ``options`` table of a keyword scanner entry. Keys in the file are the camelCase of the
    attributes (``caseSensitive``)."""

    words: list[str] = option(
        doc="Words and phrases that block a message; at least one.",
        check=values.not_empty,
        each=values.all_of(visible, values.one_line),
    )
    case_sensitive: bool = option(False, doc="Match the words' case exactly (default: any case).")


@implementer(IScanner)
class KeywordScanner:
    """Blocks messages whose decoded text (``draft.info.text``) or Subject holds a configured word. The
    verdict is BLOCKED with the reason ``keyword <word>`` (the word as configured); what that does is the
    entry's ``action``."""

    name = "keyword"
    options_schema = KeywordOptions

    def __init__(self, options: KeywordOptions) -> None:
        self.words = tuple(options.words)
        flags = 0 if options.case_sensitive else re.IGNORECASE
        # One pass over the text for all the words; the group name says which word matched.
        alternatives = (f"(?P<w{i}>{_word_pattern(word)})" for i, word in enumerate(self.words))
        self._pattern = re.compile("|".join(alternatives), flags)

    def scan(self, message: Draft) -> Deferred[ScanResult]:
        info = message.info
        if info is None:
            # The processor always inspects the message first; a Draft built without it cannot be judged.
            return succeed(self._result(Verdict.UNSCANNABLE, "no MIME metadata"))
        subject = info.subject or ""
        text = info.text
        # info.text may be up to mimeLimits' text budget (1 MiB): searching it is CPU work, so it runs in the
        # processing thread pool, not on the reactor thread. Only plain values cross into the thread.
        found = message.run_in_thread(lambda: self._find(subject, text))

        def judge(word: str | None) -> ScanResult:
            if word is not None:
                return self._result(Verdict.BLOCKED, f"keyword {word}")
            if info.unscannable is not None:
                # Part of the message could not be decoded: "no keyword seen" is not "clean".
                return self._result(Verdict.UNSCANNABLE, info.unscannable)
            return self._result(Verdict.CLEAN, "")

        return found.addCallback(judge)

    def _find(self, *texts: str) -> str | None:
        """The configured word that matches first in ``texts``, or None."""
        for text in texts:
            match = self._pattern.search(text)
            if match is not None and match.lastgroup is not None:
                return self.words[int(match.lastgroup[1:])]
        return None

    def _result(self, verdict: Verdict, reason: str) -> ScanResult:
        status = "clean" if verdict is Verdict.CLEAN else f"{verdict.value}; {reason}"
        # The processor adds the header to mail this scanner passes (whatever the action) and to hits when the
        # action is ``tag``, removing any X-Keyword-Status the sender wrote first.
        return ScanResult(self.name, verdict, reason=reason, headers=((STATUS_HEADER, status),))


def _word_pattern(word: str) -> str:
    body = r"\s+".join(re.escape(part) for part in word.split())
    return rf"(?<!\w){body}(?!\w)"
