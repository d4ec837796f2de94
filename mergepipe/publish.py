"""Output files: safetensors headers laid out before any tensor is computed, a staging folder beside
the destination, and an atomic publish (fsync, then rename) so no half-written output is visible."""

from __future__ import annotations

import json
import os
import shutil
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import DTYPES
from .errors import MergepipeError


@dataclass(frozen=True)
class OutTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute, in the output file
    nbytes: int


@dataclass(frozen=True)
class OutFile:
    name: str
    header: bytes  # the 8-byte length and the JSON header, padded to 8 bytes
    tensors: tuple[OutTensor, ...]

    @property
    def size(self) -> int:
        return len(self.header) + sum(t.nbytes for t in self.tensors)


def layout(name: str, tensors: list[tuple[str, str, tuple[int, ...]]]) -> OutFile:
    """Header and offsets of one output file for (name, dtype, shape) in the given order."""
    entries, out, offset = {}, [], 0
    for tname, dtype, shape in tensors:
        n = DTYPES[dtype][1]
        for d in shape:
            n *= d
        entries[tname] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        out.append((tname, dtype, shape, offset, n))
        offset += n
    meta = {"__metadata__": {"format": "pt"}, **entries}
    js = json.dumps(meta, separators=(",", ":")).encode()
    js += b" " * (-len(js) % 8)  # the reference writer pads so tensor data starts 8-byte aligned
    header = struct.pack("<Q", len(js)) + js
    return OutFile(name, header, tuple(OutTensor(t, d, s, len(header) + o, n) for t, d, s, o, n in out))


def prepare_destination(out: Path, force: bool) -> Path:
    """Refuse an existing destination without force; return a fresh staging folder beside it."""
    out = out.resolve()
    if out.exists() and not force:
        raise MergepipeError(f"{out}: output folder exists (pass --force to replace it)")
    if out.exists() and not out.is_dir():
        raise MergepipeError(f"{out}: exists and is not a folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = out.parent / f".{out.name}.mergepipe-staging-{uuid.uuid4().hex[:12]}"
        staging.mkdir()
    except OSError as e:
        raise MergepipeError(f"{out.parent}: cannot create the staging folder ({e.strerror})") from None
    return staging


def fsync_tree(folder: Path) -> None:
    for p in folder.iterdir():
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_dir(folder)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(staging: Path, out: Path) -> None:
    """Make the staged folder visible under `out` with renames: an old `out` is moved aside first and
    removed only after the new one is in place."""
    out = out.resolve()
    fsync_tree(staging)
    trash = None
    if out.exists():
        trash = out.parent / f".{out.name}.mergepipe-old-{uuid.uuid4().hex[:12]}"
        os.rename(out, trash)
    os.rename(staging, out)
    fsync_dir(out.parent)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def discard(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)
