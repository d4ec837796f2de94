"""Blocks: contiguous runs of whole rows of one tensor, so each is one byte range of one file.

The layout depends only on the tensor's shape (never its dtype), so block b of a tensor names the same
rows in the base, every expert and the output, whatever each stores them as.
"""

from __future__ import annotations

import collections
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, TypeVar

from .checkpoint import TensorInfo

BLOCK_ELEMS = 1 << 20  # 2 MiB of bf16, 4 MiB of fp32


def rows_per_block(shape: tuple[int, ...]) -> int:
    if len(shape) < 2:
        return 1  # a 1-D tensor (or scalar) is one block: its single "row"
    row = 1
    for d in shape[1:]:
        row *= d
    return max(1, BLOCK_ELEMS // max(row, 1))


def n_rows(shape: tuple[int, ...]) -> int:
    return shape[0] if len(shape) >= 2 else 1


def n_blocks(shape: tuple[int, ...]) -> int:
    r = rows_per_block(shape)
    return max(1, -(-n_rows(shape) // r))


@dataclass(frozen=True)
class Block:
    index: int
    row_start: int
    row_end: int
    start: int  # absolute byte range in the tensor's file
    end: int

    def shape(self, tensor_shape: tuple[int, ...]) -> tuple[int, ...]:
        if len(tensor_shape) < 2:
            return tensor_shape
        return (self.row_end - self.row_start, *tensor_shape[1:])


def block(info: TensorInfo, b: int) -> Block:
    r = rows_per_block(info.shape)
    rows = n_rows(info.shape)
    row_bytes = (info.end - info.start) // rows if rows else 0
    r0, r1 = b * r, min(rows, (b + 1) * r)
    return Block(b, r0, r1, info.start + r0 * row_bytes, info.start + r1 * row_bytes)


def block_bytes(info: TensorInfo):
    """Each block's size in bytes, as an array (what block(info, b).end - .start gives, without
    building the blocks)."""
    import numpy as np
    r, rows, nb = rows_per_block(info.shape), n_rows(info.shape), n_blocks(info.shape)
    row_bytes = (info.end - info.start) // rows if rows else 0
    out = np.full(nb, r * row_bytes, dtype=np.int64)
    out[-1] = (rows - (nb - 1) * r) * row_bytes
    return out


def blocks(info: TensorInfo) -> list[Block]:
    return [block(info, b) for b in range(n_blocks(info.shape))]


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _cores() -> int:
    """The cores this process may run on (taskset and cgroup cpusets narrow them)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def compute_pool(dev, threads: int | None = None) -> tuple[ThreadPoolExecutor, int]:
    """Compute threads for block-parallel operators: one per core (up to 4) on the CPU, with numpy or
    a single-threaded torch inside each, or `threads` where the caller owns only that many cores; one
    for a GPU (dev: a name or torch.device), whose kernels already use the whole device."""
    workers = 1 if str(dev).startswith("cuda") else max(1, threads or min(4, _cores()))
    if workers not in _POOLS:
        _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="mergepipe-compute")
    return _POOLS[workers], workers


def in_order(dev, fn: Callable, stream: Iterable[tuple], threads: int | None = None) -> Iterator[tuple[tuple, object]]:
    """For each (item, raws) of a read-ahead stream, yield it with fn(*item, raws), in stream order,
    computing up to one item per compute thread ahead: blocks merge in parallel and are still
    written front to back."""
    pool, workers = compute_pool(dev, threads)
    in_flight: collections.deque = collections.deque()
    for entry in stream:
        item, raws = entry
        in_flight.append((entry, pool.submit(fn, *item, raws)))
        if len(in_flight) > workers:
            entry, done = in_flight.popleft()
            yield entry, done.result()
    while in_flight:
        entry, done = in_flight.popleft()
        yield entry, done.result()


T = TypeVar("T")
R = TypeVar("R")


def read_ahead(jobs: Iterable[T], load: Callable[[T], R], depth: int = 4) -> Iterator[tuple[T, R]]:
    """Yield (job, load(job)) in order while a background thread loads up to `depth` jobs ahead.

    pread, xxhash and torch release the GIL, so reading the next blocks overlaps computing this one.
    An exception in the loader is re-raised in the consumer.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def worker() -> None:
        try:
            for job in jobs:
                if stop.is_set():
                    return
                q.put((job, load(job)))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put((done, e))
            return
        q.put((done, None))

    t = threading.Thread(target=worker, daemon=True, name="mergepipe-read-ahead")
    t.start()
    try:
        while True:
            job, value = q.get()
            if job is done:
                if value is not None:
                    raise value
                return
            yield job, value
    finally:
        stop.set()
        while t.is_alive():  # unblock a worker waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                t.join(0.01)
