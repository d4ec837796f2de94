"""FeatCal's layer journal: what a killed calibration keeps, so that a rerun continues after the last
layer it finished instead of from layer 0.

In a folder inside the staging folder: `layers.bin`, every calibrated tensor's stored bytes appended
as it is solved; `streams-0.f32` / `streams-1.f32`, the activation streams after a finished layer
(written alternately, so the last journaled one is never the one being written); and `journal`,
one checksummed line per finished layer naming its tensors' ranges and hashes, its report and its
streams' hash. A line is written only after the bytes it names are synced. The merged files are not
touched until every layer is journaled: then `patch` writes the tensors into them. A kill before
that leaves the merge exactly as its own journal recorded it, and a rerun takes it over whole.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
import xxhash

from ..errors import MergepipeError
from .calibrate import LayerReport, Stream

VERSION = 1
# test-only: seconds slept after each journaled layer, so a test can kill a run between layers
SLOW_ENV = "MERGEPIPE_TEST_SLOW_FEATCAL_MS"


def _line(body: dict) -> bytes:
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return f"{xxhash.xxh3_64_hexdigest(text.encode())} {text}\n".encode()


def _lines(path: Path) -> list[tuple[dict, int]]:
    """The journal's intact lines with where each ends; a torn or edited line ends it."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    out, pos = [], 0
    while (nl := data.find(b"\n", pos)) >= 0:
        digest, _, text = data[pos:nl].partition(b" ")
        if xxhash.xxh3_64_hexdigest(text).encode() != digest:
            break
        try:
            out.append((json.loads(text), nl + 1))
        except ValueError:
            break
        pos = nl + 1
    return out


def _hash_range(f, start: int, n: int) -> str | None:
    f.seek(start)
    data = f.read(n)
    return xxhash.xxh3_64_hexdigest(data) if len(data) == n else None


def _sync(fd: int) -> None:
    os.fdatasync(fd)


class StageJournal:
    """The LayerJournal of one calibration (see calibrate.LayerJournal) in `folder`, for the plan
    `key`; also what `emit` appends to, and what `patch` writes into the merged files from."""

    def __init__(self, folder: Path, key: str) -> None:
        self.folder, self.key = folder, key
        self.pending: list[list] = []  # this layer's [name, offset, nbytes, xxh3]
        self.entries: list[list] = []  # every journaled tensor, in order
        self._reports: list[LayerReport] = []
        self._streams: dict | None = None  # the last kept line's streams entry
        folder.mkdir(parents=True, exist_ok=True)
        kept, end, size = self._recover()
        self.jfd = os.open(folder / "journal", os.O_WRONLY | os.O_CREAT, 0o644)
        self.bfd = os.open(folder / "layers.bin", os.O_WRONLY | os.O_CREAT, 0o644)
        os.ftruncate(self.bfd, size)
        self.offset = size
        if kept:
            os.ftruncate(self.jfd, end)
            os.lseek(self.jfd, end, os.SEEK_SET)
        else:
            os.ftruncate(self.jfd, 0)
            self._append({"featcal": key, "version": VERSION})

    @property
    def stream_dir(self) -> Path:
        return self.folder / "spill"

    # --- reading back ------------------------------------------------------------------------------

    def _recover(self) -> tuple[int, int, int]:
        """(layers kept, where their last line ends, bytes of layers.bin they use): the prefix of
        lines whose tensors and, for the last, streams still hash as journaled."""
        lines = _lines(self.folder / "journal")
        if not lines or lines[0][0] != {"featcal": self.key, "version": VERSION}:
            return 0, 0, 0
        kept, end, size = 0, lines[0][1], 0
        try:
            with open(self.folder / "layers.bin", "rb") as f:
                for body, line_end in lines[1:]:
                    if body.get("layer") != kept or any(_hash_range(f, o, n) != h for _, o, n, h in body["tensors"]):
                        break
                    self.entries += body["tensors"]
                    self._reports.append(LayerReport(**body["report"]))
                    self._streams = body["streams"]
                    kept, end = kept + 1, line_end
                    size = max([size] + [o + n for _, o, n, _ in body["tensors"]])
        except (OSError, KeyError, TypeError, ValueError):
            kept = 0
        if kept and not self._streams_intact():
            kept = 0  # the streams after the last layer are what a rerun needs: without them, start over
        if not kept:
            self.entries, self._reports, self._streams = [], [], None
            return 0, 0, 0
        return kept, end, size

    def _streams_intact(self) -> bool:
        s = self._streams
        try:
            with open(self.folder / s["file"], "rb") as f:
                return _hash_range(f, 0, s["nbytes"]) == s["xxh3"]
        except (OSError, KeyError, TypeError):
            return False

    def resumed(self) -> list[LayerReport]:
        return list(self._reports)

    def restore(self, streams: dict[str, Stream]) -> None:
        s = self._streams
        if s["names"] != list(streams):
            raise MergepipeError(f"{self.folder / 'journal'}: journaled streams {s['names']} do not match the "
                                 f"calibration's {list(streams)}")
        with open(self.folder / s["file"], "rb") as f:
            for st in streams.values():
                data = bytearray(f.read(st.flat.numel() * 4))
                st.flat.copy_(torch.frombuffer(data, dtype=torch.float32).reshape(st.flat.shape))

    # --- writing -----------------------------------------------------------------------------------

    def emit(self, name: str, raw) -> None:
        """One calibrated tensor's stored bytes, appended (synced with its layer)."""
        view = memoryview(raw).cast("B")
        written = 0
        while written < len(view):
            written += os.pwrite(self.bfd, view[written:], self.offset + written)
        self.pending.append([name, self.offset, len(view), xxhash.xxh3_64_hexdigest(view)])
        self.offset += len(view)

    def finished(self, rep: LayerReport, streams: dict[str, Stream]) -> None:
        _sync(self.bfd)
        entry = self._write_streams(rep.layer, streams)
        self._append({"layer": rep.layer, "tensors": self.pending, "report": asdict(rep), "streams": entry})
        self.entries += self.pending
        self.pending = []
        slow = float(os.environ.get(SLOW_ENV) or 0) / 1000
        if slow:
            time.sleep(slow)

    def _write_streams(self, layer: int, streams: dict[str, Stream]) -> dict:
        name = f"streams-{layer % 2}.f32"
        h, n = xxhash.xxh3_64(), 0
        fd = os.open(self.folder / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for st in streams.values():
                view = memoryview(st.flat.numpy()).cast("B")
                h.update(view)
                written = 0
                while written < len(view):
                    written += os.write(fd, view[written:])
                n += len(view)
            _sync(fd)
        finally:
            os.close(fd)
        return {"file": name, "names": list(streams), "nbytes": n, "xxh3": h.hexdigest()}

    def _append(self, body: dict) -> None:
        view = memoryview(_line(body))
        while view:
            view = view[os.write(self.jfd, view):]
        _sync(self.jfd)

    def patch(self, write) -> None:
        """write(name, bytes) for every journaled tensor, in the order they were solved."""
        with open(self.folder / "layers.bin", "rb") as f:
            for name, offset, nbytes, _ in self.entries:
                f.seek(offset)
                write(name, f.read(nbytes))

    def close(self, remove: bool = False) -> None:
        os.close(self.jfd)
        os.close(self.bfd)
        if remove:
            shutil.rmtree(self.folder, ignore_errors=True)
