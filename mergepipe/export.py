"""Portable index sidecars: what the index knows of one expert against one base (its files' block
hashes, its delta statistics and its sketch), in one safetensors file beside the expert, so that a
plan on another machine, or by another user of a shared model store, never reads the expert's own
files. `mergepipe index EXPERT --base BASE --export` writes it; `plan` uses it when the expert's
files still have the size and header it recorded (the blocks a plan reads exactly are still checked
against their hashes as they stream).

Layout: the metadata holds the format, the base's and the expert's content keys, the sketch and the
recorded files; tensors `hash:<file>:<tensor>` (block hashes, their bits as I64), `l2:`, `maxabs:`, `count:`,
`sumsq:`, `fine:` (delta statistics per tensor; `fine` trimmed to its non-zero bins, starting at
`fine_lo:`), each sketched tensor under its own name (its block sketches back to back, as in a
cache sidecar), `residual:` and `sketch_hash:`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from .checkpoint import Model, read_header
from .errors import MergepipeError
from .sidecar import SketchIndex, SketchTensor, identity
from .sketch import SketchSpec

FORMAT = "mergepipe.index/1"


def sidecar_path(expert: Model, base_key: str, spec: SketchSpec) -> Path:
    return expert.root / f"mergepipe-index-{base_key[:16]}-{spec.key}.safetensors"


def candidates(expert: Model, spec: SketchSpec) -> list[Path]:
    """Exported sidecars with this sketch beside the expert (for any base)."""
    return sorted(expert.root.glob(f"mergepipe-index-*-{spec.key}.safetensors"))


def export(expert: Model, files: list, base_key: str, stats: dict, sk: SketchIndex) -> Path:
    """Write the expert's sidecar beside it (atomically); returns its path."""
    arrays: dict[str, np.ndarray] = {}
    for fh, fi in zip(expert.files, files):
        name = os.path.relpath(fh.path, expert.root)
        for t, h in fi.hashes.items():
            arrays[f"hash:{name}:{t}"] = h.astype(np.uint64).view(np.int64)  # I64: mergepipe reads no U64
    for t, td in stats.items():
        nz = np.nonzero(td.fine)[0]
        lo, hi = (int(nz[0]), int(nz[-1]) + 1) if len(nz) else (0, 0)
        arrays.update({f"l2:{t}": td.l2, f"maxabs:{t}": td.maxabs, f"count:{t}": td.coarse_count,
                       f"sumsq:{t}": td.coarse_sumsq, f"fine:{t}": td.fine[lo:hi], f"fine_lo:{t}": np.array([lo])})
    with open(sk.path, "rb") as f:
        for t, st in sk.tensors.items():
            f.seek(st.start)
            arrays[t] = np.frombuffer(f.read(int(st.sizes.sum())), np.uint8)  # by its own name, as in a cache sidecar
            arrays[f"residual:{t}"], arrays[f"sketch_hash:{t}"] = st.residual, st.hashes.astype(np.uint64).view(np.int64)
    meta = {"format": FORMAT, "base": base_key, "sketch": sk.spec.kind, "params": json.dumps(dict(sk.spec.params)),
            "files": json.dumps([[os.path.relpath(fh.path, expert.root), fh.size, fh.header_hash] for fh in expert.files])}
    path = sidecar_path(expert, base_key, sk.spec)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    save_file(arrays, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def load(expert: Model, base_key: str, spec: SketchSpec) -> tuple[dict, dict, SketchIndex] | None:
    """The expert's exported index, if a sidecar for this base and sketch lies beside it and the
    expert's files still have the sizes and headers it recorded: (file name -> tensor -> block
    hashes, tensor -> statistic -> array, its sketches). Reads the sidecar's statistics, never its
    sketches or the expert's files."""
    path = sidecar_path(expert, base_key, spec)
    if not path.is_file():
        return None
    header = read_header(path)
    meta = header.metadata or {}
    files = {os.path.relpath(fh.path, expert.root): fh for fh in expert.files}
    try:
        recorded = json.loads(meta.get("files", "[]"))
        same = (meta.get("format") == FORMAT and meta.get("base") == base_key and meta.get("sketch") == spec.kind
                and json.loads(meta.get("params", "{}")) == dict(spec.params)
                and sorted(files) == sorted(r[0] for r in recorded)
                and all(files[n].size == size and files[n].header_hash == hh for n, size, hh in recorded))
    except (ValueError, TypeError, KeyError):
        raise MergepipeError(f"{path}: not a mergepipe index sidecar (bad metadata)") from None
    if not same:
        return None  # another version of the expert, or another base: index it instead
    with safe_open(str(path), "numpy") as f:
        get = f.get_tensor
        hashes = {n: {t: get(f"hash:{n}:{t}").view(np.uint64) for t in fh.tensors} for n, fh in files.items()}
        stats, tensors = {}, {}
        for key in header.tensors:
            if key.startswith("l2:"):
                t = key[3:]
                stats[t] = {"l2": get(key), "maxabs": get(f"maxabs:{t}"), "coarse_count": get(f"count:{t}"),
                            "coarse_sumsq": get(f"sumsq:{t}"), "fine": get(f"fine:{t}"),
                            "fine_lo": int(get(f"fine_lo:{t}")[0])}
            elif ":" not in key:  # a tensor's sketches
                t = key
                sizes = np.array([spec.nbytes(*shape) for shape in _block_shapes(expert, t)], np.int64)
                tensors[t] = SketchTensor(header.tensors[key].start, sizes, get(f"sketch_hash:{t}").view(np.uint64),
                                          get(f"residual:{t}"))
    return hashes, stats, SketchIndex(path, spec, header.size, identity(path), tensors)


def _block_shapes(expert: Model, name: str) -> list[tuple[int, int]]:
    from . import blocks as B
    info = expert.tensors[name]
    cols = info.numel // info.shape[0]
    return [(blk.row_end - blk.row_start, cols) for blk in B.blocks(info)]
