"""The handle of a received message's bytes, as ingress hands it on: in memory when small, else a spool file.
A queue that takes it owns it."""

from __future__ import annotations

import io
import os
from typing import BinaryIO


class SpooledMessage:
    """A received message, complete. Exactly one of ``data`` (small messages) or ``path`` (a file in the spool
    directory, not yet fsynced) is set. A queue that takes it owns it: it moves or deletes the file."""

    def __init__(self, size: int, data: bytes | None = None, path: str | None = None) -> None:
        assert (data is None) != (path is None)
        self.size = size
        self.data = data
        self.path = path

    def open(self) -> BinaryIO:
        if self.data is not None:
            return io.BytesIO(self.data)
        assert self.path is not None
        return open(self.path, "rb")

    def discard(self) -> None:
        if self.path is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self.path = None
        self.data = None
