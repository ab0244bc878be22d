"""Where the bytes of DATA go while they arrive: memory up to a bound, then a file; never the whole of a big
message in memory."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from typing import BinaryIO

from dcrouter.mail.spooled import SpooledMessage


def open_spool_file(path: str) -> BinaryIO:
    """Create the spool file ``path`` (never an existing one), buffered for the spool's writes."""
    return open(path, "xb", buffering=256 * 1024)


class SpoolWriter:
    """Collects one message. Up to ``memory_limit`` bytes stay in a buffer; past that everything goes to a
    uniquely named file in ``directory`` (which must be on the queue's filesystem, so the queue can rename
    it), created by ``open_file``.

    A full or failing file system (ENOSPC, EFBIG, EIO, ...) never escapes :meth:`write`: the first error is
    kept in :attr:`error`, the file is closed and removed at once, and later writes are only counted, so the
    caller reads the rest of the message, stays in step with the client and answers at its end.
    :meth:`finish` then raises that error; if closing the file fails there, the file is removed and the error
    raised. :meth:`abort` never raises. Either way no spool file is left behind (unless the file system also
    refuses the unlink: the queue's start-up empties the spool)."""

    def __init__(
        self,
        directory: str,
        memory_limit: int = 256 * 1024,
        *,
        open_file: Callable[[str], BinaryIO] = open_spool_file,
    ) -> None:
        self._directory = directory
        self._open_file = open_file
        self._memory_limit = memory_limit
        self._buffer: list[bytes] | None = []
        self._buffered = 0
        self._file: BinaryIO | None = None
        self._path: str | None = None
        self.size = 0
        #: The first error of the file system, once writing failed.
        self.error: OSError | None = None

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.error is not None:
            return
        try:
            if self._buffer is not None:
                self._buffer.append(data)
                self._buffered += len(data)
                if self._buffered > self._memory_limit:
                    self._spill()
                return
            assert self._file is not None
            self._file.write(data)
        except OSError as error:
            self._fail(error)

    def _spill(self) -> None:
        assert self._buffer is not None
        self._path = os.path.join(self._directory, "spool-" + secrets.token_hex(12))
        # Open across write() calls; finish() or abort() closes it.
        self._file = self._open_file(self._path)
        self._file.writelines(self._buffer)
        self._buffer = None

    def finish(self) -> SpooledMessage:
        """The message is complete: close the file (no fsync here; the queue decides durability). Raises the
        file system's OSError when the message could not be written whole (nothing is left on disk then)."""
        if self.error is not None:
            raise self.error
        if self._buffer is not None:
            data = b"".join(self._buffer)
            self._buffer = None
            return SpooledMessage(self.size, data=data)
        assert self._file is not None and self._path is not None
        try:
            # Writes out what is still buffered: the last chance for ENOSPC.
            self._file.close()
        except OSError as error:
            self._fail(error)
            raise
        path, self._file, self._path = self._path, None, None
        return SpooledMessage(self.size, path=path)

    def abort(self) -> None:
        """Drop what was written (size exceeded, client gone, rejected). Never raises."""
        self._buffer = None
        self._remove_file()

    def _fail(self, error: OSError) -> None:
        self.error = error
        self._buffer = None
        self._remove_file()

    def _remove_file(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            try:
                file.close()
            except OSError:
                pass  # the buffered tail could not be written: it is being thrown away anyway
        path, self._path = self._path, None
        if path is not None:
            try:
                os.unlink(path)
            except OSError:
                pass  # gone already, or the file system refuses: the queue's start-up empties the spool
