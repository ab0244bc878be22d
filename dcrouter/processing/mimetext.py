"""The text of a message's text bodies for scanners: decoded from their charsets, HTML reduced to its text,
all of it within one budget.

A :class:`TextPart` takes one body part's decoded bytes in pieces cut anywhere and adds its text to a shared
:class:`TextBudget`; the result does not depend on the cuts. Past the budget the text is truncated (the
message is not unscannable for that); an HTML part that is all markup costs at most a few budgets of input.
"""

from __future__ import annotations

import codecs
import html
import re

from dcrouter.processing.decoding import charset_codec


class TextBudget:
    """The text kept for scanners, up to ``limit`` UTF-8 bytes: ``pieces`` in order, ``truncated`` when some
    was left out."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._used = 0
        self.pieces: list[str] = []
        self.full = False
        self.truncated = False

    def add(self, text: str) -> None:
        if not text:
            return
        if self.full:
            self.truncated = True
            return
        encoded = text.encode("utf-8", "replace")
        room = self.limit - self._used
        if len(encoded) > room:
            text = encoded[:room].decode("utf-8", "ignore")
            encoded = text.encode("utf-8")
            self.full = self.truncated = True
        self.pieces.append(text)
        self._used += len(encoded)


_BLOCK_TAGS = frozenset(
    {"br", "p", "div", "tr", "td", "th", "li", "ul", "ol", "h1", "h2", "h3", "h4", "h5", "h6", "table", "hr"}
    | {"blockquote", "title", "pre", "section", "article"}
)
_TAG_NAME = re.compile(r"/?([A-Za-z][A-Za-z0-9]*)")
_ENTITY_TAIL = re.compile(r"&[^\s&<;]{0,31}\Z")


class HtmlText:
    """Tags stripped, comments, scripts and styles dropped, entities decoded; fed any split of the text, the
    output is the same."""

    def __init__(self) -> None:
        self._state = "text"
        self._held = ""
        self._tag = ""
        self._skip_end: re.Pattern[str] | None = None

    def feed(self, text: str, final: bool = False) -> str:
        text, self._held = self._held + text, ""
        out: list[str] = []
        i, n = 0, len(text)
        while i < n:
            if self._state == "text":
                j = text.find("<", i)
                if j < 0:
                    rest = text[i:]
                    tail = None if final else _ENTITY_TAIL.search(rest)
                    if tail is not None:
                        self._held, rest = rest[tail.start() :], rest[: tail.start()]
                    out.append(html.unescape(rest))
                    break
                out.append(html.unescape(text[i:j]))
                if not final and n - j < 4 and "<!--".startswith(text[j:]):
                    self._held = text[j:]
                    break
                if text.startswith("<!--", j):
                    self._state, i = "comment", j + 4
                else:
                    self._state, self._tag, i = "tag", "", j + 1
            elif self._state == "tag":
                j = text.find(">", i)
                self._tag += text[i : (n if j < 0 else j)][: 32 - len(self._tag)]
                if j < 0:
                    break
                out.append(self._end_tag())
                i = j + 1
            elif self._state == "comment":
                j = text.find("-->", i)
                if j < 0:
                    self._held = "" if final else text[max(i, n - 2) :]
                    break
                self._state, i = "text", j + 3
            else:
                assert self._skip_end is not None
                match = self._skip_end.search(text, i)
                if match is None:
                    self._held = "" if final else text[max(i, n - 8) :]
                    break
                self._state, self._tag, i = "tag", "", match.start() + 1
        return "".join(out)

    def _end_tag(self) -> str:
        self._state = "text"
        match = _TAG_NAME.match(self._tag)
        if match is None:
            return ""
        name = match.group(1).lower()
        if name in ("script", "style") and not self._tag.startswith("/"):
            self._state = "skip"
            self._skip_end = re.compile("</" + name, re.IGNORECASE)
        return "\n" if name in _BLOCK_TAGS else ""


#: How much decoded input one text part may cost, as a multiple of the text budget: HTML that is all markup
#: yields no text, and stripping it is not free.
_TEXT_INPUT_FACTOR = 4


class TextPart:
    """One text body part (HTML when ``is_html``) in ``charset``: :meth:`feed` its decoded bytes, the last
    piece with ``final``; its text goes to ``budget``, after a line break when text came before."""

    def __init__(self, charset: str | None, is_html: bool, budget: TextBudget) -> None:
        factory = charset_codec(charset).incrementaldecoder or codecs.getincrementaldecoder("utf-8")
        self._decoder = factory("replace")
        self._html = HtmlText() if is_html else None
        self._budget = budget
        self._room = _TEXT_INPUT_FACTOR * budget.limit
        self._stopped = False
        if budget.pieces:
            budget.add("\n")

    def feed(self, data: bytes, final: bool = False) -> None:
        if self._budget.full or self._stopped:
            return
        if len(data) > self._room:
            data, final = data[: self._room], True
            self._stopped = self._budget.truncated = True
        self._room -= len(data)
        try:
            text = self._decoder.decode(data, final)
        except (UnicodeError, ValueError, TypeError, LookupError):
            self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
            text = self._decoder.decode(data, final)
        if self._html is not None:
            text = self._html.feed(text, final)
        self._budget.add(text)
