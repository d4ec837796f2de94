"""Exclusive advisory locks (flock) on a lock file: one writer per output folder, one rebuilder per
catalog. The kernel drops a flock when its holder dies, so a killed run never leaves a stale lock."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator

from .errors import MergepipeError


@contextlib.contextmanager
def exclusive(path: Path, busy: str, wait: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if absent). Without `wait`, a lock held elsewhere is
    a MergepipeError: `busy` says what the other process is doing."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise MergepipeError(f"{path}: cannot create the lock file ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            raise MergepipeError(f"{path}: {busy} (the lock is held by another mergepipe process)") from None
        # The previous holder unlinks the file on release; if that happened between our open and our
        # flock, we hold a lock on an orphaned inode that guards nothing: start over.
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            break
        os.close(fd)
    try:
        yield
    finally:
        # unlink while still holding the lock, so no one can lock this inode after us
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)
