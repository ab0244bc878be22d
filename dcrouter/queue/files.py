"""File operations the durable queue backends share: fsyncs, and putting a body file in place safely."""

from __future__ import annotations

import errno
import os
import shutil


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
        with open(source, "rb") as src, open(target, "xb") as dst:
            shutil.copyfileobj(src, dst, 1024 * 1024)
            dst.flush()
            os.fsync(dst.fileno())


def unique_path(directory: str, base: str) -> str:
    """A path in ``directory`` named ``base`` or ``base.N``: set-aside files never overwrite each other."""
    candidate = os.path.join(directory, base)
    n = 0
    while os.path.lexists(candidate):
        n += 1
        candidate = os.path.join(directory, f"{base}.{n}")
    return candidate
