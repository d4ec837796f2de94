"""The C library calls mergepipe makes through ctypes, each with its argument types: page residency
(mincore), page population (madvise, memset), glibc's malloc tuning (mallopt) and write-back starts
(sync_file_range). A foreign call runs without the GIL."""

from __future__ import annotations

import contextlib
import ctypes
import functools
from typing import Callable, Iterator

_SIGNATURES = {
    "mincore": (ctypes.c_int, (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)),
    "madvise": (ctypes.c_int, (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)),
    "memset": (ctypes.c_void_p, (ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t)),
    "mallopt": (ctypes.c_int, (ctypes.c_int, ctypes.c_int)),
    "sync_file_range": (ctypes.c_int, (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)),
}


@functools.lru_cache(maxsize=None)
def function(name: str) -> Callable | None:
    """libc's `name`, typed, or None where this system's C library has none."""
    try:
        f = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (AttributeError, OSError):
        return None
    f.restype, f.argtypes = _SIGNATURES[name]
    return f


@contextlib.contextmanager
def address(buf) -> Iterator[int]:
    """The address of a writable buffer (an mmap), held only while in use: an mmap with a live export
    cannot be closed."""
    anchor = ctypes.c_char.from_buffer(buf)
    try:
        yield ctypes.addressof(anchor)
    finally:
        del anchor
