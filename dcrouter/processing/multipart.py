"""The multipart rules of RFC 2046: which line is a delimiter of which open multipart, and how its parts are
numbered.

The walker (:mod:`dcrouter.processing.mimewalk`) keeps a stack of :class:`Frame` (innermost last) and asks
:func:`match_delimiter` about each line that starts with ``--``; the rewriter also checks with the open
frames that nothing it writes could be read as a delimiter.
"""

from __future__ import annotations

from collections.abc import Sequence

#: A longer line is never a delimiter (boundaries are at most 70 characters).
MAX_DELIMITER_LINE = 1024
#: A longer boundary parameter is not used: the multipart cannot be read.
MAX_BOUNDARY = 200


class Frame:
    """An open multipart: its delimiter and how many parts it has had."""

    def __init__(
        self, boundary: bytes, depth: int, path: str, digest: bool, in_message: bool = False
    ) -> None:
        self.delimiter = b"--" + boundary
        self.depth = depth
        self.path = path
        self.digest = digest  # multipart/digest: a part's default type is message/rfc822
        self.in_message = in_message  # inside an encapsulated message
        self.children = 0

    def next_part(self) -> str:
        """Count a new part and give its IMAP-style path ("2", "1.3")."""
        self.children += 1
        return f"{self.path}.{self.children}" if self.path else str(self.children)

    @property
    def default_type(self) -> str:
        """The type of a part of this multipart that declares none."""
        return "message/rfc822" if self.digest else "text/plain"


def match_delimiter(frames: Sequence[Frame], line: bytes) -> tuple[int, bool] | None:
    """Which of the open ``frames`` ``line`` (without its line break) is a delimiter of, innermost first, and
    whether it is the close-delimiter; None when it is neither."""
    for index in range(len(frames) - 1, -1, -1):
        delimiter = frames[index].delimiter
        if line.startswith(delimiter):
            rest = line[len(delimiter) :]
            if not rest.strip(b" \t"):
                return index, False
            if rest.startswith(b"--") and not rest[2:].strip(b" \t"):
                return index, True
    return None
