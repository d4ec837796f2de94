"""Block index: per block of every tensor a content hash, and per expert block the statistics of its
delta from the base, kept in a SQLite catalog keyed by file identity and content.

A file whose (path, size, mtime, header hash) is unchanged is never re-read; a changed one is
re-hashed. Delta statistics are keyed by the content of both models, so touching a file without
changing it costs one re-hash and no re-computation.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import sqlite3
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import xxhash

from . import blocks as B
from .checkpoint import FileHeader, Model, Reader, check_family
from .errors import MergepipeError
from .lock import exclusive
from .paths import cache_dir
from .sidecar import SidecarWriter, SketchIndex, SketchTensor, sketched
from .sketch import SketchSpec
from .tensors import raw_view, single_threaded_torch

log = logging.getLogger("mergepipe")

SCHEMA = 1
# Coarse per-block magnitude histogram: one bin per power of two of |delta| in [2^EXP_LO, 2^EXP_HI),
# smaller values in bin 0 and larger in the last. Enough for the TIES planner's trimmed-mass estimate.
EXP_LO, EXP_HI = -40, 8
COARSE_BINS = EXP_HI - EXP_LO
# Fine per-tensor histogram over the top 16 bits of |delta| as float32 (8 exponent + 7 mantissa bits):
# it pins the TIES trim threshold to a 1/128-relative bin before any expert byte is read.
FINE_BINS = 1 << 15
FINITE_BINS = 0x7F80  # fine bins of finite |delta| (top 16 bits of a float32 below Inf)


@dataclass
class FileIndex:
    path: str
    size: int
    mtime_ns: int
    header_hash: str
    hashes: dict[str, np.ndarray]  # tensor -> uint64 xxh3 of each block

    @functools.cached_property
    def content_hash(self) -> str:
        h = xxhash.xxh3_128()
        h.update(self.header_hash.encode())
        for name in sorted(self.hashes):
            h.update(name.encode())
            h.update(self.hashes[name].tobytes())
        return h.hexdigest()


OPTIONAL_STATS = ("dot", "base_sq")


@dataclass
class TensorDelta:
    l2: np.ndarray  # [blocks] float64, ||Delta_b||_F
    maxabs: np.ndarray  # [blocks] float32
    coarse_count: np.ndarray  # [blocks, COARSE_BINS] int64
    coarse_sumsq: np.ndarray  # [blocks, COARSE_BINS] float64
    fine: np.ndarray  # [FINE_BINS] int64 over the whole tensor
    # [blocks] float64 <W0_b, Delta_b> and ||W0_b||^2: with l2 they give a whole tensor's norms and
    # dot products with the base before any expert byte is read (slerp under a budget). None in an
    # entry written before they were kept (a catalog entry is then recomputed; a sidecar's stays None)
    dot: np.ndarray | None = None
    base_sq: np.ndarray | None = None


def model_key(files: list[FileIndex]) -> str:
    h = xxhash.xxh3_128()
    for f in sorted(files, key=lambda f: f.content_hash):
        h.update(f.content_hash.encode())
    return h.hexdigest()


def _pack(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return zlib.compress(buf.getvalue(), 1)


def _unpack(blob: bytes) -> dict[str, np.ndarray] | None:
    try:
        with np.load(io.BytesIO(zlib.decompress(blob)), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (zlib.error, TypeError, ValueError, OSError, EOFError, KeyError):
        return None


class Catalog:
    """The persistent catalog. Default location: the user cache dir; `--catalog PATH` overrides."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path else cache_dir() / "catalog.sqlite"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # one process checks (and if need be rebuilds) at a time; the others wait, then find it sound
            with exclusive(self.path.with_name(self.path.name + ".lock"), "", wait=True):
                try:
                    self.db = self._open()
                except sqlite3.OperationalError as e:  # locked or unreadable: not evidence of corruption
                    raise MergepipeError(f"{self.path}: cannot open the catalog ({e})") from None
                except sqlite3.DatabaseError as e:
                    aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
                    for suffix in ("", "-wal", "-shm"):
                        src = Path(f"{self.path}{suffix}")
                        if src.exists():
                            os.replace(src, f"{aside}{suffix}")
                    log.warning("warning: %s is not a sound mergepipe catalog (%s); moved it to %s and "
                                "starting a fresh one (blocks will be re-indexed)", self.path, e, aside)
                    self.db = self._open()
        except OSError as e:
            raise MergepipeError(f"{self.path}: cannot open the catalog ({e.strerror})") from None

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=60)  # the busy timeout: concurrent runs wait, not fail
        try:
            db.execute("PRAGMA journal_mode=WAL")  # readers never block the one writer
            row = db.execute("PRAGMA quick_check").fetchone()
            if row is None or row[0] != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {row[0] if row else 'no answer'}")
            db.executescript(f"""
                CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
                CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INT, mtime_ns INT,
                    header_hash TEXT, hashes BLOB);
                CREATE TABLE IF NOT EXISTS deltas (expert TEXT, base TEXT, data BLOB,
                    PRIMARY KEY (expert, base));
                CREATE TABLE IF NOT EXISTS sketches (expert TEXT, base TEXT, kind TEXT, path TEXT, size INT,
                    hash TEXT, data BLOB, PRIMARY KEY (expert, base, kind));
                INSERT OR IGNORE INTO meta VALUES ('schema', '{SCHEMA}');
            """)
            schema = db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if schema is None or schema[0] != str(SCHEMA):
                raise sqlite3.DatabaseError(f"schema {schema[0] if schema else None}, expected {SCHEMA}")
        except BaseException:
            db.close()
            raise
        return db

    def close(self) -> None:
        self.db.close()

    def file(self, fh: FileHeader) -> FileIndex | None:
        st = fh.path.stat()
        row = self.db.execute("SELECT size, mtime_ns, header_hash, hashes FROM files WHERE path=?",
                              (str(fh.path.resolve()),)).fetchone()
        if row is None or tuple(row[:3]) != (st.st_size, st.st_mtime_ns, fh.header_hash):
            return None
        hashes = _unpack(row[3])
        if hashes is None:
            return None  # a damaged entry: re-hash the file and overwrite it
        return FileIndex(str(fh.path), st.st_size, st.st_mtime_ns, fh.header_hash,
                         {k: v.astype(np.uint64) for k, v in hashes.items()})

    def put_file(self, fi: FileIndex) -> None:
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO files VALUES (?,?,?,?,?)",
                            (str(Path(fi.path).resolve()), fi.size, fi.mtime_ns, fi.header_hash,
                             _pack(fi.hashes)))

    def delta(self, expert: str, base: str) -> dict[str, TensorDelta] | None:
        row = self.db.execute("SELECT data FROM deltas WHERE expert=? AND base=?", (expert, base)).fetchone()
        if row is None:
            return None
        flat = _unpack(row[0])
        names = {k.rsplit("/", 1)[0] for k in flat or {}}
        try:  # the optional statistics may be absent (an entry written before they were kept)
            return {n: TensorDelta(*(flat[f"{n}/{f}"] if f not in OPTIONAL_STATS else flat.get(f"{n}/{f}")
                                     for f in TensorDelta.__dataclass_fields__)) for n in names}
        except (KeyError, TypeError):
            return None  # a damaged entry: recompute and overwrite it

    def put_delta(self, expert: str, base: str, stats: dict[str, TensorDelta]) -> None:
        flat = {f"{n}/{f}": getattr(s, f) for n, s in stats.items() for f in TensorDelta.__dataclass_fields__
                if getattr(s, f) is not None}
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO deltas VALUES (?,?,?)", (expert, base, _pack(flat)))


    def sketch(self, expert: str, base: str, spec: SketchSpec) -> SketchIndex | None:
        row = self.db.execute("SELECT path, size, hash, data FROM sketches WHERE expert=? AND base=? AND kind=?",
                              (expert, base, spec.key)).fetchone()
        if row is None or not Path(row[0]).is_file() or Path(row[0]).stat().st_size != row[1]:
            return None  # never built, or its file is gone: build it again
        flat = _unpack(row[3])
        try:
            names = {k.rsplit("/", 1)[0] for k in flat}
            tensors = {n: SketchTensor(int(flat[f"{n}/start"][0]), flat[f"{n}/sizes"], flat[f"{n}/hashes"].astype(np.uint64),
                                       flat[f"{n}/residual"]) for n in names}
        except (KeyError, TypeError):
            return None
        return SketchIndex(Path(row[0]), spec, row[1], row[2], tensors)

    def put_sketch(self, expert: str, base: str, sk: SketchIndex) -> None:
        flat = {}
        for n, t in sk.tensors.items():
            flat.update({f"{n}/start": np.array([t.start]), f"{n}/sizes": t.sizes, f"{n}/hashes": t.hashes,
                         f"{n}/residual": t.residual})
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO sketches VALUES (?,?,?,?,?,?,?)",
                            (expert, base, sk.spec.key, str(sk.path), sk.size, sk.hash, _pack(flat)))


def block_hash(raw: np.ndarray) -> int:
    return xxhash.xxh3_64_intdigest(raw)


# Per fine bin: its exponent's coarse bin, and the square of its midpoint (for the sum-of-squares
# estimate; the bins are 1/128 wide, so the estimate is within about 1%).
_FINE_BITS = (np.arange(FINE_BINS, dtype=np.int64) << 16) + (1 << 15)
with np.errstate(invalid="ignore", over="ignore"):  # the top bins are inf/NaN patterns
    _FINE_MID2 = _FINE_BITS.astype(np.int32).view(np.float32).astype(np.float64) ** 2
_FINE_MID2[~np.isfinite(_FINE_MID2)] = 0.0
_FINE_TO_COARSE = np.clip((np.arange(FINE_BINS) >> 7) - 127, EXP_LO, EXP_HI - 1) - EXP_LO


def base_terms(base: torch.Tensor) -> tuple[torch.Tensor, float]:
    """A float32 base block as float64 (flat) and its squared norm: shared by every expert's delta_stats."""
    b64 = base.reshape(-1).double()
    return b64, float(torch.dot(b64, b64))


def delta_stats(d: torch.Tensor, base: tuple[torch.Tensor, float]) -> tuple:
    """(l2, max|d|, coarse counts, coarse sums of squares, fine counts, <base, d>, ||base||^2) of one
    float32 delta block, given its base block's base_terms."""
    b64, base_sq = base
    dot = float(torch.dot(b64, d.reshape(-1).double()))
    a = d.abs().reshape(-1)
    fine = torch.bincount(a.view(torch.int32) >> 16, minlength=FINE_BINS).numpy()
    count = np.bincount(_FINE_TO_COARSE, weights=fine, minlength=COARSE_BINS).astype(np.int64)
    sumsq = np.bincount(_FINE_TO_COARSE, weights=fine * _FINE_MID2, minlength=COARSE_BINS)
    l2 = float(torch.linalg.vector_norm(a, dtype=torch.float64))  # float32 sums of 2^20 squares drift by ~1e-4: the certificate needs better
    mx = float(a.max()) if a.numel() else 0.0
    return l2, mx, count, sumsq, fine, dot, base_sq


@dataclass
class FamilyIndex:
    files: dict[str, FileIndex]  # resolved path -> index
    deltas: list[dict[str, TensorDelta]]  # per expert
    sketches: list[SketchIndex | None] | None = None  # per expert, when a sketch was asked for


Progress = Callable[[int], None]  # bytes just processed


def same_model(a: Model, b: Model) -> bool:
    """Whether two models are the same files (a method that merges the base as one of its inputs
    lists it as an expert too): its delta is zero, known without reading it."""
    return [str(fh.path) for fh in a.files] == [str(fh.path) for fh in b.files]


def _zero_delta(model: Model) -> dict[str, TensorDelta]:
    out = {}
    for name, info in model.tensors.items():
        if info.is_float:
            nb = B.n_blocks(info.shape)
            out[name] = TensorDelta(np.zeros(nb), np.zeros(nb, np.float32), np.zeros((nb, COARSE_BINS), np.int64),
                                    np.zeros((nb, COARSE_BINS)), np.zeros(FINE_BINS, np.int64), np.zeros(nb), None)
    return out


def index_family(base: Model, experts: list[Model], catalog: Catalog, progress: Progress | None = None,
                 sketch: SketchSpec | None = None, need: tuple[str, ...] = ()) -> FamilyIndex:
    """Hash every block of every file and compute expert delta statistics, reusing the catalog.
    `need`: optional statistics (OPTIONAL_STATS) the plan uses; an entry without them is recomputed."""
    check_family(base, experts)
    same = [k for k, e in enumerate(experts) if same_model(e, base)]
    if same:  # index the others; the base's own copies have a zero delta and no sketch
        rest = [e for k, e in enumerate(experts) if k not in same]
        fam = index_family(base, rest, catalog, progress, sketch, need)
        deltas = iter(fam.deltas)
        sketches = iter(fam.sketches or [])
        fam.deltas = [_zero_delta(base) if k in same else next(deltas) for k in range(len(experts))]
        if fam.sketches is not None:
            fam.sketches = [None if k in same else next(sketches) for k in range(len(experts))]
        return fam
    files: dict[str, FileIndex] = {}
    for m in [base, *experts]:
        for fh in m.files:
            fi = catalog.file(fh)
            if fi is not None:
                files[str(fh.path)] = fi
    base_files = [files.get(str(fh.path)) for fh in base.files]
    base_key = model_key(base_files) if all(base_files) else None
    deltas: dict[int, dict[str, TensorDelta]] = {}
    sketches: dict[int, SketchIndex] = {}
    todo = []  # experts whose delta statistics (or sketch) are missing
    for k, e in enumerate(experts):
        efiles = [files.get(str(fh.path)) for fh in e.files]
        known = base_key and all(efiles)
        stats = catalog.delta(model_key(efiles), base_key) if known else None
        if stats is not None and any(getattr(td, f) is None for td in stats.values() for f in need):
            stats = None
        sk = catalog.sketch(model_key(efiles), base_key, sketch) if known and sketch else None
        if stats is None or (sketch and sk is None):
            todo.append(k)
        else:
            deltas[k] = stats
            if sk is not None:
                sketches[k] = sk
    if sketch and todo and not need:  # sidecars keep no optional statistics
        todo = _from_exports(_Scan(base, experts, todo, [], files, catalog, progress, sketch), deltas, sketches)
    unhashed = [m for m in [base, *experts] if any(str(fh.path) not in files for fh in m.files)]
    if todo or unhashed:
        scanned, built = _scan(_Scan(base, experts, todo, unhashed, files, catalog, progress, sketch))
        deltas.update(scanned)
        sketches.update(built)
    return FamilyIndex(files, [deltas[k] for k in range(len(experts))],
                       [sketches.get(k) for k in range(len(experts))] if sketch else None)


def export_family(base: Model, experts: list[Model], fam: FamilyIndex) -> list[Path]:
    """Write each expert's portable sidecar beside it (see mergepipe.export); `fam` must hold sketches."""
    from . import export
    if not fam.sketches or not all(fam.sketches):
        raise MergepipeError("export needs the experts' sketches: index them with a sketch kind, not --sketch none")
    base_key = model_key([fam.files[str(fh.path)] for fh in base.files])
    return [export.export(e, [fam.files[str(fh.path)] for fh in e.files], base_key, fam.deltas[k], fam.sketches[k])
            for k, e in enumerate(experts)]


def _from_exports(scan: _Scan, deltas: dict, sketches: dict) -> list[int]:
    """Take what exported sidecars beside scan.todo's experts hold (see mergepipe.export), into the
    catalog too; returns the experts still to read. The base is hashed first where it must be, for
    its key."""
    from . import export
    base, experts, todo, files, catalog, sketch = scan.base, scan.experts, scan.todo, scan.files, scan.catalog, scan.sketch
    if not any(export.candidates(experts[k], sketch) for k in todo):
        return todo
    if any(str(fh.path) not in files for fh in base.files):
        _scan(_Scan(base, experts, [], [base], files, catalog, scan.progress, None))
    base_key = model_key([files[str(fh.path)] for fh in base.files])
    left = []
    for k in todo:
        found = export.load(experts[k], base_key, sketch)
        if found is None:
            left.append(k)
            continue
        hashes, stats, sk = found
        efiles = []
        for fh in experts[k].files:
            st = fh.path.stat()
            fi = FileIndex(str(fh.path), st.st_size, st.st_mtime_ns, fh.header_hash,
                           {t: h.astype(np.uint64) for t, h in hashes[os.path.relpath(fh.path, experts[k].root)].items()})
            catalog.put_file(fi)
            files[str(fh.path)] = fi
            efiles.append(fi)
        deltas[k] = {t: _delta_from(d) for t, d in stats.items()}
        sketches[k] = sk
        catalog.put_delta(model_key(efiles), base_key, deltas[k])
        catalog.put_sketch(model_key(efiles), base_key, sk)
    return left


def _delta_from(d: dict) -> TensorDelta:
    fine = np.zeros(FINE_BINS, np.int64)
    fine[d["fine_lo"]:d["fine_lo"] + len(d["fine"])] = d["fine"]
    return TensorDelta(d["l2"], d["maxabs"], d["coarse_count"], d["coarse_sumsq"], fine)


@dataclass
class _Scan:
    """What one indexing pass needs: the family, what to compute, and where results go."""
    base: Model
    experts: list[Model]
    todo: list[int]  # experts whose statistics (and sketch) to compute
    unhashed: list[Model]
    files: dict[str, FileIndex]
    catalog: Catalog
    progress: Progress | None
    sketch: SketchSpec | None


def _jobs(scan: _Scan, need_hash: set[str]) -> list[tuple[str, int, list]]:
    """(tensor, block, [(model, its TensorInfo)]) for every block some model must be read at:
    model -1 is the base, k an expert, -2 a tensor only an expert has (hashed, not differenced)."""
    jobs = []
    for name, info in scan.base.tensors.items():
        involved = [(-1, info)] if (scan.todo or str(info.file) in need_hash) else []
        for k, e in enumerate(scan.experts):
            if name in e.tensors and (k in scan.todo or str(e.tensors[name].file) in need_hash):
                involved.append((k, e.tensors[name]))
        if involved:
            jobs += [(name, b, involved) for b in range(B.n_blocks(info.shape))]
    for m in scan.unhashed:
        for name, info in m.tensors.items():
            if name not in scan.base.tensors:
                jobs += [(name, b, [(-2, info)]) for b in range(B.n_blocks(info.shape))]
    return jobs


def _scan(scan: _Scan) -> tuple[dict[int, dict[str, TensorDelta]], dict[int, SketchIndex]]:
    """One streaming pass: each needed block of each file read once, hashed, and, for experts whose
    statistics are missing, differenced against the base block it was read beside (and sketched)."""
    base, experts, todo, unhashed, files = scan.base, scan.experts, scan.todo, scan.unhashed, scan.files
    catalog, progress = scan.catalog, scan.progress
    writers = {k: SidecarWriter(catalog.path.parent / "sketches" / f"pending-{k}.safetensors", scan.sketch,
                                experts[k].tensors) for k in todo} if scan.sketch else {}
    reader = Reader()
    hashes: dict[str, dict[str, np.ndarray]] = {}  # path -> tensor -> block hashes
    need_hash = {str(fh.path) for m in unhashed for fh in m.files}
    stats: dict[int, dict[str, TensorDelta]] = {k: {} for k in todo}
    cpu = torch.device("cpu")

    jobs = _jobs(scan, need_hash)

    def load(job):
        name, b, involved = job
        out = []
        for k, info in involved:
            blk = B.block(info, b)
            raw = reader.read(info.file, blk.start, blk.end)
            out.append((k, info, blk, raw, block_hash(raw)))
        return out

    try:
        with single_threaded_torch():
            for (name, b, involved), loaded in B.read_ahead(jobs, load):
                base_f = None
                for k, info, blk, raw, h in loaded:
                    path = str(info.file)
                    if path in need_hash:
                        arr = hashes.setdefault(path, {}).setdefault(name, np.zeros(B.n_blocks(info.shape), np.uint64))
                        arr[b] = h
                    if k == -1 and todo and info.is_float:
                        base_f = raw_view(raw, info.dtype, blk.shape(info.shape), cpu).float()
                        base_t = base_terms(base_f)
                    elif k in stats and base_f is not None:
                        d = raw_view(raw, info.dtype, blk.shape(info.shape), cpu).float() - base_f
                        _accumulate(stats[k], name, info.shape, b, delta_stats(d, base_t))
                        if k in writers and sketched(info):
                            writers[k].block(name, b, d)
                    if progress:
                        progress(len(raw))
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        reader.close()

    for m in unhashed:
        for fh in m.files:
            path = str(fh.path)
            if path in files:
                continue
            st = fh.path.stat()
            per_tensor = hashes.get(path, {})
            fi = FileIndex(path, st.st_size, st.st_mtime_ns, fh.header_hash,
                           {n: per_tensor.get(n, np.zeros(B.n_blocks(i.shape), np.uint64)) for n, i in fh.tensors.items()})
            catalog.put_file(fi)
            files[path] = fi
    base_key = model_key([files[str(fh.path)] for fh in base.files])
    built = {}
    for k in todo:
        key = model_key([files[str(fh.path)] for fh in experts[k].files])
        catalog.put_delta(key, base_key, stats[k])
        if k in writers:  # named after its content: the expert's and the base's, and the kind
            final = writers[k].path.with_name(f"{key[:16]}-{base_key[:16]}-{scan.sketch.key}.safetensors")
            built[k] = writers[k].finish(final)
            catalog.put_sketch(key, base_key, built[k])
    return stats, built


def _accumulate(per_tensor: dict[str, TensorDelta], name: str, shape: tuple[int, ...], b: int, s) -> None:
    td = per_tensor.get(name)
    if td is None:
        nb = B.n_blocks(shape)
        td = per_tensor[name] = TensorDelta(np.zeros(nb), np.zeros(nb, np.float32),
                                            np.zeros((nb, COARSE_BINS), np.int64),
                                            np.zeros((nb, COARSE_BINS)), np.zeros(FINE_BINS, np.int64),
                                            np.zeros(nb), np.zeros(nb))
    l2, mx, count, sumsq, fine, dot, base_sq = s
    td.l2[b], td.maxabs[b] = l2, mx
    td.dot[b], td.base_sq[b] = dot, base_sq
    td.coarse_count[b], td.coarse_sumsq[b] = count, sumsq
    td.fine += fine
