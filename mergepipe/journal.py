"""The execution journal: an append-only record of output byte ranges known to be written, kept
beside the staging folder so that a killed `execute` resumes where it stopped.

One line per record, `<xxh3_64 of the body> <JSON body>`; a torn or edited last line fails its
checksum and ends the journal there. The writer fsyncs it every so often, not at each append: an
append survives a killed process anyway, and a power cut only costs a rerun the records since the
last fsync. The first record names the plan the
journal belongs to. A record claims nothing by itself: on resume the ranges are re-hashed from disk
and only a prefix that matches is kept, so the data files need no fsync before the record is written.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path

import xxhash

from .errors import IOFailure

VERSION = 1


@dataclass(frozen=True)
class Record:
    file: str  # output file name, relative to the staging folder
    tensor: str  # "" for the file's header
    start: int  # [start, end): absolute byte range in the output file
    end: int
    xxh3: str  # xxh3_64 hex digest of those bytes
    offset: int = 0  # where the record's line ends in the journal file (not stored)
    meta: dict | None = None  # what the operator reports about the tensor this record completes


def _line(body: dict) -> bytes:
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return f"{xxhash.xxh3_64_hexdigest(text.encode())} {text}\n".encode()


def read_records(path: Path, plan: str) -> list[Record]:
    """The journal's intact records, in order; [] when absent or written for another plan."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    records: list[Record] = []
    pos = 0
    while (nl := data.find(b"\n", pos)) >= 0:
        digest, _, text = data[pos:nl].partition(b" ")
        if xxhash.xxh3_64_hexdigest(text).encode() != digest:
            break
        try:
            body = json.loads(text)
            if pos == 0:
                if body != {"plan": plan, "version": VERSION}:
                    return []
            else:
                rec = Record(**body, offset=nl + 1)
                if not (isinstance(rec.start, int) and isinstance(rec.end, int) and 0 <= rec.start < rec.end):
                    break
                records.append(rec)
        except (ValueError, TypeError):
            break
        pos = nl + 1
    return records


def _body(rec: Record) -> dict:
    # not dataclasses.asdict: it deep-copies the meta, a cost paid per record on a run's critical path
    body = {f.name: getattr(rec, f.name) for f in fields(Record) if f.name != "offset"}
    if body["meta"] is None:
        del body["meta"]
    return body


class Journal:
    """Appends records; opened after the kept records have been chosen. The journal is written anew
    with just those (parts of a file journal in any order, so the kept ones need not be a prefix of
    the old file), and replaces the old one by a rename: a kill in between leaves either whole."""

    def __init__(self, path: Path, plan: str, keep: list[Record]) -> None:
        self.path = path
        tmp = path.with_name(path.name + ".new")
        try:
            self.fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self._append(b"".join([_line({"plan": plan, "version": VERSION}), *(_line(_body(r)) for r in keep)]))
            os.rename(tmp, path)
        except OSError as e:
            raise IOFailure(f"{path}: cannot write the journal ({e.strerror})") from None

    def _append(self, line: bytes, sync: bool = True) -> None:
        view = memoryview(line)
        while view:
            view = view[os.write(self.fd, view):]
        if sync:
            os.fdatasync(self.fd)

    def append(self, rec: Record, sync: bool = True) -> None:
        try:
            self._append(_line(_body(rec)), sync)
        except OSError as e:
            raise IOFailure(f"{self.path}: cannot write the journal ({e.strerror})") from None

    def close(self) -> None:
        os.close(self.fd)
