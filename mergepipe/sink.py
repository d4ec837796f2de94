"""Writing one output file front to back, hashed in write order, with journal records that let a
killed run resume: on restart the journaled prefix is re-hashed from disk (which both verifies it and
rebuilds the running file and tensor hashes) and writing continues after it."""

from __future__ import annotations

import collections
import errno
import fcntl
import mmap
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import xxhash

from . import libc
from .errors import IOFailure
from .journal import Journal, Record
from .publish import OutFile

# Inside a long tensor, a journal record at least every GROUP_BYTES of output: a kill then loses at
# most that much work. Records become durable (data and journal synced) every GROUP_BYTES or
# SYNC_SECONDS, whichever comes first.
GROUP_BYTES = 64 << 20
SYNC_SECONDS = 1.0
CHUNK = 16 << 20
EMPTY = xxhash.xxh3_64_hexdigest(b"")
ALIGN = 4096  # O_DIRECT: offsets, lengths and buffer addresses in multiples of the device block
STAGE = 8 << 20
STAGED = 4  # staging buffers per direct output file: one filling, up to three on their way to disk


_FREE: dict[int, list[mmap.mmap]] = {}  # buffers a closed file or an ended read left, by size
_FREE_LOCK = threading.Lock()
_FREE_KEEP = 8  # per size: as many as the files and reads of a run use at once


def _buffer(size: int) -> mmap.mmap:
    """A page-aligned buffer (as O_DIRECT needs), one that a closed file or an ended read left where
    there is one: its pages are already faulted in, and on these VMs a fresh page costs more than
    the copy into it."""
    with _FREE_LOCK:
        free = _FREE.get(size)
        if free:
            return free.pop()
    return mmap.mmap(-1, size)


def _release(bufs) -> None:
    with _FREE_LOCK:
        for buf in bufs:
            free = _FREE.setdefault(len(buf), [])
            if len(free) < _FREE_KEEP:
                free.append(buf)


def _drop_direct(fd: int, e: OSError) -> None:
    """After an I/O error on fd: where it was O_DIRECT refused (EINVAL), go on through the page cache;
    any other error is raised."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    if e.errno != errno.EINVAL or not flags & os.O_DIRECT:
        raise e
    fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)


class DirectFile:
    """An output file written front to back with O_DIRECT, through aligned staging buffers.

    Written through the page cache, the output costs the kernel a copy into pages it must first
    allocate: 3 s per GB measured on this project's VMs (whose host takes back free memory), more than
    the merge itself; and the cached output would evict the inputs. Full buffers go to disk on two
    I/O threads while the next fills (two writes in flight: 1.5x the throughput of one, measured).
    sync() puts everything staged in the file (a partial last block padded, then rewritten whole by
    the next sync). The sink syncs every GROUP_BYTES of journal records, not at each: a record may
    name bytes still staged, which a killed run loses, and resuming then re-verifies and redoes them.
    Falls back to the page cache where the file system refuses O_DIRECT."""

    def __init__(self, path: Path, prefix: int, keep_tail: bool = False) -> None:
        self.name = str(path)
        self._keep_tail = keep_tail  # the interior of a part: the file's later bytes are other parts'
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o644)
        self._spare = [_buffer(STAGE) for _ in range(STAGED - 1)]
        self._buf = _buffer(STAGE)
        self._inflight: collections.deque = collections.deque()  # (future, buffer), oldest first
        self._pos = prefix - prefix % ALIGN  # file offset of the buffer's first byte
        self._fill = prefix - self._pos
        try:
            if not keep_tail:
                os.ftruncate(self._fd, prefix)
            if self._fill:  # the partial block before prefix is staged again, to be rewritten whole
                with open(path, "rb") as f:
                    f.seek(self._pos)
                    self._buf[:self._fill] = f.read(self._fill)
        except BaseException:
            self.close(write=False)
            raise

    def write(self, view: memoryview) -> int:
        n = min(len(view), STAGE - self._fill)
        self._buf[self._fill:self._fill + n] = view[:n]
        self._fill += n
        if self._fill == STAGE:
            if not self._spare:  # every buffer is in flight: wait for the oldest, and reuse it
                done, buf = self._inflight.popleft()
                done.result()
                self._spare.append(buf)
            self._inflight.append((_io_pool().submit(self._write_out, self._buf, STAGE, self._pos), self._buf))
            self._buf, self._pos, self._fill = self._spare.pop(), self._pos + STAGE, 0
        return n

    def sync(self) -> None:
        self._drain()
        if not self._fill:
            return
        self._write_out(self._buf, -(-self._fill // ALIGN) * ALIGN, self._pos)
        whole = self._fill - self._fill % ALIGN
        if whole:
            self._buf.move(0, whole, self._fill - whole)
            self._pos, self._fill = self._pos + whole, self._fill - whole

    def _drain(self) -> None:
        while self._inflight:
            done, buf = self._inflight.popleft()
            self._spare.append(buf)
            done.result()

    def _write_out(self, buf: mmap.mmap, n: int, off: int) -> None:
        view = memoryview(buf)[:n]
        try:
            while view:
                try:
                    k = os.pwrite(self._fd, view, off)
                except OSError as e:
                    _drop_direct(self._fd, e)  # the file system refuses O_DIRECT writes: the page cache
                    continue
                view, off = view[k:], off + k
        finally:
            view.release()

    def fileno(self) -> int:
        return self._fd

    def close(self, write: bool = True) -> None:
        if self._fd < 0:
            return
        try:
            if write:
                self.sync()
                if not self._keep_tail:
                    os.ftruncate(self._fd, self._pos + self._fill)  # drop the padding of the last block
        finally:
            for done, _ in self._inflight:  # after a failure: let the writes end before the fd does
                done.exception()
            os.close(self._fd)
            self._fd = -1
            _release([self._buf, *self._spare, *(buf for _, buf in self._inflight)])
            self._inflight.clear()

    def __enter__(self) -> "DirectFile":
        return self

    def __exit__(self, exc_type, *_) -> None:
        self.close(write=exc_type is None)  # after a failure, what is staged is not worth a write


class PartFile:
    """Bytes [start, end) of an output file that other parts write beside it. The pages wholly inside
    the range go direct (DirectFile, for the reasons given there); the partial pages at its two edges,
    which the neighbouring parts share, through the page cache, since a direct write rounds to whole
    pages and would overwrite a neighbour's bytes."""

    def __init__(self, path: Path, prefix: int, start: int, end: int) -> None:
        self.name = str(path)
        self._lo = min(-(-start // ALIGN) * ALIGN, end)  # the pages in [lo, hi) are this part's alone
        self._hi = max(end - end % ALIGN, self._lo)
        self._pos = prefix
        self._edges = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        self._direct = None
        try:
            if self._lo < self._hi and self._pos < self._hi:
                self._direct = DirectFile(path, max(prefix, self._lo), keep_tail=True)
        except OSError as e:
            if e.errno != errno.EINVAL:  # no O_DIRECT here: the whole part through the page cache
                self.close(write=False)
                raise
            self._lo = self._hi = end

    def write(self, view: memoryview) -> int:
        if self._direct is not None and self._lo <= self._pos < self._hi:
            n = self._direct.write(view[:self._hi - self._pos])
        else:
            n = os.pwrite(self._edges, view[:self._lo - self._pos] if self._pos < self._lo else view, self._pos)
        self._pos += n
        return n

    def sync(self) -> None:
        if self._direct is not None:
            self._direct.sync()

    def fileno(self) -> int:
        return self._edges

    def close(self, write: bool = True) -> None:
        try:
            if self._direct is not None:
                self._direct.close(write)
        finally:
            if self._edges >= 0:
                os.close(self._edges)
                self._edges = -1

    def __enter__(self) -> "PartFile":
        return self

    def __exit__(self, exc_type, *_) -> None:
        self.close(write=exc_type is None)


_IO_POOL: list[ThreadPoolExecutor] = []


SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, start: int, end: int) -> None:
    """Start writing [start, end) of a page-cache file to its device, without waiting: the publish's
    fsync then finds little left to write, where it would otherwise write the whole file while the
    run waits. A no-op where the system has no sync_file_range."""
    f = libc.function("sync_file_range")  # Linux only
    if f is not None and end > start:
        f(fd, start, end - start, SYNC_FILE_RANGE_WRITE)  # advisory: an error here only costs the overlap


def _io_pool() -> ThreadPoolExecutor:
    if not _IO_POOL:
        _IO_POOL.append(ThreadPoolExecutor(2, thread_name_prefix="mergepipe-io"))
    return _IO_POOL[0]


def open_output(path: Path, prefix: int, direct: bool, part: tuple[int, int] | None = None):
    """The output file cut to `prefix` and positioned there: direct (see DirectFile) for files written
    strictly front to back, the page cache for those patched in place (TIES). A `part` [start, end)
    of a file is not cut, since other parts write its later bytes (see PartFile)."""
    if part is not None:
        if direct:
            return PartFile(path, prefix, *part)
        f = open(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), "r+b", buffering=0)
        f.seek(prefix)
        return f
    if direct:
        try:
            return DirectFile(path, prefix)
        except OSError as e:
            if e.errno != errno.EINVAL:  # tmpfs and some others refuse O_DIRECT at open
                raise
    f = open(path, "r+b" if prefix else "w+b", buffering=0)
    f.truncate(prefix)
    f.seek(prefix)
    return f


@dataclass
class Resume:
    """What the verified journal prefix of one output file (or of one part of it) gives back."""
    prefix: int = 0  # where the verified bytes end (a part's verified bytes start at `start`)
    records: int = 0  # journal records verified
    file_hash: "xxhash.xxh3_128" = field(default_factory=xxhash.xxh3_128)
    tensor_hashes: dict[str, str] = field(default_factory=dict)
    partial: tuple[str, "xxhash.xxh3_64"] | None = None  # a tensor cut at a block boundary, its hash so far
    meta: dict[str, dict] = field(default_factory=dict)  # per finished tensor, what its operator reported
    start: int = 0
    kept: list[Record] = field(default_factory=list)  # the records verified, in chain order

    @property
    def done(self) -> int:
        return self.prefix - self.start


def recover(path: Path, ofile: OutFile, cuts: dict[str, set[int]], records: list[Record],
            span: tuple[int, int] | None = None) -> Resume:
    """Verify `records` (in journal order) against the bytes on disk: a chain of records, from the
    start of `span` (default: the whole file), each starting where the verified bytes end and ending
    by the end of `span`. Where several start at the same byte (a retry wrote the range again), the
    newest that matches the disk counts. `cuts`: per tensor, where a record may end inside it."""
    start, end = span or (0, ofile.size)
    res = Resume(prefix=start, start=start)
    order = [("", 0, len(ofile.header))] + [(t.name, t.offset, t.offset + t.nbytes) for t in ofile.tensors]
    index = {name: i for i, (name, _, _) in enumerate(order)}
    by_start: dict[int, list[Record]] = {}
    for rec in records:
        if rec.file == ofile.name and isinstance(rec.start, int) and isinstance(rec.end, int) and rec.end <= end:
            by_start.setdefault(rec.start, []).append(rec)
    if not by_start or not path.is_file():
        return res
    with open(path, "rb") as f:
        while res.prefix < end and any(_extend(f, res, rec, ofile, order, index, cuts)
                                       for rec in reversed(by_start.get(res.prefix, []))):
            pass
    return res


def _extend(f, res: Resume, rec: Record, ofile: OutFile, order: list, index: dict, cuts: dict) -> bool:
    """Add `rec` to the verified chain if it fits the layout and matches the disk."""
    i = index.get(rec.tensor) if isinstance(rec.tensor, str) else None
    if i is None:
        return False
    name, start, end = order[i]
    if not start <= rec.start < rec.end <= end or (rec.end != end and rec.end not in cuts.get(name, ())):
        return False
    if rec.start == start:
        th = xxhash.xxh3_64()
    elif res.partial is not None and res.partial[0] == name:
        th = res.partial[1].copy()
    else:
        return False
    if name == "" and rec.xxh3 != xxhash.xxh3_64_hexdigest(ofile.header):
        return False  # a header from another layout
    fh, rh = res.file_hash.copy(), xxhash.xxh3_64()
    got = _hash_range(f, rec.start, rec.end - rec.start, rh, th, fh)
    if got != rec.end - rec.start or rh.hexdigest() != rec.xxh3:
        return False
    res.prefix, res.records, res.file_hash = rec.end, res.records + 1, fh
    res.kept.append(rec)
    for name2, s2, e2 in reversed(order[1:i]):  # empty tensors just before this one (a part may start with them)
        if s2 != e2 or s2 != start:
            break
        res.tensor_hashes[name2] = EMPTY
    res.partial = None if rec.end == end else (name, th)
    if rec.end == end:
        if name:
            res.tensor_hashes[name] = th.hexdigest()
            if rec.meta is not None:
                res.meta[name] = rec.meta
        # empty tensors have no bytes to journal: done once everything before them is
        for name2, s2, e2 in order[i + 1:]:
            if s2 != e2:
                break
            res.tensor_hashes[name2] = EMPTY
    return True


class Sink:
    """Writes one output file front to back and hashes it in write order (per tensor, per journal
    record and whole file), on a writer thread so that page-cache writes overlap the compute. A
    tensor can also be written unhashed, patched in place, and hashed afterwards by reading it back:
    what streaming TIES needs for its deferred entries."""

    def __init__(self, f, name: str, journal: Journal | None = None, resume: Resume | None = None,
                 fence: Callable[[], None] | None = None) -> None:
        resume = resume or Resume()
        self.f = f
        # raises once this writer may no longer write the file (another attempt owns its range): asked
        # before every write and sync, so that a writer cut off from its driver stops at the next one
        self._fence = fence or (lambda: None)
        self._sync = getattr(f, "sync", None)  # a DirectFile's; None for the page cache
        self._synced, self._synced_at = resume.prefix, time.monotonic()
        self.name = name
        self.journal = journal
        self.file_hash = resume.file_hash
        self.tensor_hashes: dict[str, str] = dict(resume.tensor_hashes)
        self.meta: dict[str, dict] = dict(resume.meta)
        self._partial = resume.partial
        self._tensor = xxhash.xxh3_64()
        self._record = xxhash.xxh3_64()
        self._end = self._start = self._record_start = resume.prefix  # _end: where the next write lands
        self._q: queue.Queue = queue.Queue(maxsize=8)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, daemon=True, name="mergepipe-writer")
        self._thread.start()

    def _drain(self) -> None:
        while True:
            item = self._q.get()
            try:
                if item is None:
                    return
                if self._error is None:
                    self._handle(*item)
            except BaseException as e:  # noqa: BLE001 - re-raised on the compute thread
                self._error = e
            finally:
                self._q.task_done()

    def _handle(self, kind: str, payload, tensor_hash, record_hash) -> None:
        if kind == "data":
            data, hashed = payload
            self._fence()
            self._put(memoryview(data))
            if hashed:
                tensor_hash.update(data)
                record_hash.update(data)
                self.file_hash.update(data)
        elif kind == "tensor":  # end of a tensor: its hash is complete
            self.tensor_hashes[payload] = tensor_hash.hexdigest()
        elif self.journal is not None:  # "record": the range is written, say so
            # Durable every GROUP_BYTES of output or SYNC_SECONDS, not at each record: a sync waits for
            # the writes in flight, and each fsync makes the device flush its cache (0.1 s of a 1.4 s
            # merge at one per tensor). A kill loses nothing journaled; a power cut, work since then.
            now = time.monotonic()
            durable = payload.end - self._synced >= GROUP_BYTES or now - self._synced_at >= SYNC_SECONDS
            if durable:
                if self._sync is not None:
                    self._fence()  # a sync writes a padded partial block: never past the fence
                    self._sync()
                else:
                    start_writeback(self.f.fileno(), self._synced, payload.end)
                self._synced, self._synced_at = payload.end, now
            self.journal.append(replace(payload, xxh3=record_hash.hexdigest()), sync=durable)

    def _put(self, view: memoryview) -> None:
        try:
            while view:  # a raw write may be short (a nearly full disk)
                view = view[self.f.write(view):]
        except OSError as e:
            raise IOFailure(f"{self.f.name}: write failed ({e.strerror})") from None

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def begin(self, name: str, offset: int) -> None:
        """Start tensor `name`, laid out at `offset`; it may be one a previous run left partial."""
        self._start = offset
        if self._partial is not None and self._partial[0] == name:
            self._tensor = self._partial[1]
        else:
            assert self._end == offset, (name, self._end, offset)
            self._tensor = xxhash.xxh3_64()
        self._partial = None

    @property
    def position(self) -> int:
        """Where the next write lands in the file."""
        return self._end

    def write(self, data: np.ndarray, hashed: bool = True) -> None:
        self._check()
        self._q.put(("data", (data, hashed), self._tensor, self._record))
        self._end += data.nbytes

    def checkpoint(self, tensor: str, meta: dict | None = None) -> None:
        """Journal everything written since the last record (it ends on a resumable boundary)."""
        if self._end > self._record_start:
            rec = Record(self.name, tensor, self._record_start, self._end, "", meta=meta)
            self._q.put(("record", rec, None, self._record))
            self._record, self._record_start = xxhash.xxh3_64(), self._end

    def block_done(self, tensor: str) -> None:
        if self._end - self._record_start >= GROUP_BYTES:
            self.checkpoint(tensor)

    def flush(self) -> None:
        """Everything written so far is in the file."""
        self._q.join()
        self._check()
        if self._sync is not None:  # the writer thread is idle now
            self._fence()
            self._sync()

    def pread(self, offset: int, n: int) -> np.ndarray:
        assert self._sync is None, "patching needs a page-cache output (open_output direct=False)"
        self.flush()
        buf = np.empty(n, np.uint8)
        got = os.preadv(self.f.fileno(), [memoryview(buf)], self._start + offset)
        assert got == n
        return buf

    def pwrite(self, offset: int, data: np.ndarray) -> None:
        self.flush()
        self._fence()
        try:
            os.pwrite(self.f.fileno(), memoryview(data), self._start + offset)
        except OSError as e:
            raise IOFailure(f"{self.f.name}: write failed ({e.strerror})") from None

    def end(self, name: str, rehash: bool = False, meta: dict | None = None) -> None:
        if rehash:
            for off in range(0, self._end - self._start, CHUNK):
                chunk = self.pread(off, min(CHUNK, self._end - self._start - off))
                for h in (self._tensor, self._record, self.file_hash):
                    h.update(chunk)
        self._q.put(("tensor", name, self._tensor, None))  # digested on the writer thread, after the writes
        if meta is not None:
            self.meta[name] = meta
        self.checkpoint(name, meta)

    def close(self) -> int:
        """Finish writing; return the file's size."""
        self._q.put(None)
        self._thread.join()
        self._check()
        return self._end


def _hash_range(f, start: int, n: int, *hashes) -> int:
    """Feed the n bytes of file f at `start` to every hash; returns how many there were (fewer where
    the file ends early)."""
    f.seek(start)
    got = 0
    while got < n and (chunk := f.read(min(CHUNK, n - got))):
        for h in hashes:
            h.update(chunk)
        got += len(chunk)
    return got


def chunks(path: Path, start: int = 0, end: int | None = None, direct: bool = False):
    """The file's bytes [start, end) (to its end by default), CHUNK at a time. `direct` reads O_DIRECT
    where the file system allows, for a file the page cache does not hold (an output just written
    direct): a read through the page cache would cost the kernel fresh pages for it, as a write does
    (see DirectFile), where a file it holds is read fastest through it. Each chunk is valid until
    the next, and the last until the reading ends."""
    fd = -1
    if direct:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
    if fd < 0:
        fd = os.open(path, os.O_RDONLY)
    buf = _buffer(CHUNK)
    view, pos = memoryview(buf), start - start % ALIGN  # direct reads start on a block
    try:
        while end is None or pos < end:
            try:
                got = os.preadv(fd, [view], pos)
            except OSError as e:  # a file system that takes O_DIRECT at open and refuses it here
                _drop_direct(fd, e)
                continue
            if not got:
                return
            lo, hi = max(start - pos, 0), got if end is None else min(got, end - pos)
            if hi > lo:
                yield view[lo:hi]
            pos += got
    finally:
        os.close(fd)
        _release([buf])


class FileHasher:
    """The hashes a Sink computes while writing, fed the file's bytes in order: the file's xxh3_128
    and, given its layout, each tensor's xxh3_64 (each chunk feeds the tensors it overlaps)."""

    def __init__(self, ofile: OutFile | None = None) -> None:
        self.file = xxhash.xxh3_128()
        self._ofile = ofile
        self._spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in ofile.tensors) if ofile else []
        self._tensors = {name: xxhash.xxh3_64() for *_, name in self._spans}
        self.pos, self._i = 0, 0

    def feed(self, chunk: memoryview) -> None:
        end = self.pos + len(chunk)
        self.file.update(chunk)
        while self._i < len(self._spans) and self._spans[self._i][0] <= end:
            lo, hi, name = self._spans[self._i]
            self._tensors[name].update(chunk[max(lo, self.pos) - self.pos:max(min(hi, end), self.pos) - self.pos])
            if hi > end:
                break
            self._i += 1
        self.pos = end

    def digests(self) -> tuple[str, dict[str, str]]:
        tensors = self._ofile.tensors if self._ofile else ()
        return self.file.hexdigest(), {t.name: self._tensors[t.name].hexdigest() for t in tensors}


def hash_file(path: Path, ofile: OutFile | None = None) -> tuple[str, dict[str, str]]:
    """A Sink's hashes (see FileHasher) from the bytes on disk. Used by verify and after a stage
    rewrites tensors in place, so that every root hash comes from one definition."""
    h = FileHasher(ofile)
    for chunk in chunks(path):
        h.feed(chunk)
    return h.digests()
