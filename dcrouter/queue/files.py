"""File operations the durable queue backends share: fsyncs, and putting a body file in place safely."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import shutil
from collections.abc import Callable
from typing import Any, BinaryIO


def fsync_directory(path: str) -> None:
    """Make the entries of directory ``path`` (creations, renames, removals) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str) -> None:
    """Make the contents of file ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def link_without_replacing(source: str, target: str) -> None:
    """Give ``source`` (already fsynced) the name ``target``; FileExistsError if ``target`` exists, which is
    never replaced. When ``source`` is on another file system the content is copied to ``target`` and fsynced.
    The caller fsyncs ``target``'s directory and removes ``source``."""
    try:
        os.link(source, target)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        with open(source, "rb") as src:
            write_new_file(target, lambda dst: shutil.copyfileobj(src, dst, 1024 * 1024))


def write_new_file(path: str, write: Callable[[BinaryIO], object]) -> None:
    """Create ``path`` (FileExistsError if it exists, which is left alone), let ``write`` fill it, and fsync
    it. If anything fails after the creation (ENOSPC in a write, the flush, the fsync or the close), the
    partial file is removed before the error is raised: a half-written body never stays under its name."""
    dst = open(path, "xb")  # noqa: SIM115 (closed below, on every path)
    try:
        with dst:
            write(dst)
            dst.flush()
            os.fsync(dst.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise


def unique_path(directory: str, base: str) -> str:
    """A path in ``directory`` named ``base`` or ``base.N``: set-aside files never overwrite each other."""
    candidate = os.path.join(directory, base)
    n = 0
    while os.path.lexists(candidate):
        n += 1
        candidate = os.path.join(directory, f"{base}.{n}")
    return candidate


class ComposedReader(io.RawIOBase):
    """A readable binary file over ``head`` followed by ``stream`` from byte ``offset`` on: the message as
    relayed when processing changed only its header block (``QueueItem.head``/``body_offset``). Closing it
    closes ``stream``."""

    def __init__(self, head: bytes, stream: BinaryIO, offset: int) -> None:
        super().__init__()
        self._head = memoryview(head)
        self._at = 0
        self._stream = stream
        self._skip = offset

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if self._at < len(self._head):
            n = min(len(view), len(self._head) - self._at)
            view[:n] = self._head[self._at : self._at + n]
            self._at += n
            return n
        if self._skip:
            self._skip_body()
        data = self._stream.read(len(view))
        view[: len(data)] = data
        return len(data)

    def _skip_body(self) -> None:
        if self._stream.seekable():
            self._stream.seek(self._skip, io.SEEK_CUR)
        else:
            while self._skip:
                # A pipe or socket may return less than asked: count what was actually read.
                data = self._stream.read(min(self._skip, 64 * 1024))
                if not data:
                    break
                self._skip -= len(data)
        self._skip = 0

    def close(self) -> None:
        if not self.closed:
            self._stream.close()
        super().close()


def message_reader(head: bytes | None, stream: BinaryIO, offset: int) -> BinaryIO:
    """``stream`` itself when there is no ``head``, else a buffered :class:`ComposedReader`."""
    if head is None and not offset:
        return stream
    return io.BufferedReader(ComposedReader(head or b"", stream, offset), 64 * 1024)  # type: ignore[return-value]
