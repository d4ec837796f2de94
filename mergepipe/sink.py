"""Writing one output file front to back, hashed in write order, with journal records that let a
killed run resume: on restart the journaled prefix is re-hashed from disk (which both verifies it and
rebuilds the running file and tensor hashes) and writing continues after it."""

from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import xxhash

from .errors import IOFailure
from .journal import Journal, Record
from .publish import OutFile

# Inside a long tensor, a journal record at least every GROUP_BYTES of output: a kill then loses at
# most that much work, and a run pays one fdatasync per tensor or per GROUP_BYTES, not per block.
GROUP_BYTES = 64 << 20
CHUNK = 16 << 20
EMPTY = xxhash.xxh3_64_hexdigest(b"")


@dataclass
class Resume:
    """What the verified journal prefix of one output file gives back."""
    prefix: int = 0  # bytes verified on disk
    records: int = 0  # journal records verified
    file_hash: "xxhash.xxh3_128" = field(default_factory=xxhash.xxh3_128)
    tensor_hashes: dict[str, str] = field(default_factory=dict)
    partial: tuple[str, "xxhash.xxh3_64"] | None = None  # a tensor cut at a block boundary, its hash so far
    meta: dict[str, dict] = field(default_factory=dict)  # per finished tensor, what its operator reported


def recover(path: Path, ofile: OutFile, cuts: dict[str, set[int]], records: list[Record]) -> Resume:
    """Verify `records` (this file's, in journal order) against the bytes on disk; stop at the first
    that does not match the layout or the data. `cuts`: per tensor, where a record may end inside it."""
    res = Resume()
    order = [("", 0, len(ofile.header))] + [(t.name, t.offset, t.offset + t.nbytes) for t in ofile.tensors]
    index = {name: i for i, (name, _, _) in enumerate(order)}
    if not records or not path.is_file():
        return res
    with open(path, "rb") as f:
        for rec in records:
            i = index.get(rec.tensor) if isinstance(rec.tensor, str) else None
            if i is None or rec.file != ofile.name or rec.start != res.prefix:
                break
            name, start, end = order[i]
            if not start <= rec.start < rec.end <= end or (rec.end != end and rec.end not in cuts.get(name, ())):
                break
            if rec.start == start:
                th = xxhash.xxh3_64()
            elif res.partial is not None and res.partial[0] == name:
                th = res.partial[1].copy()
            else:
                break
            if name == "" and rec.xxh3 != xxhash.xxh3_64_hexdigest(ofile.header):
                break  # a header from another layout
            fh, rh = res.file_hash.copy(), xxhash.xxh3_64()
            f.seek(rec.start)
            left = rec.end - rec.start
            while left and (chunk := f.read(min(CHUNK, left))):
                rh.update(chunk)
                th.update(chunk)
                fh.update(chunk)
                left -= len(chunk)
            if left or rh.hexdigest() != rec.xxh3:
                break
            res.prefix, res.records, res.file_hash = rec.end, res.records + 1, fh
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
    return res


class Sink:
    """Writes one output file front to back and hashes it in write order (per tensor, per journal
    record and whole file), on a writer thread so that page-cache writes overlap the compute. A
    tensor can also be written unhashed, patched in place, and hashed afterwards by reading it back:
    what streaming TIES needs for its deferred entries."""

    def __init__(self, f, name: str, journal: Journal | None = None, resume: Resume | None = None) -> None:
        resume = resume or Resume()
        self.f = f
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
            self._put(memoryview(data))
            if hashed:
                tensor_hash.update(data)
                record_hash.update(data)
                self.file_hash.update(data)
        elif kind == "tensor":  # end of a tensor: its hash is complete
            self.tensor_hashes[payload] = tensor_hash.hexdigest()
        elif self.journal is not None:  # "record": the range is written, say so
            self.journal.append(replace(payload, xxh3=record_hash.hexdigest()))

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
        self._q.join()
        self._check()

    def pread(self, offset: int, n: int) -> np.ndarray:
        self.flush()
        buf = np.empty(n, np.uint8)
        got = os.preadv(self.f.fileno(), [memoryview(buf)], self._start + offset)
        assert got == n
        return buf

    def pwrite(self, offset: int, data: np.ndarray) -> None:
        self.flush()
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
