"""Executors run file jobs. The local one runs them in this process, one after another, each over a
pool of compute threads, and owns the process-wide tuning the stream needs."""

from __future__ import annotations

import contextlib
import gc
import sys
from typing import Iterator

from .worker import FileJob, FileResult, WorkerContext, run_file


class LocalExecutor:
    name = "local"

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """How the stream runs best: glibc keeps freed memory, torch (where a path imported it) runs
        single-threaded, see tensors.single_threaded_torch, and cyclic garbage collection pauses: the
        stream allocates many short-lived containers per block, each collection walks every object
        the imports left, and the stream makes no cycles worth collecting before it ends."""
        _keep_freed_memory()
        gc_was = gc.isenabled()
        gc.disable()
        try:
            if "torch" in sys.modules:
                from .tensors import single_threaded_torch
                with single_threaded_torch():
                    yield
            else:
                yield
        finally:
            if gc_was:
                gc.enable()

    def run(self, job: FileJob, ctx: WorkerContext) -> FileResult:
        return run_file(job, ctx)


def _keep_freed_memory() -> None:
    """Ask glibc to keep freed memory for reuse instead of returning it to the kernel (for the rest of
    the process: a library caller keeps that memory mapped, and reuses it). Every block allocates and
    frees a few MiB on several threads; returned and faulted in again, those pages cost a quarter of
    a task-arithmetic run on this project's VMs."""
    try:
        import ctypes
        libc = ctypes.CDLL(None)
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
        libc.mallopt(-3, 64 << 20)  # M_MMAP_THRESHOLD: block buffers come from the heap
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass
