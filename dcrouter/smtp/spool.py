"""Where the bytes of DATA go while they arrive: memory up to a bound, then a file; never the whole of a big
message in memory."""

from __future__ import annotations

import io
import os
import secrets
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


class SpoolWriter:
    """Collects one message. Up to ``memory_limit`` bytes stay in a buffer; past that everything goes to a
    uniquely named file in ``directory`` (which must be on the queue's filesystem, so the queue can rename
    it)."""

    def __init__(self, directory: str, memory_limit: int = 256 * 1024) -> None:
        self._directory = directory
        self._memory_limit = memory_limit
        self._buffer: list[bytes] | None = []
        self._buffered = 0
        self._file: BinaryIO | None = None
        self._path: str | None = None
        self.size = 0

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self._buffer is not None:
            self._buffer.append(data)
            self._buffered += len(data)
            if self._buffered <= self._memory_limit:
                return
            self._spill()
            return
        assert self._file is not None
        self._file.write(data)

    def _spill(self) -> None:
        assert self._buffer is not None
        self._path = os.path.join(self._directory, "spool-" + secrets.token_hex(12))
        # Open across write() calls; finish() or abort() closes it.
        self._file = open(self._path, "xb", buffering=256 * 1024)  # noqa: SIM115
        self._file.writelines(self._buffer)
        self._buffer = None

    def finish(self) -> SpooledMessage:
        """The message is complete: close the file (no fsync here; the queue decides durability)."""
        if self._buffer is not None:
            data = b"".join(self._buffer)
            self._buffer = None
            return SpooledMessage(self.size, data=data)
        assert self._file is not None and self._path is not None
        self._file.close()
        self._file = None
        return SpooledMessage(self.size, path=self._path)

    def abort(self) -> None:
        """Drop what was written (size exceeded, client gone, rejected)."""
        self._buffer = None
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._path is not None:
            try:
                os.unlink(self._path)
            except FileNotFoundError:
                pass
            self._path = None
