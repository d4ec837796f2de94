"""Checkpoint access: find a model's safetensors files, parse their headers without touching tensor
data, and read byte ranges with a count of what was read.

A model reference is a Hugging Face folder (`model.safetensors`, or shards listed in
`model.safetensors.index.json`), a single `.safetensors` file, or a hub id `org/name[@rev]` that
huggingface_hub resolves from its local cache (set HF_HUB_OFFLINE=1 to forbid the network).
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xxhash

from . import libc
from .errors import InputChangedError, MergepipeError

# safetensors dtype names -> (torch dtype name, bytes per element); names, so that this module and
# the CPU merge path never import torch
DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2),
    "BF16": ("bfloat16", 2), "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1),
    "U8": ("uint8", 1), "BOOL": ("bool", 1),
}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
DTYPE_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64",
               "fp32": "F32", "fp16": "F16", "bf16": "BF16"}
MAX_HEADER = 100_000_000  # the safetensors reference implementation's limit (MAX_HEADER_SIZE)
COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt",
                "added_tokens.json", "chat_template.jinja")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype][1]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES

    @property
    def row_elems(self) -> int:
        return self.numel // self.shape[0] if len(self.shape) > 1 and self.shape[0] else max(self.numel, 1)


@dataclass(frozen=True)
class FileHeader:
    path: Path
    size: int
    data_start: int
    header_hash: str
    metadata: dict
    tensors: dict[str, TensorInfo]


@dataclass(frozen=True)
class Model:
    ref: str  # as the user gave it
    root: Path  # folder holding config/tokenizer (or the file's folder)
    files: tuple[FileHeader, ...]
    tensors: dict[str, TensorInfo]


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """json keeps the last of repeated keys silently; two readers could then disagree on a tensor."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        raise _DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return out


def _int(s: str) -> int:
    """serde_json reads -0 as a float, which safetensors refuses where it expects a count."""
    if s == "-0":
        raise ValueError(s)
    return int(s)


def _strict_strings(v: object) -> None:
    """Python's json decodes a lone surrogate escape (\\ud800), serde_json refuses it: so do we."""
    if isinstance(v, str):
        v.encode("utf-8")
    elif isinstance(v, dict):
        for k, x in v.items():
            k.encode("utf-8")
            _strict_strings(x)
    elif isinstance(v, list):
        for x in v:
            _strict_strings(x)


def _entry(path: Path, name: str, entry: object, data_start: int) -> TensorInfo:
    """One tensor's header entry, checked for types and ranges (not yet against the file)."""
    def count(v: object) -> bool:  # JSON true is a Python int: refuse it
        return type(v) is int and 0 <= v < 1 << 62
    ok = name != "" and isinstance(entry, dict) and set(entry) == {"dtype", "shape", "data_offsets"}
    if ok:
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        ok = (isinstance(dtype, str) and dtype in DTYPES and isinstance(shape, list) and len(shape) <= 64
              and all(count(d) for d in shape) and isinstance(offsets, list) and len(offsets) == 2
              and all(count(o) for o in offsets) and offsets[0] <= offsets[1])
    if not ok:
        raise MergepipeError(f"{path}: tensor {name!r} has a malformed header entry")
    return TensorInfo(name, path, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def _pread_all(fd: int, n: int, offset: int) -> bytes:
    """Up to n bytes at offset (fewer only at the end of the file)."""
    parts, got = [], 0
    while got < n:
        b = os.pread(fd, n - got, offset + got)
        if not b:
            break
        parts.append(b)
        got += len(b)
    return b"".join(parts)


def read_header(path: Path) -> FileHeader:
    """Parse and validate a safetensors header; refuse anything off the format."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            # Exactly the header's bytes: a buffered sequential read would read ahead into the data and
            # mark a page there for asynchronous read-ahead, which a later planned read of that page
            # then sets off even through a POSIX_FADV_RANDOM descriptor (measured: 1.7% of the expert
            # bytes read beyond the plan at 20% on the 0.5B bench family, from its sidecars).
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            head = _pread_all(fd, 8, 0)
            if len(head) < 8:
                raise MergepipeError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise MergepipeError(f"{path}: not a safetensors file (header length {n} exceeds the file or 100,000,000 bytes)")
            raw = _pread_all(fd, n, 8)
        finally:
            os.close(fd)
    except OSError as e:
        raise MergepipeError(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys, parse_int=_int)
        _strict_strings(header)
    except _DuplicateKey as e:
        raise MergepipeError(f"{path}: not a safetensors file (header repeats the key {e.args[0]!r})") from None
    except (UnicodeError, ValueError, RecursionError):  # ValueError: bad JSON, -0, or an int too long
        raise MergepipeError(f"{path}: not a safetensors file (header is not UTF-8 JSON)") from None
    if not isinstance(header, dict):
        raise MergepipeError(f"{path}: not a safetensors file (header is not a JSON object)")
    data_start = 8 + n
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata  # null is allowed; "", [], 0, false are not
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise MergepipeError(f"{path}: __metadata__ must map strings to strings")
    tensors: dict[str, TensorInfo] = {}
    spans = []
    for name, entry in header.items():
        info = _entry(path, name, entry, data_start)
        if info.end - info.start != info.numel * info.itemsize:
            raise MergepipeError(f"{path}: tensor {name!r} spans {info.end - info.start} bytes, expected "
                                 f"{info.numel * info.itemsize} for {info.dtype}{list(info.shape)}")
        if info.end > size:
            raise MergepipeError(f"{path}: truncated: tensor {name!r} ends at byte {info.end}, file has {size}")
        tensors[name] = info
        spans.append((info.start, info.end, name))
    # As safetensors validates: sorted by offsets, the tensors tile the data exactly, with no gap
    # before, between or after them (its header may be padded with spaces, its data not).
    spans.sort()
    end, prev = data_start, None
    for start, stop, name in spans:
        if start < end:
            raise MergepipeError(f"{path}: tensors {prev!r} and {name!r} overlap")
        if start > end:
            where = f"where {prev!r} ends" if prev is not None else "where the data begins"
            raise MergepipeError(f"{path}: gap before tensor {name!r}: its data starts at byte {start}, "
                                 f"expected {end} {where}")
        end, prev = stop, name
    if end != size:
        raise MergepipeError(f"{path}: {size - end} trailing bytes: expected the file to end at byte {end} "
                             f"where the tensor data ends, it has {size}")
    digest = xxhash.xxh3_64_hexdigest(head + raw)
    return FileHeader(path, size, data_start, digest, metadata, tensors)


def _hub_snapshot(ref: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    repo, _, rev = ref.partition("@")
    try:
        return Path(snapshot_download(repo, revision=rev or None,
                                      allow_patterns=["*.safetensors", "*.json", "*.model", "*.txt", "*.jinja"]))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as e:
        raise MergepipeError(f"{ref}: not a local path, and the hub snapshot could not be resolved "
                             f"({type(e).__name__}; offline use needs it in the HF cache)") from None


def _model_files(path: Path, allow_pickle: bool) -> list[Path]:
    if path.is_file():
        if path.suffix in (".bin", ".pt", ".pth"):
            return [_refuse_or_convert(path, allow_pickle)]
        return [path]
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            raise MergepipeError(f"{index}: not a safetensors index (expected a JSON object with weight_map)") from None
        for n in names:  # a shard name is also an output file name: it must stay inside the folder
            if not isinstance(n, str) or not n or Path(n).is_absolute() or ".." in Path(n).parts or "\0" in n:
                raise MergepipeError(f"{index}: shard name {n!r} is not a file inside the model folder")
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise MergepipeError(f"{path / missing[0]}: shard listed in {index.name} is missing")
        return [path / n for n in names]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    shards = sorted(path.glob("*.safetensors"))
    if shards:
        return shards
    pickled = sorted(path.glob("pytorch_model*.bin"))
    if pickled:
        return [_refuse_or_convert(p, allow_pickle) for p in pickled]
    raise MergepipeError(f"{path}: no model.safetensors, safetensors shards or index json found")


def _refuse_or_convert(path: Path, allow_pickle: bool) -> Path:
    """Pickled checkpoints can run code when loaded: refuse unless allowed, then load with
    weights_only=True and convert once to a cached safetensors file that the rest of the tool reads."""
    if not allow_pickle:
        raise MergepipeError(f"{path}: pickled checkpoint refused (pass --allow-pickle to load it with weights_only=True)")
    import torch
    from safetensors.torch import save_file
    from .paths import cache_dir
    st = path.stat()
    out = cache_dir() / "converted" / f"{xxhash.xxh3_64_hexdigest(f'{path.resolve()}:{st.st_size}:{st.st_mtime_ns}'.encode())}.safetensors"
    if not out.exists():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is bad input
            raise MergepipeError(f"{path}: cannot load pickled checkpoint with weights_only=True ({type(e).__name__})") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise MergepipeError(f"{path}: pickled checkpoint is not a flat dict of tensors")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
        os.replace(tmp, out)
    return out


def open_model(ref: str | os.PathLike, allow_pickle: bool = False) -> Model:
    """Resolve a model reference and parse every header; no tensor data is read."""
    ref = str(ref)
    path = Path(ref).expanduser()
    if not path.exists():
        looks_like_hub = ref.count("/") == 1 and not ref.startswith((".", "/", "~"))
        if not looks_like_hub:
            raise MergepipeError(f"{ref}: no such file or folder")
        path = _hub_snapshot(ref)
    files = tuple(read_header(p) for p in _model_files(path, allow_pickle))
    tensors: dict[str, TensorInfo] = {}
    for fh in files:
        for name, info in fh.tensors.items():
            if name in tensors:
                raise MergepipeError(f"{fh.path}: tensor {name!r} also appears in {tensors[name].file}")
            tensors[name] = info
    if not tensors:
        raise MergepipeError(f"{ref}: holds no tensors")
    root = path if path.is_dir() else path.parent
    return Model(ref, root, files, tensors)


def check_family(base: Model, experts: list[Model]) -> None:
    """Every floating tensor of the base must exist in every expert with the same shape."""
    for e in experts:
        for name, info in base.tensors.items():
            if not info.is_float:
                continue
            other = e.tensors.get(name)
            if other is None:
                raise MergepipeError(f"{e.ref}: tensor {name!r} is missing (the base has it, shape {list(info.shape)})")
            if other.shape != info.shape:
                raise MergepipeError(f"{e.ref}: tensor {name!r} has shape {list(other.shape)}, expected {list(info.shape)} as in the base")
            if not other.is_float:
                raise MergepipeError(f"{e.ref}: tensor {name!r} is {other.dtype}, expected a floating dtype as in the base")


_POPULATE_READ = 22  # MADV_POPULATE_READ (Linux 5.14): map a range's pages now, reading any not cached
_PAGE = mmap.ALLOCATIONGRANULARITY


class Reader:
    """Reads byte ranges and counts the bytes read per file. Thread-safe.

    A range is mapped, not copied: a copy out of the page cache was the largest cost of a warm merge
    after the arithmetic. Each range is its own private (copy-on-write) mapping, so a caller may write
    to what it gets without touching the file, and the mapping goes when the last array over it does.
    The kernel reads only the planned pages (MADV_RANDOM: no read-around past a range). A file
    shortened after it was opened is refused when its range is mapped; check_unchanged() (before a
    publish) refuses a file written to in place while the run read it."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self._stats: dict[Path, tuple[int, int, int]] = {}
        self._lock = threading.Lock()
        self.bytes_read: dict[str, int] = {}
        self._hints = False  # read-ahead hints, from the first range the page cache could not serve

    def _fd(self, path: Path) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                fd = os.open(path, os.O_RDONLY)
                # The plan decides what is read: stop the kernel from reading ahead into skipped ranges.
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
                st = os.fstat(fd)
                self._fds[path], self._stats[path] = fd, (st.st_ino, st.st_size, st.st_mtime_ns)
            return fd

    def prefetch(self, path: Path, start: int, end: int) -> None:
        """Ask the kernel to start reading a range that will be read soon. Skipped while every read
        has found its bytes in the page cache: on a warm cache the hints only cost time (0.13 s of
        a 1.7 s merge)."""
        if self._hints:
            os.posix_fadvise(self._fd(path), start, end - start, os.POSIX_FADV_WILLNEED)

    def read(self, path: Path, start: int, end: int) -> np.ndarray:
        n = end - start
        fd = self._fd(path)
        if n <= 0:
            return np.empty(0, dtype=np.uint8)
        lo = start - start % _PAGE
        try:
            m = mmap.mmap(fd, end - lo, access=mmap.ACCESS_COPY, offset=lo)
        except ValueError:  # the range ends past the end of the file
            raise MergepipeError(f"{path}: truncated: expected {n} bytes at offset {start}") from None
        except OSError:  # a file system that cannot map files
            return self._pread(path, fd, start, n)
        m.madvise(mmap.MADV_RANDOM)
        if not self._hints:
            self._hints = not _resident(m)
        try:  # here, on the reader's thread, and so that a file cut short since it was opened is an error
            m.madvise(_POPULATE_READ)
        except OSError as e:
            if e.errno == errno.EFAULT:
                raise InputChangedError(f"{path}: changed while being read (shorter than recorded)") from None
            if e.errno != errno.EINVAL:  # EINVAL: a kernel without MADV_POPULATE_READ, so faults map it
                raise
        self._count(path, n)
        return np.frombuffer(m, dtype=np.uint8, count=n, offset=start - lo)

    def _pread(self, path: Path, fd: int, start: int, n: int) -> np.ndarray:
        buf = np.empty(n, dtype=np.uint8)
        view, got = memoryview(buf), 0
        while got < n:
            k = os.preadv(fd, [view[got:]], start + got)
            if k == 0:
                raise MergepipeError(f"{path}: truncated: expected {n} bytes at offset {start}")
            got += k
        self._count(path, n)
        return buf

    def _count(self, path: Path, n: int) -> None:
        with self._lock:
            key = str(path)
            self.bytes_read[key] = self.bytes_read.get(key, 0) + n

    def check_unchanged(self, own: Path | None = None) -> None:
        """Refuse to go on if a file read was resized or written since it was opened: what was
        mapped may then be a mix of its old and new bytes. Files under `own` (a run's staging
        folder, which its stages rewrite) are the run's to change."""
        with self._lock:
            items = list(self._stats.items())
        for path, (ino, size, mtime) in items:
            if own is not None and Path(path).is_relative_to(own):
                continue
            try:
                st = os.stat(path)
            except OSError:
                continue  # removed: the mapped bytes are the ones opened
            if (st.st_ino, st.st_size, st.st_mtime_ns) == (ino, size, mtime):
                continue
            if st.st_ino != ino:
                continue  # replaced by a new file: the open one, read throughout, is unchanged
            raise InputChangedError(f"{path}: written while the merge read it (size or modification time "
                                    "changed); run it again on unchanging inputs")

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


def _resident(m: mmap.mmap) -> bool:
    """Whether every page of a mapping is in the page cache (mincore; True where it is unavailable)."""
    mincore = libc.function("mincore")
    if mincore is None:
        return True
    vec = (ctypes.c_ubyte * ((len(m) + _PAGE - 1) // _PAGE))()
    with libc.address(m) as addr:
        if mincore(addr, len(m), vec) != 0:
            return True
    return all(v & 1 for v in vec)


# Per float dtype: the integer view and the exponent bits that, all set, mean NaN or Inf
# (float8 e4m3fn has no Inf; its NaN is S.1111.111).
_NONFINITE = {"F64": (np.uint64, 0x7FF0000000000000), "F32": (np.uint32, 0x7F800000), "F16": (np.uint16, 0x7C00),
              "BF16": (np.uint16, 0x7F80), "F8_E5M2": (np.uint8, 0x7C), "F8_E4M3": (np.uint8, 0x7F)}


def nonfinite(raw: np.ndarray, dtype: str) -> bool:
    """Whether a block's raw bytes hold a NaN or Inf, from the bit patterns (3x faster than isfinite)."""
    view, mask = _NONFINITE[dtype]
    bits = raw.view(view)
    return bool(np.any((bits & view(mask)) == view(mask)))

