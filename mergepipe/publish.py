"""Output files: safetensors headers laid out before any tensor is computed, a staging folder beside
the destination, and an atomic publish (fsync, then rename) so no half-written output is visible.

The staging folder is named after the plan (not a random id), so a rerun of a killed execute finds
the work it left, and its journal sits beside it, outside what gets published. A lock file beside the
destination keeps two runs from writing the same destination at once."""

from __future__ import annotations

import glob
import json
import os
import shutil
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import DTYPES
from .errors import IOFailure, MergepipeError
from .lock import exclusive


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


@dataclass(frozen=True)
class Staging:
    folder: Path
    journal: Path


def destination_lock(out: Path):
    """An exclusive lock for writing `out` (resolved), held for the whole run."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MergepipeError(f"{out.parent}: cannot create the output's parent folder ({e.strerror})") from None
    return exclusive(out.parent / f".{out.name}.mergepipe-lock", f"another mergepipe execute is writing {out}")


def staging_for(out: Path, key: str) -> Staging:
    name = f".{out.name}.mergepipe-staging-{key}"
    return Staging(out.parent / name, out.parent / f"{name}.journal")


def prepare_destination(out: Path, force: bool, key: str) -> Staging:
    """Refuse an existing destination without force; return the plan's staging folder beside it, as
    a previous run of the same plan left it (or new). Call with the destination lock held."""
    out = out.resolve()
    if out.exists() and not force:
        raise MergepipeError(f"{out}: output folder exists (pass --force to replace it)")
    if out.exists() and not out.is_dir():
        raise MergepipeError(f"{out}: exists and is not a folder")
    staging = staging_for(out, key)
    try:
        for p in out.parent.glob(glob.escape(f".{out.name}.mergepipe-staging-") + "*"):
            if p not in (staging.folder, staging.journal):  # another plan's leftovers: never resumable here
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        if not staging.folder.is_dir():
            staging.journal.unlink(missing_ok=True)  # a journal without its data claims nothing
        staging.folder.mkdir(exist_ok=True)
    except OSError as e:
        raise MergepipeError(f"{out.parent}: cannot create the staging folder ({e.strerror})") from None
    return staging


def check_space(folder: Path, need: int) -> None:
    free = shutil.disk_usage(folder).free
    if need > free:
        raise IOFailure(f"{folder}: not enough free space for the output: needs {need} more bytes, "
                        f"{free} available")


def fsync_tree(folder: Path) -> None:
    for p in folder.iterdir():
        if p.is_dir():
            fsync_tree(p)  # shards may sit in subfolders
        elif p.is_file():
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


def publish(staging: Staging, out: Path) -> None:
    """Make the staged folder visible under `out` with renames: an old `out` is moved aside first and
    removed only after the new one is in place."""
    out = out.resolve()
    fsync_tree(staging.folder)
    trash = None
    if out.exists():
        trash = out.parent / f".{out.name}.mergepipe-old-{uuid.uuid4().hex[:12]}"
        os.rename(out, trash)
    os.rename(staging.folder, out)
    fsync_dir(out.parent)
    staging.journal.unlink(missing_ok=True)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def discard(staging: Staging) -> None:
    shutil.rmtree(staging.folder, ignore_errors=True)
    staging.journal.unlink(missing_ok=True)
