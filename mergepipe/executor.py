"""Executors run file jobs. The local one runs them in this process, one after another, each over a
pool of compute threads, and owns the process-wide tuning the stream needs. Every executor takes the
same jobs and resume points from the driver and gives back, per job, its result and how it ran."""

from __future__ import annotations

import contextlib
import gc
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from . import libc, warm
from .journal import Journal
from .manifest import JobRun
from .sink import Resume
from .worker import FileJob, FileResult, WorkerContext, run_file


@dataclass
class RunEnv:
    """What every job of one run shares: where it writes, the driver's journal and reader."""
    staging: Path
    journal: Journal
    reader: object  # checkpoint.Reader
    device: str
    allow_nonfinite: bool
    progress: Callable[[int], None] | None


@dataclass
class Ran:
    """The executor's answer for one job."""
    result: FileResult
    run: JobRun


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
            # whole-tensor kernels keep their buffers from file to file (fresh ones are fresh pages,
            # faulted in again): dropped once the session's files are done
            whole = sys.modules.get(f"{__package__}.operators.whole")  # loaded only where torch is
            if whole is not None:
                whole.SPARES.clear()
            warm.clear()
            if gc_was:
                gc.enable()

    shared = False  # its jobs write in this process: the sink's hashes are of the bytes on disk

    def parts(self, jobs: list[FileJob]) -> list[FileJob]:
        return jobs

    def run(self, job: FileJob, ctx: WorkerContext) -> FileResult:
        return run_file(job, ctx)

    def run_all(self, jobs: list[FileJob], resumes: dict[tuple[str, int], Resume], env: RunEnv) -> dict[tuple[str, int], Ran]:
        out, host = {}, platform.node()
        for job in jobs:
            t0, resume = time.perf_counter(), resumes[job.key]
            ctx = WorkerContext(env.staging, env.journal, resume, env.reader, env.device, env.allow_nonfinite,
                                env.progress)
            result = self.run(job, ctx)
            out[job.key] = Ran(result, JobRun(job.layout.name, job.first, len(job.tensors), "local", host,
                                              round(time.perf_counter() - t0, 4), sum(result.bytes_read.values()),
                                              1, resume.done))
        return out


def _keep_freed_memory() -> None:
    """Ask glibc to keep freed memory for reuse instead of returning it to the kernel (for the rest of
    the process: a library caller keeps that memory mapped, and reuses it). Every block allocates and
    frees a few MiB on several threads; returned and faulted in again, those pages cost a quarter of
    a task-arithmetic run on this project's VMs."""
    mallopt = libc.function("mallopt")
    if mallopt is None:  # not glibc: nothing to tune
        return
    mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    mallopt(-3, 64 << 20)  # M_MMAP_THRESHOLD: block buffers come from the heap
    # M_ARENA_MAX: one heap for every thread. A thread's own arena unmaps a heap as soon as it is
    # all free, so the compute threads' step temporaries were fresh pages at every step.
    mallopt(-8, 1)
