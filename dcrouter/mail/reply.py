"""SMTP replies: a code, an RFC 3463 enhanced status code, and text. Every reply dcrouter sends is one."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reply:
    code: int
    enhanced: str  # "2.0.0"; "" only for the greeting and EHLO/HELO, where RFC 2034 does not use one
    text: str | tuple[str, ...]

    def lines(self) -> tuple[str, ...]:
        return (self.text,) if isinstance(self.text, str) else self.text

    def to_bytes(self) -> bytes:
        """The wire form: continuation lines joined with '-', the last with ' ', each ending in CRLF."""
        lines = self.lines() or ("",)
        prefix = f"{self.enhanced} " if self.enhanced else ""
        out = []
        for index, line in enumerate(lines):
            sep = " " if index == len(lines) - 1 else "-"
            out.append(f"{self.code}{sep}{prefix}{line}\r\n")
        return "".join(out).encode("utf-8")

    @property
    def is_success(self) -> bool:
        return 200 <= self.code < 400

    @property
    def is_temporary(self) -> bool:
        return 400 <= self.code < 500
