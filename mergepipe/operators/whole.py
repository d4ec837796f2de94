"""The kernel of an operator that needs whole tensors (slerp's norms, a sparsifier's ranks, an L1
rescale): the base and each read expert tensor are assembled in float32 from their hash-checked
blocks as they stream, merged once the last block is in (its elementwise passes spread over the
compute pool), and written; their buffers go to the next tensor (Spares). Joined / JoinedTensor hold
a tensor as its blocks were read instead, for methods whose passes can each be cut in steps. A block the plan does not
read for an expert takes the base's rows (a zero delta); an expert read nowhere is the base itself.
Memory: (experts read + 1) float32 copies of the largest tensor, plus the merge's buffers."""

from __future__ import annotations

import bisect
import queue
import threading
from typing import Callable

import numpy as np
import torch

from .. import warm
from ..tensors import all_finite, to_bytes, torch_dtype

WRITE_ROWS_BYTES = 16 << 20  # output written in slices of about this size

STEP = 1 << 20  # elements per step of a pass split over the compute pool

# merge(job, base, inputs, pool) -> float32 result of the tensor's shape; inputs: one per expert (the
# base itself where the expert was read nowhere), which the merge may release as it goes (see
# Spares.release); pool: the
# compute pool, idle while a whole tensor merges (see each_step)
Merge = Callable[[object, torch.Tensor, list, object], torch.Tensor]


def each_step(pool, n: int, fn: Callable[[int, int], object], step: int = STEP) -> list:
    """[fn(lo, hi) for the steps of [0, n)], run on the pool (None: here), in order. Only for work
    whose bits do not depend on where it is cut: elementwise operations into disjoint slices, or a
    reduction that the method itself defines per step (slerp's chunks). Each step's torch runs
    single-threaded, so a whole tensor's pass uses every compute thread and stays bit-exact."""
    steps = [(lo, min(lo + step, n)) for lo in range(0, n, step)]
    if pool is None or len(steps) < 2:
        return [fn(lo, hi) for lo, hi in steps]
    return [f.result() for f in [pool.submit(fn, lo, hi) for lo, hi in steps]]


_LOCAL = threading.local()


def scratch(i: int, n: int, dev: torch.device) -> torch.Tensor:
    """The calling thread's i-th float32 scratch of n entries, kept for its next call: a torch
    temporary of a few MiB is fresh pages each time, and faulting them in costs more than the pass
    that fills them."""
    if dev.type != "cpu":  # the caching allocator keeps a GPU's
        return torch.empty(n, dtype=torch.float32, device=dev)
    bufs = _LOCAL.__dict__.setdefault("bufs", {})
    if i not in bufs or bufs[i].numel() < n:
        bufs[i] = torch.empty(n, dtype=torch.float32)
    return bufs[i][:n]


def shares(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors are views of one buffer (an input that is the base itself)."""
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def each_job(pool, jobs: list[Callable], n: int, dev: torch.device) -> tuple[list, list]:
    """[job(scratch) for job in jobs], as many at once as the pool has threads, each job with a float32
    scratch of n entries to itself: for whole-tensor sums, which must each stay one single-threaded
    torch reduction (their bits), so that the compute threads run several of them side by side.
    Returns the results and the scratch buffers (loans of the calling thread; None where n is 0)."""
    width = 1 if pool is None or dev.type != "cpu" else max(1, min(len(jobs), pool._max_workers))
    free = queue.SimpleQueue()
    scratches = [SPARES.take(n, dev) if n else None for _ in range(width)]
    for b in scratches:
        free.put(b)

    def run(job):
        buf = free.get()
        try:
            return job(buf)
        finally:
            free.put(buf)
    if width == 1:
        return [run(job) for job in jobs], scratches
    return [f.result() for f in [pool.submit(run, job) for job in jobs]], scratches


class Spares:
    """Float32 buffers of whole tensors, kept from one tensor's merge for the next: a fresh buffer of a
    whole tensor is fresh pages, and faulting them in costs about as much as a pass of the merge. The
    largest tensor needed them anyway, so keeping them raises no peak. What a thread takes is on loan
    until its tensor is written (settle); a run drops them all at its end (clear)."""

    def __init__(self) -> None:
        self.free: list[torch.Tensor] = []
        self.lock = threading.Lock()  # a library caller may run merges on several threads
        self.local = threading.local()

    def take(self, n: int, dev: torch.device) -> torch.Tensor:
        """A float32 tensor of n entries (contents undefined), on loan to this thread."""
        buf = None
        with self.lock:
            fits = [i for i, b in enumerate(self.free) if b.numel() >= n and b.device == dev]
            if fits:
                buf = self.free.pop(min(fits, key=lambda i: self.free[i].numel()))
        if buf is None and dev.type == "cpu":
            warmed = warm.take(4 * n)  # faulted in while torch loaded, where one fits
            buf = None if warmed is None else torch.from_numpy(warmed[:warmed.nbytes // 4 * 4].view(np.float32))
        if buf is None:
            buf = torch.empty(n, dtype=torch.float32, device=dev)
        if dev.type == "cpu":
            self.loans().append(buf)
            self.local.taken = getattr(self.local, "taken", 0) + 1
        return buf[:n]

    def release(self, t: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """A loan this thread's merge is done with (a tensor not on loan is left alone): the merge's
        next take may reuse it, so dropping an input early still lowers the peak. Nothing happens
        where `t` shares `keep`'s memory (an input that is the base itself, still needed)."""
        ptr, loans = t.untyped_storage().data_ptr(), self.loans()
        if keep is not None and keep.untyped_storage().data_ptr() == ptr:
            return
        for i, b in enumerate(loans):
            if b.untyped_storage().data_ptr() == ptr:
                with self.lock:
                    self.free.append(loans.pop(i))
                return

    def loans(self) -> list:
        if not hasattr(self.local, "loans"):
            self.local.loans = []
        return self.local.loans

    def settle(self, writing: torch.Tensor) -> None:
        """Take back this thread's loans, except one whose memory `writing` shares (the sink's writer
        thread has yet to write it: it is freed as usual once written)."""
        ptr = writing.untyped_storage().data_ptr()
        loans = self.loans()
        back = [b for b in loans if b.untyped_storage().data_ptr() != ptr]
        with self.lock:
            # the largest, as many as one tensor's merge took (those it released early included): a
            # smaller one a larger replaced goes
            keep = max(len(loans), getattr(self.local, "taken", 0))
            self.free = sorted(self.free + back, key=torch.Tensor.numel, reverse=True)[:keep]
        loans.clear()
        self.local.taken = 0

    def clear(self) -> None:
        self.loans().clear()
        self.local.taken = 0
        with self.lock:
            self.free.clear()


SPARES = Spares()


def _converted(x: torch.Tensor, dtype: torch.dtype, pool) -> torch.Tensor:
    out = torch.empty(x.numel(), dtype=dtype, device=x.device)
    each_step(pool, x.numel(), lambda lo, hi: out[lo:hi].copy_(x[lo:hi]))
    return out


class Joined:
    """A whole tensor as its blocks' float32 views (the base's, an expert's or a sketch-filled one),
    never assembled: a pass widens the step it needs. The blocks are the reader's mappings of the
    stored bytes, so holding a tensor this way faults in no memory."""

    def __init__(self, parts: list[tuple[int, object]]) -> None:  # (first entry, view), in order
        self.starts, self.parts, self.numel = [], [], 0
        for lo, view in parts:
            self.add(lo, view)

    def add(self, lo: int, view) -> None:
        """The next block: its first entry (where the last one ended) and its view."""
        self.starts.append(lo)
        self.parts.append(view)
        self.numel = lo + view.numel

    def into(self, dst: torch.Tensor, lo: int) -> torch.Tensor:
        """Entries [lo, lo + len(dst)) widened into float32 `dst`, which it returns."""
        i = bisect.bisect_right(self.starts, lo) - 1
        pos, n = 0, dst.numel()
        while pos < n:
            off = lo + pos - self.starts[i]
            k = min(n - pos, self.parts[i].numel - off)
            self.parts[i].into(dst[pos:pos + k], off)
            pos, i = pos + k, i + 1
        return dst


def deltas(base: Joined, inputs: list[Joined], pool) -> list[torch.Tensor]:
    """Each input less the base, in float32 buffers from Spares (on loan to this thread), made a
    step at a time over the pool from the blocks as read."""
    n, cpu = base.numel, torch.device("cpu")
    out = [SPARES.take(n, cpu) for _ in inputs]

    def diff(lo: int, hi: int) -> None:
        b = base.into(scratch(0, hi - lo, cpu), lo)
        for d, x in zip(out, inputs):
            torch.sub(x.into(d[lo:hi], lo), b, out=d[lo:hi])
    each_step(pool, n, diff)
    return out


# plan(job, base, inputs, pool) -> fill: the passes a method needs over its Joined inputs (its sums),
# then fill(lo, hi, out), the merge's entries [lo, hi) into float32 `out`, on any thread
Fill = Callable[[int, int, torch.Tensor], None]
Plan = Callable[[object, Joined, list, object], Fill]


class JoinedTensor:
    """The kernel of a whole-tensor operator whose every pass can be cut in steps (slerp's chunked
    sums), on the CPU: the blocks stay as read (Joined) and the result is computed, converted and
    written one output slice at a time, so no float32 copy of the tensor is ever made."""
    journal_blocks = False
    in_place = False

    def __init__(self, job, plan: Plan, step: int = STEP) -> None:
        self.job, self.plan, self.step = job, plan, step
        self.base = Joined([])
        self.inputs = [Joined([]) for _ in job.experts]
        self.last = None

    def compute(self, b: int, block):
        return block

    def take(self, b: int, block, sink) -> None:
        self.last = block
        read, first = dict(block.experts), block.first
        for k, x in enumerate(self.inputs):
            x.add(first, read.get(k, block.base))
        self.base.add(first, block.base)

    def finish(self, sink, pool=None) -> None:
        job, base, inputs = self.job, self.base, self.inputs
        self.base, self.inputs = Joined([]), []
        fill = self.plan(job, base, inputs, pool)
        dtype, cpu, n = torch_dtype(job.out_dtype), torch.device("cpu"), base.numel
        width = max(self.step, WRITE_ROWS_BYTES // dtype.itemsize // self.step * self.step)
        for s in range(0, n, width):
            piece = torch.empty(min(width, n - s), dtype=dtype)

            def part(lo: int, hi: int) -> bool:
                out = scratch(2, hi - lo, cpu)  # 0 and 1 are the fill's
                fill(s + lo, s + hi, out)
                piece[lo:hi].copy_(out)
                return all_finite(piece[lo:hi])  # checked as written, in the output dtype
            self.last.check_finite(all(each_step(pool, piece.numel(), part, self.step)))
            sink.write(to_bytes(piece))
        SPARES.settle(torch.empty(0))  # what the plan took (nothing of it is being written)
        sink.end(job.name)
        self.last = None


class WholeTensor:
    journal_blocks = False  # computed from the whole tensor: no record inside it
    in_place = False

    def __init__(self, job, dev: torch.device, merge: Merge) -> None:
        self.job, self.dev, self.merge = job, dev, merge
        # the experts read here, exactly or from a sketch (the others are the base itself)
        self.active = [k for k, sel in enumerate(job.exact) if sel or (job.sketched and job.sketched[k])]
        self.base = self.experts = self.last = None

    def compute(self, b: int, block):
        return block  # widened in take, straight into the whole tensor

    def take(self, b: int, block, sink) -> None:
        self.last = block
        n = self.job.numel
        if self.base is None:  # allocated at the tensor's first block, not while the one before merges
            self.base = SPARES.take(n, self.dev)
            self.experts = {k: SPARES.take(n, self.dev) for k in self.active}
        first = block.first
        end = first + block.base.numel
        block.base.into(self.base[first:end])
        read = dict(block.experts)
        for k, buf in self.experts.items():
            if k in read:
                read[k].into(buf[first:end])
            else:
                buf[first:end] = self.base[first:end]

    def finish(self, sink, pool=None) -> None:
        job = self.job
        base = self.base.view(job.shape)
        # the list is the inputs' only holder: a merge may release each (SPARES.release) once used
        inputs = [self.experts.pop(k).view(job.shape) if k in self.experts else base for k in range(len(job.experts))]
        self.base = self.experts = None
        merged = self.merge(job, base, inputs, pool).reshape(-1)
        del base, inputs
        dtype = torch_dtype(job.out_dtype)
        step = max(1, WRITE_ROWS_BYTES // dtype.itemsize)
        for s in range(0, merged.numel(), step):
            piece = merged[s:s + step]
            if dtype != merged.dtype:  # a slice at a time: a slice's memory is reused, a whole tensor's faulted in
                piece = _converted(piece, dtype, pool)
            # checked as written: a NaN or Inf of the merge, or a value the output dtype overflows on
            self.last.check_finite(all(each_step(pool, piece.numel(), lambda lo, hi: all_finite(piece[lo:hi]))))
            sink.write(to_bytes(piece))
        SPARES.settle(piece if merged.numel() else merged)
        sink.end(job.name)
        self.last = None
